"""Benchmark: the statistics from scipy against the hand-written ones they replaced.

On the recorded grid (tests/data/nginx_node_grid.json: nginx in front of Node, 6 trials),
side by side: each trial's exact 95 % interval and one-sided upper bound, and the monotone
fit's blocks; then the largest absolute difference over a sweep of (k, n), the time per
call, and the time to import each scipy module (every `tuner recommend` pays it once).

    .venv/bin/python bench/stats_scipy_vs_handwritten.py [--grid PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import handwritten_stats as old  # bench/, beside this file

from tuner.analysis import intervals as new
from tuner.analysis.recommend import _pooled
from tuner.trial import Trial

GRID = Path(__file__).parents[1] / "tests" / "data" / "nginx_node_grid.json"


def _per_call_us(fn: Callable[[int, int], Any], pairs: list[tuple[int, int]]) -> float:
    start = time.perf_counter()
    for k, n in pairs:
        fn(k, n)
    return (time.perf_counter() - start) / len(pairs) * 1e6


def _import_s(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; " \
           "print(time.perf_counter() - t)"
    runs = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout) for _ in range(3)]
    return min(runs)


def _blocks(points: list[tuple[float, int, int]], pool: Callable[..., Any],
            interval: Callable[[int, int], tuple[float, float]]) -> list[str]:
    return [f"{low:+.3f}..{high:+.3f} s {k}/{n} [{a:.5f}, {b:.5f}]"
            for low, high, k, n in pool(points) for a, b in [interval(k, n)]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=Path, default=GRID)
    args = parser.parse_args()
    trials = [Trial.from_json(r) for r in json.loads(args.grid.read_text())["trials"]]
    print(f"recorded grid {args.grid.name}: {len(trials)} trials")
    print(f"{'proxy':>6} {'margin':>7} {'k/n':>7}  {'95 % interval, hand-written':>27}  "
          f"{'scipy':>27}  {'upper(0,n) old':>14} {'scipy':>14}")
    diffs = []
    for t in trials:
        n = max(t.n_reused, t.n_race)
        o, s = old.clopper_pearson(t.n_race, n), new.clopper_pearson(t.n_race, n)
        uo, us = old.upper_bound(0, n), new.upper_bound(0, n)
        diffs += [abs(o[0] - s[0]), abs(o[1] - s[1]), abs(uo - us)]
        margin = f"{t.margin_s:+.3f}" if t.margin_s is not None else "-"
        print(f"{t.proxy_idle_s:6g} {margin:>7} {t.n_race:>3}/{n:<3}  "
              f"[{o[0]:.10f}, {o[1]:.10f}]  [{s[0]:.10f}, {s[1]:.10f}]  {uo:14.10f} {us:14.10f}")
    points = sorted((t.margin_s, t.n_race, t.n_reused) for t in trials
                    if t.margin_s is not None and t.n_reused > 0 and t.verdict != "invalid")
    fit_old = _blocks(points, old.pool_adjacent_violators, old.clopper_pearson)
    fit_new = _blocks(points, _pooled, new.clopper_pearson)
    print("\nmonotone fit (margin range, k/n, 95 % interval): hand-written | scipy")
    for a, b in zip(fit_old, fit_new, strict=False):
        print(f"  {a}  |  {b}")
    print(f"  blocks: {len(fit_old)} | {len(fit_new)}; identical: {fit_old == fit_new}")
    print(f"largest |difference| on the grid: {max(diffs):.2e}")

    rnd = random.Random(1)
    pairs = [(rnd.randint(0, n), n) for n in (1, 10, 60, 300, 1000, 5000) for _ in range(60)]
    pairs += [(0, n) for n in (1, 10, 60, 300, 1000, 5000)] + [(n, n) for n in (1, 300)]
    sweep = max(max(abs(a - b) for a, b in zip(old.clopper_pearson(k, n),
                                                  new.clopper_pearson(k, n), strict=True))
                for k, n in pairs)
    sweep_upper = max(abs(old.upper_bound(k, n) - new.upper_bound(k, n)) for k, n in pairs)
    print(f"\nsweep of {len(pairs)} (k, n), n up to 5000: largest |difference| interval "
          f"{sweep:.2e}, upper bound {sweep_upper:.2e}")

    from scipy.stats import beta

    def stats_ppf(k: int, n: int) -> tuple[float, float]:
        return (0.0 if k == 0 else float(beta.ppf(0.025, k, n - k + 1)),
                1.0 if k == n else float(beta.ppf(0.975, k + 1, n - k)))

    ppf_vs_special = max(max(abs(a - b) for a, b in zip(stats_ppf(k, n),
                                                          new.clopper_pearson(k, n), strict=True))
                         for k, n in pairs)
    print(f"scipy.stats.beta.ppf vs scipy.special.betaincinv: largest |difference| "
          f"{ppf_vs_special:.1e}")
    print(f"time per interval: hand-written {_per_call_us(old.clopper_pearson, pairs):.0f} us, "
          f"scipy.stats.beta.ppf {_per_call_us(stats_ppf, pairs):.0f} us, "
          f"scipy.special.betaincinv (tuner) {_per_call_us(new.clopper_pearson, pairs):.1f} us")

    big = sorted((rnd.uniform(-2, 2), rnd.randint(0, 20), rnd.randint(20, 400))
                 for _ in range(2000))
    for name, pool in (("hand-written", old.pool_adjacent_violators), ("scipy", _pooled)):
        start = time.perf_counter()
        for _ in range(20):
            blocks = pool(big)
        print(f"monotone fit of 2000 points, {name}: {(time.perf_counter() - start) / 20 * 1e3:.2f}"
              f" ms, {len(blocks)} blocks")
    print(f"same blocks on those 2000 points: {old.pool_adjacent_violators(big) == _pooled(big)}")
    print("import (best of 3): " + ", ".join(
        f"{m} {_import_s(m):.2f} s" for m in ("scipy.special", "scipy.stats", "scipy.optimize")))


if __name__ == "__main__":
    main()
