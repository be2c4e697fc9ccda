"""Benchmark: time to a decisive "unsafe" verdict, race-hunting bursts vs steady load.

nginx (upstream keepalive_timeout 60s) and Envoy (cluster idle_timeout at its default, 1 h)
in front of Node (keepAliveTimeout 1000 ms, real close about 2.0 s), one row each. Both
loads run through Locust on the same lab, one after the other in this run, at the same mean
request rate (30 users; bursts every ~2 s vs one request per user every ~2 s, phases
spread). Each stops at the stopping rule's unsafe threshold (3 race
failures) or at the budget. Target (issue 4): race-hunting >= 10x faster, or steady load
reaching no verdict within the same budget.

    .venv/bin/python bench/race_vs_steady.py [--budget 120] [--proxies nginx,envoy]
"""

from __future__ import annotations

import argparse

from tuner.analysis.stopping import n_race_failures
from tuner.lab import Lab, get_upstream
from tuner.load.bursts import straddling_gaps
from tuner.load.locust_runner import LocustPlan, run_locust
from tuner.probe import parse_target, probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=120.0, help="seconds per load")
    parser.add_argument("--proxies", default="nginx,envoy",
                        help="proxies to measure, each at its default-like idle timeout")
    args = parser.parse_args()
    for proxy in args.proxies.split(","):
        _measure(proxy, budget_s=args.budget)


#: each proxy's idle timeout as shipped: nginx as ingress-nginx sets it (60 s), Envoy's 1 h
PROXY_IDLE_S = {"nginx": 60.0, "haproxy": 60.0, "envoy": 3600.0}


def _measure(proxy: str, *, budget_s: float) -> None:
    with Lab(proxy=proxy, upstream=get_upstream("node"), proxy_idle_s=PROXY_IDLE_S[proxy],
             upstream_idle_s=1) as lab:
        assert lab.upstream is not None and lab.proxy is not None
        close_s = probe(parse_target(f"{lab.upstream.url}/"), n_samples=3,
                        max_idle_s=10).earliest_close_s
        assert close_s is not None
        gaps = straddling_gaps(close_s, below_s=0.009, above_s=0.009, n_steps=7)
        print(f"\n{proxy}: Node closes idle connections after {close_s:.3f} s; "
              f"budget {budget_s:g} s")
        print(f"{'load':>14} {'stop':>10} {'seconds':>8} {'requests':>8} {'races':>6} "
              f"{'req/s':>6}")
        elapsed = {}
        for mode in ("bursts", "steady"):
            results = run_locust(LocustPlan(host_url=lab.proxy.url, gaps_s=gaps, mode=mode,
                                            max_seconds=budget_s), workdir=lab.workdir,
                                 name=f"locust-{mode}")
            seconds = float(results["elapsed_s"])
            n = int(results["n_requests"])
            elapsed[mode] = (seconds, results["stop_reason"])
            print(f"{proxy + ' ' + mode:>14} {results['stop_reason']:>10} {seconds:8.1f} {n:8d} "
                  f"{n_race_failures(results['counts']):6d} {n / seconds:6.1f}", flush=True)
    (race_s, race_stop), (steady_s, steady_stop) = elapsed["bursts"], elapsed["steady"]
    if steady_stop != "unsafe":
        print(f"steady load reached no verdict in {steady_s:.0f} s; race-hunting: "
              f"{race_s:.1f} s ({'met' if race_stop == 'unsafe' else 'MISSED'})")
    else:
        ratio = steady_s / race_s
        print(f"race-hunting reached 'unsafe' {ratio:.1f}x faster "
              f"({'met' if ratio >= 10 else 'MISSED'}: target 10x)")


if __name__ == "__main__":
    main()
