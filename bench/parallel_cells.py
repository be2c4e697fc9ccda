"""Benchmark: k cells side by side in the same idle period (`tuner experiment --parallel k`).

nginx in front of Node closing at about T (keepAliveTimeout T - 1 s); a grid of 4 cells
(proxy idle 0.4 T, 0.5 T, 1.2 T, 1.4 T: two safe, two unsafe), control first, then the
cells k at a time, each on a lab of its own. Printed per k: the experiment's wall time, the
grid's wall time after the control, the verdicts, and the burst spread (median over the
cells of each cell's median): the load processes share the machine's cores, and bursts that
spread past 15 ms can no longer be called safe.

    .venv/bin/python bench/parallel_cells.py [--t 5] [--k 1,2,4] [-- extra flags]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t", type=float, default=5.0, help="upstream close, seconds")
    parser.add_argument("--k", default="1,2,4", help="cells side by side")
    parser.add_argument("extra", nargs="*", help="further `tuner experiment` flags")
    args = parser.parse_args()
    close_s = args.t
    grid = ",".join(_ms(close_s * f) for f in (0.4, 0.5, 1.2, 1.4))
    print(f"{'k':>2} {'wall s':>7} {'cells s':>7} {'verdicts':>40} {'spread ms':>9}")
    with tempfile.TemporaryDirectory(prefix="parallel-cells-") as tmp:
        for k in (int(x) for x in args.k.split(",")):
            db = Path(tmp) / f"k{k}.db"
            argv = [sys.executable, "-c", "from tuner.cli import main; main()", "experiment",
                    "--proxy", "nginx", "--upstream", "node", "--proxy-idle", grid,
                    "--upstream-idle", _ms(close_s - 1), "--parallel", str(k), "--db",
                    str(db), "--json", *args.extra]
            started = time.monotonic()
            out = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
            wall_s = time.monotonic() - started
            try:
                document = json.loads(out.stdout)
                trials = document["trials"]
            except json.JSONDecodeError:
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            from tuner.store import ResultsStore

            with ResultsStore(db) as store:
                stored = store.trials(document["experiment_id"])
            cells = [t for t in stored if not t.trial.control]
            cells_s = (max(t.finished_at for t in cells) - min(t.started_at for t in cells)
                       if cells else float("nan"))
            verdicts = " ".join(f"{t['cell'].split('|')[0]}:{t['verdict'][:4]}"
                                for t in trials if not t["control"])
            spreads = [t["burst_spread_ms_median"] for t in trials
                       if t["burst_spread_ms_median"] is not None and not t["control"]]
            spread = statistics.median(spreads) if spreads else float("nan")
            print(f"{k:2d} {wall_s:7.0f} {cells_s:7.0f} {verdicts:>40} {spread:9.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
