"""Benchmark: how often a burst catches the race, by burst size and sweep.

nginx keeps idle connections past Node's real close (nginx `--proxy-idle`, Node closing at
about T): every reused request that lands in the few-millisecond window races. For each
burst size (and sweep), a fixed number of reused bursts at gaps straddling the measured
close, no stopping rule; printed per run: races per reused request and the burst's spread.
The sizes run interleaved, `--runs` times each, so a drift of the machine hits them alike.
A verdict's cost is counted in bursts (one idle period each), so the size that keeps the
rate while holding more connections decides how fast a safe verdict can come.

    .venv/bin/python bench/burst_size_race.py [--t 2] [--sizes 30,60,100,150]
        [--sweeps bursts] [--reused-bursts 4] [--runs 3] [--steps 7] [--windows 9:9,12:1]
"""

from __future__ import annotations

import argparse
import itertools
import statistics

from racing_lab import racing_lab  # bench/, the script's own directory

from tuner.analysis.stopping import StopRule, n_race_failures
from tuner.load.bursts import straddling_gaps
from tuner.load.locust_runner import LocustPlan, run_locust


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t", type=float, default=2.0, help="Node's real close, seconds")
    parser.add_argument("--sizes", default="30,60,100,150", help="burst sizes")
    parser.add_argument("--sweeps", default="bursts", help="bursts, groups, or both")
    parser.add_argument("--reused-bursts", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=7, help="gaps in the sweep")
    parser.add_argument("--windows", default="9:9",
                        help="ms below:above the measured close the sweep spans; several, "
                             "comma-separated, are compared (e.g. 9:9,12:1)")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    sweeps = args.sweeps.split(",")
    with racing_lab(args.t) as (lab, close_s):
        assert lab.proxy is not None
        windows = [tuple(float(x) / 1000 for x in w.split(":"))
                   for w in args.windows.split(",")]
        print(f"Node closes at {close_s:.4f} s")
        print(f"{'window':>7} {'sweep':>6} {'size':>5} {'run':>3} {'reused':>6} {'races':>5} "
              f"{'rate %':>6} {'spread med/p95 ms':>17}  races by gap (ms from the close)")
        totals: dict[tuple[str, str, int], list[tuple[int, int]]] = {}
        for run in range(args.runs):
            for (below_s, above_s), sweep, size in itertools.product(windows, sweeps, sizes):
                gaps_s = straddling_gaps(close_s, below_s=below_s, above_s=above_s,
                                         n_steps=args.steps)
                window = f"{below_s * 1000:g}:{above_s * 1000:g}"
                plan = LocustPlan(host_url=lab.proxy.url, gaps_s=gaps_s, burst_size=size,
                                  sweep=sweep, max_seconds=(args.reused_bursts + 2) * args.t
                                  + 20, max_requests=size * (args.reused_bursts + 1),
                                  stop=StopRule(unsafe_after_failures=0,
                                                safe_after_requests=0))
                results = run_locust(plan, workdir=lab.workdir)
                counts = results.get("counts", {})
                races = n_race_failures(counts)
                reused = int(results.get("n_reused", 0))
                spreads = [float(x) for x in results.get("burst_spread_ms", [])]
                spread = (f"{statistics.median(spreads):.1f}/"
                          f"{sorted(spreads)[int(0.95 * (len(spreads) - 1))]:.1f}"
                          if spreads else "-")
                totals.setdefault((window, sweep, size), []).append((races, reused))
                by_gap = " ".join(
                    f"{(float(gap) - close_s) * 1000:+.1f}:{n_race_failures(c)}"
                    for gap, c in sorted(results.get("by_gap", {}).items())
                    if gap not in ("first", "steady"))
                print(f"{window:>7} {sweep:>6} {size:>5} {run:>3} {reused:>6} {races:>5} "
                      f"{100 * races / max(1, reused):>6.1f} {spread:>17}  {by_gap}",
                      flush=True)
        print("\ntotal: window sweep size races/reused (rate %, per run)")
        for (window, sweep, size), runs in totals.items():
            races, reused = sum(r for r, _ in runs), sum(n for _, n in runs)
            per_run = ", ".join(f"{r}/{n}" for r, n in runs)
            rate = 100 * races / max(1, reused)
            print(f"{window:>7} {sweep:>6} {size:>5} {races}/{reused} ({rate:.1f} %; {per_run})")


if __name__ == "__main__":
    main()
