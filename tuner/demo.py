"""`make demo`: a small real experiment on the local lab, around Node's real close time.

Node's `keepAliveTimeout` is 1000 ms, so it advertises `timeout=1` and really closes idle
connections after about 2.0 s. nginx's upstream idle timeout takes three values around that:
1 s (below: safe), 2 s (equal: still races, the upstream's timer starts first) and 3 s
(above: unsafe). Each trial is recorded in a results store that `tuner results` lists.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tuner.errors import StoreError
from tuner.experiment.runner import ExperimentRun, run_experiment
from tuner.experiment.spec import ExperimentSpec, parse_spec
from tuner.store import ResultsStore

#: the demo pins the lab's load (30 users, one gap per burst), whatever the defaults for
#: long timeouts become; the sweep is the default one (9 ms below the close to it), with
#: which the README's demo table was measured
DEMO_GRID = {"proxy": "nginx", "upstream": "node", "proxy_idle": "1s,2s,3s",
             "upstream_idle": "1s", "max_seconds": 40, "burst_size": 30, "sweep": "bursts"}


def is_demo_store(db: Path) -> bool:
    """True if every experiment in `db` is a demo's (so the demo may replace the file)."""
    try:
        with ResultsStore(db, busy_timeout_s=1.0, create=False) as store:
            experiments = [store.experiment(i) for i in store.experiment_ids()]
    except StoreError:
        return False
    demo = parse_spec(DEMO_GRID).cells()
    return all(e is not None and ExperimentSpec.from_stored(e["spec"]).cells() == demo
               for e in experiments)


def run_demo(*, db: str, say: Callable[[str], None] = print,
             proxy: str = "nginx") -> ExperimentRun:
    """The demo grid in front of `proxy` (nginx by default; haproxy, envoy)."""
    spec = parse_spec({**DEMO_GRID, "proxy": proxy, "db": db})
    return run_experiment(spec, resume=False, say=say)


def explain_demo(run: ExperimentRun) -> str:
    """What the table shows, in two sentences, with the measured close time."""
    grid = [stored.trial for stored in run.trials if not stored.trial.control]
    closes = [t.upstream_close_s for t in grid]
    close_s = min((c for c in closes if c is not None), default=None)
    if close_s is None:
        return "No trial measured Node's close time; see the invalid reasons above."
    unsafe = sorted(t.proxy_idle_s for t in grid if t.verdict == "unsafe")
    return (f"Node advertised Keep-Alive: timeout=1 but closed idle connections after "
            f"{close_s:.2f} s. Unsafe: {run.spec.proxy} idle timeouts "
            f"{', '.join(f'{s:g}s' for s in unsafe) or 'none'} (at or above that). The rule: "
            "the proxy's idle timeout must be below the upstream's REAL close time, minus a "
            f"margin. Results: {run.db} (`tuner results {run.db}`).")
