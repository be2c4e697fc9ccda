"""Benchmark: how far one worker's clock can be off before the verdicts suffer.

Locust workers in pods on other nodes read other clocks. Here two workers (processes of
their own, connected to the master over TCP as pods are) share each burst; one of them is
given a clock that runs D ms behind (`--tuner-delay-ms`: it fires D ms late and stamps its
times D ms early, as a skewed node would). nginx keeps idle connections past Node's real
close, so every reused request that lands in the few-millisecond window races. For each D,
with the master's clock sync on (tuner.load.clocks) and off, the same number of reused
bursts over the default sweep (9 ms below the measured close to it), no stopping rule;
printed per run: races per reused request, the spread the load measured, and the offset
the master measured. Runs interleave, so a drift of the machine hits every D alike.

    .venv/bin/python bench/worker_skew.py [--t 2] [--delays 0,2,5,10,20,50]
        [--sync on,off] [--burst-size 60] [--reused-bursts 7] [--runs 2]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
from pathlib import Path

from racing_lab import racing_lab  # bench/, the script's own directory

from tuner.analysis.budget import GAP_ABOVE_S, GAP_BELOW_S
from tuner.analysis.stopping import StopRule, n_race_failures
from tuner.load.bursts import straddling_gaps
from tuner.load.local_workers import LocalWorkers
from tuner.load.locust_runner import LocustPlan, run_locust


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t", type=float, default=2.0, help="Node's real close, seconds")
    parser.add_argument("--delays", default="0,2,5,10,20,50",
                        help="ms the second worker's clock runs behind")
    parser.add_argument("--sync", default="on,off", help="the master's clock sync")
    parser.add_argument("--burst-size", type=int, default=60, help="users over both workers")
    parser.add_argument("--reused-bursts", type=int, default=7)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    delays = [float(x) for x in args.delays.split(",")]
    syncs = args.sync.split(",")
    with racing_lab(args.t) as (lab, close_s):
        assert lab.proxy is not None
        gaps_s = straddling_gaps(close_s, below_s=GAP_BELOW_S, above_s=GAP_ABOVE_S, n_steps=7)
        print(f"Node closes at {close_s:.4f} s; 2 workers, {args.burst_size} users a burst, "
              f"{args.reused_bursts} reused bursts a run")
        print(f"{'delay ms':>8} {'sync':>4} {'run':>3} {'reused':>6} {'races':>5} "
              f"{'rate %':>6} {'spread med/p95 ms':>17} {'offset ms':>9}")
        totals: dict[tuple[float, str], list[tuple[int, int, float]]] = {}
        for run in range(args.runs):
            for delay_ms, sync in itertools.product(delays, syncs):
                plan = LocustPlan(host_url=lab.proxy.url, gaps_s=gaps_s,
                                  burst_size=args.burst_size, remote_workers=2,
                                  clock_sync=sync == "on",
                                  max_seconds=(args.reused_bursts + 2) * args.t + 20,
                                  max_requests=args.burst_size * (args.reused_bursts + 1),
                                  stop=StopRule(unsafe_after_failures=0,
                                                safe_after_requests=0))
                with tempfile.TemporaryDirectory() as tmp:
                    results = run_locust(plan, workdir=lab.workdir, launcher=LocalWorkers(
                        [0.0, delay_ms], workdir=Path(tmp)))
                races = n_race_failures(results.get("counts", {}))
                reused = int(results.get("n_reused", 0))
                spreads = sorted(float(x) for x in results.get("burst_spread_ms", []))
                spread_ms = statistics.median(spreads) if spreads else float("nan")
                spread = (f"{spread_ms:.1f}/{spreads[int(0.95 * (len(spreads) - 1))]:.1f}"
                          if spreads else "-")
                offsets = [c["offset_ms"] for c in results.get("clocks", {}).values()]
                offset = f"{min(offsets):.1f}" if offsets else "-"  # the skewed worker's
                totals.setdefault((delay_ms, sync), []).append((races, reused, spread_ms))
                print(f"{delay_ms:>8g} {sync:>4} {run:>3} {reused:>6} {races:>5} "
                      f"{100 * races / max(1, reused):>6.1f} {spread:>17} {offset:>9}",
                      flush=True)
        print("\ntotal: delay sync races/reused (rate %), measured spread median of the runs")
        for (delay_ms, sync), runs in totals.items():
            races, reused = sum(r for r, _, _ in runs), sum(n for _, n, _ in runs)
            spread_ms = statistics.median(s for _, _, s in runs)
            print(f"{delay_ms:>8g} {sync:>4} {races}/{reused} "
                  f"({100 * races / max(1, reused):.1f} %), spread {spread_ms:.1f} ms")


if __name__ == "__main__":
    main()
