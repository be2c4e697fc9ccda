"""Benchmark: wall time to a verdict at production timeouts (issue 12).

Node closing idle connections at about T = 5, 20 and 60 s (keepAliveTimeout T - 1 s: Node 20
closes a second after its setting) behind nginx; per T one `tuner experiment` with the grid
{well below the close (T/2), above it (1.25 T)}, the positive control first, no budget flags
unless given. Printed per trial: its verdict, its wall time (from the store), the burst
spread, and whether the targets are met: unsafe <= T + 15 s, safe <= 2T + 30 s per cell.

    .venv/bin/python bench/verdict_time.py [--t 5,20,60] [--label after] [-- extra flags]

The experiment runs as `python -c 'from tuner.cli import main; main()'` in a subprocess, so
PYTHONPATH can point it at another checkout (the "before" figures ran main's code that way).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def run_one(close_s: float, extra: list[str], *, workdir: Path) -> tuple[float, list[dict]]:
    below, above = close_s / 2, close_s * 1.25
    db = workdir / f"t{close_s:g}.db"
    argv = [sys.executable, "-c", "from tuner.cli import main; main()", "experiment",
            "--proxy", "nginx", "--upstream", "node",
            "--proxy-idle", f"{_ms(below)},{_ms(above)}",
            "--upstream-idle", _ms(close_s - 1), "--db", str(db), "--json", *extra]
    started = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, cwd=workdir, env=os.environ,
                         timeout=3600)
    wall_s = time.monotonic() - started
    if out.returncode not in (0, 3, 4, 5, 6):
        print(out.stderr[-2000:], file=sys.stderr)
    try:
        document = json.loads(out.stdout)
    except json.JSONDecodeError:
        print(out.stdout[-2000:], out.stderr[-2000:], file=sys.stderr)
        return wall_s, []
    trials = document["trials"]
    from tuner.store import ResultsStore

    with ResultsStore(db) as store:
        times = {(t.cell, t.repeat): t.finished_at - t.started_at
                 for t in store.trials(document["experiment_id"])}
    for trial in trials:
        trial["wall_s"] = times.get((trial["cell"], trial["repeat"]))
    return wall_s, trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t", default="5,20,60", help="upstream closes, seconds")
    parser.add_argument("--label", default="", help="a word printed with the table")
    parser.add_argument("extra", nargs="*", help="further `tuner experiment` flags (after --)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="verdict-time-") as tmp:
        for close_s in (float(t) for t in args.t.split(",")):
            wall_s, trials = run_one(close_s, args.extra, workdir=Path(tmp))
            rows.append((close_s, wall_s, trials))
            print(f"T={close_s:g}s: experiment took {wall_s:.0f} s", file=sys.stderr, flush=True)
    print(f"verdict time {args.label} (nginx -> Node, loopback, 2 cores)")
    print(f"{'T':>4} {'cell':>12} {'verdict':>12} {'wall s':>7} {'target s':>8} {'met':>4} "
          f"{'bursts':>6} {'reused':>6} {'spread ms':>9} {'races':>5}  experiment s")
    for close_s, wall_s, trials in rows:
        for trial in trials:
            verdict = trial["verdict"]
            target = (close_s + 15 if verdict == "unsafe" else 2 * close_s + 30)
            took = trial.get("wall_s")
            met = ("yes" if took is not None and took <= target
                   and verdict in ("safe", "unsafe") else "no")
            spread = trial.get("burst_spread_ms_median")
            print(f"{close_s:4g} {trial['cell']:>12} {verdict:>12} "
                  f"{took if took is not None else float('nan'):7.1f} {target:8.0f} {met:>4} "
                  f"{trial['n_bursts']:6d} {trial['n_reused']:6d} "
                  f"{spread if spread is not None else float('nan'):9.1f} "
                  f"{trial['n_race']:5d}  {wall_s:.0f}")


if __name__ == "__main__":
    main()
