"""`tuner experiment`: run every trial of a spec on the local lab and record each one.

One trial = one cell of the grid (proxy idle x upstream idle) and one repeat:
  0. (once per proxy idle value, all at once, beside the control trial, which does not
     need them) measure the proxy's real idle lifetime at that setting
     (tuner.lab.lifetime);
  1. set the lab's timeouts (reload the proxy / restart the upstream) and wait for readiness;
  2. probe the upstream's real idle close time (it is what the gaps straddle, and it is
     recorded with the trial); the control trial takes its proxy idle timeout from it. The
     probe waits one whole close, so it runs once per upstream idle value of a run and
     later trials of that value reuse it (at T = 60 s it was half of every trial's time);
  3. run the race-hunting Locust load, bounded by the budget and the stopping rule;
  4. count the proxy's race signatures of the trial (error log, or Envoy's admin stats);
  5. judge it (tuner.analysis.judge), or mark the trial invalid with its cause;
  6. write it to the results store in one transaction, before the next trial starts.

Design decision: trials run in an order shuffled by the spec's seed, so that a drift of the
machine (a noisy neighbour, a warming cache) cannot line up with one axis of the grid; the
order is recomputed from the seed on --resume, and finished trials are skipped by key.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import queue
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tuner import __version__
from tuner.analysis.budget import LoadShape
from tuner.durations import format_seconds
from tuner.errors import Cancelled, ConfigError, ProbeError
from tuner.experiment.preflight import preflight_experiment
from tuner.experiment.spec import ExperimentSpec
from tuner.experiment.trials import (
    PROBE_SAMPLES,
    InvalidTrial,
    TrialKey,
    check_budget,
    control_proxy_idle_s,
    describe_trial,
    gaps_for,
    load_plan,
    measured_trial,
    new_trial,
    plan_trials,
    probe_max_idle_s,
    run_trials,
    trial_budget,
    trial_order,
)
from tuner.lab import Lab
from tuner.lab.lab import get_proxy_class
from tuner.lab.lifetime import measure_lifetimes
from tuner.lab.upstreams import upstream_from
from tuner.load.locust_runner import run_locust
from tuner.probe import ProbeResult, parse_target, probe
from tuner.store import ResultsStore, StoredTrial
from tuner.trial import Trial

__all__ = ["ExperimentRun", "TrialKey", "describe_trial", "run_experiment", "run_trial",
           "trial_order"]

def check_grid(spec: ExperimentSpec) -> None:
    """Refuse, before anything starts, a grid value the upstream cannot take, and a budget
    or burst that cannot reach a verdict."""
    upstream = upstream_from(spec.upstream, spec.upstream_cmd)
    for idle_s in spec.upstream_idle_s:
        try:
            upstream.argv(port=1, idle_s=idle_s)
        except ConfigError as exc:
            raise ConfigError(f"upstream_idle {format_seconds(idle_s)}: {exc}") from None
        # the setting is a lower bound of the real close (Node closes a second later)
        try:
            check_budget(spec, idle_s)
        except ConfigError as exc:
            raise ConfigError(f"upstream_idle {format_seconds(idle_s)}: {exc}") from None
        # the load's shape follows the measured close, at the setting or (Node) a second
        # past it: every shape it can take must reach a verdict
        for shape in {spec.shape(idle_s), spec.shape(idle_s + 1.0)}:
            _check_shape(spec, shape)


def _check_shape(spec: ExperimentSpec, shape: LoadShape) -> None:
    n_gaps = len(spec.gaps_s) if spec.gaps_s is not None else shape.gap_steps
    if spec.sweep == "groups" and shape.burst_size < n_gaps:
        raise ConfigError(f"burst_size {shape.burst_size} is below the {n_gaps} gaps of the "
                          f"sweep: every gap needs a group of at least one user; give "
                          f"burst_size {n_gaps} or more")
    if spec.max_requests and spec.max_requests < 2 * shape.burst_size:
        raise ConfigError(f"max_requests {spec.max_requests} cannot reach any verdict: the "
                          f"first burst ({shape.burst_size}) opens the connections and only "
                          f"the next one can race; give max_requests {2 * shape.burst_size} "
                          "or more (0: no limit)")


def _program_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) \
        else "unknown"


def _versions(spec: ExperimentSpec) -> dict[str, str]:
    versions = {"tuner": __version__, spec.proxy: get_proxy_class(spec.proxy).binary_version(),
                "python": platform.python_version()}
    for package in ("locust", "uvicorn", "gunicorn", "hypercorn"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    if spec.upstream == "node" and not spec.upstream_cmd:
        versions["node"] = _program_version(["node", "--version"])
    return versions


@dataclass
class ExperimentRun:
    experiment_id: str
    db: Path
    spec: ExperimentSpec
    trials: list[StoredTrial]
    n_planned: int


def run_experiment(spec: ExperimentSpec, *, resume: bool,
                   say: Callable[[str], None] = print,
                   tick: Callable[[str], None] | None = None) -> ExperimentRun:
    """Run (or resume) an experiment; every finished trial is in the store at once.

    On --resume, the newest experiment of the store continues with its stored spec; trials
    recorded as invalid (the lab failed) are run again, as a further attempt.
    """
    db = Path(spec.db)
    if not resume:
        # before the store file is even created: a refused run leaves nothing behind
        check_grid(spec)
        preflight_experiment(spec, upstream_idle_s=trial_order(spec)[0].upstream_idle_s,
                             say=say)
    with ResultsStore(db) as store:
        stored = store.experiment() if resume else None
        if resume and stored is None:
            raise ConfigError(f"--resume: {db} holds no experiment to resume; drop --resume "
                              "to start one")
        if stored is not None:
            experiment_id = stored["id"]
            spec = ExperimentSpec.from_stored(stored["spec"])
            check_grid(spec)
        if stored is None:
            experiment_id = uuid.uuid4().hex[:12]
            # recorded before anything starts, so --resume finds it whatever happens next
            store.add_experiment(experiment_id=experiment_id, created_at=time.time(),
                                 spec=spec.as_dict(), versions=_versions(spec),
                                 host=platform.node())
        plan = plan_trials(store, experiment_id, spec)
        say(f"{'resuming ' if stored else ''}experiment {experiment_id}: {len(plan.order)} "
            f"trials{f', {plan.n_done} already recorded' if stored else ''}, results in {db}")
        if plan.todo:
            probed: dict[float, ProbeResult] = {}
            first = plan.todo[0]
            if stored is not None:  # a fresh run's went before the store was created
                # refuses (exit 2) an upstream that does not serve the request
                preflight_experiment(spec, upstream_idle_s=first.upstream_idle_s, say=say)
            n_labs = max(1, min(spec.parallel, len(plan.todo)))
            cancel = threading.Event()
            with contextlib.ExitStack() as labs:
                # the lifetimes wait about the longest setting: beside the control's probe
                # and load, which do not need them, rather than before them
                measuring = labs.enter_context(ThreadPoolExecutor(max_workers=1))
                # on the way out, before the pool waits for the measuring: stop it
                labs.callback(cancel.set)
                lifetimes_future = measuring.submit(_proxy_lifetimes, spec, plan.todo,
                                                    say=say, cancel=cancel)
                # one lab per cell running at once, each on its own OS-chosen ports
                free: queue.Queue[Lab] = queue.Queue()
                for _ in range(n_labs):
                    free.put(labs.enter_context(Lab(
                        proxy=spec.proxy, upstream=upstream_from(spec.upstream,
                                                                 spec.upstream_cmd),
                        proxy_idle_s=max(spec.proxy_idle_s),
                        upstream_idle_s=first.upstream_idle_s, upstream_host=spec.host)))

                def run_one(key: TrialKey) -> Trial:
                    lifetime_s = (None if key.control
                                  else lifetimes_future.result().get(key.proxy_idle_s))
                    lab = free.get()
                    try:
                        return run_trial(lab, spec, key, tick=tick if n_labs == 1 else None,
                                         say=say, proxy_lifetime_s=lifetime_s, probed=probed,
                                         cancel=cancel)
                    finally:
                        free.put(lab)

                run_trials(store, experiment_id, plan, spec=spec, say=say,
                           new=lambda key: new_trial(spec, key, upstream=_upstream_name(spec)),
                           run_one=run_one, parallel=n_labs, cancel=cancel)
        trials = store.trials(experiment_id)
    return ExperimentRun(experiment_id, db, spec, trials, len(plan.order))


def _upstream_name(spec: ExperimentSpec) -> str:
    """The upstream as the results name it: a command is not the named server."""
    return spec.upstream if not spec.upstream_cmd else "command"


def _proxy_lifetimes(spec: ExperimentSpec, keys: list[TrialKey], *,
                     say: Callable[[str], None],
                     cancel: threading.Event | None = None) -> dict[float, float]:
    """The proxy's real idle lifetime at every setting the trials use (not the control's:
    it is chosen later, and is far above the close anyway)."""
    settings = sorted({key.proxy_idle_s for key in keys if not key.control})
    if not settings:
        return {}
    say(f"measuring {spec.proxy}'s real idle lifetime at "
        f"{', '.join(format_seconds(s) for s in settings)} (an upstream that never closes; "
        "about as long as the longest setting) ...")
    measured = measure_lifetimes(spec.proxy, settings, cancel=cancel)
    lifetimes = {}
    for setting_s, lifetime in measured.items():
        if lifetime.max_s is None:
            continue
        lifetimes[setting_s] = lifetime.max_s
        say(f"  {spec.proxy} {format_seconds(setting_s)}: idle connections lived "
            f"{lifetime.min_s or 0:.3f}-{lifetime.max_s:.3f} s"
            + (f" ({lifetime.n_still_open} still open after {lifetime.waited_s:g} s)"
               if lifetime.n_still_open else ""))
    return lifetimes


def _stop_on(cancel: threading.Event | None) -> Callable[[float, int], None] | None:
    """A probe's progress callback (called about once a second while it waits for the
    closes) that ends the probe when the run is interrupted: a probe in a --parallel cell's
    thread would otherwise hold Ctrl-C up to 3 x the setting + 25 s."""
    if cancel is None:
        return None

    def check(_elapsed_s: float, _n_open: int) -> None:
        if cancel.is_set():
            raise Cancelled("the probe of the upstream was stopped: the run was interrupted")
    return check


def run_trial(lab: Lab, spec: ExperimentSpec, key: TrialKey, *,
              tick: Callable[[str], None] | None = None,
              say: Callable[[str], None] | None = None,
              proxy_lifetime_s: float | None = None,
              probed: dict[float, ProbeResult] | None = None,
              cancel: threading.Event | None = None) -> Trial:
    """One trial on a running lab; returns it measured, not yet judged (a trial that went
    wrong in the lab raises InvalidTrial, and is recorded as invalid with the cause).
    `probed`: the closes measured so far in this run, by upstream idle value (read and
    filled). `cancel`: set when the run is interrupted (the load then stops)."""
    assert lab.proxy is not None and lab.upstream is not None
    trial = new_trial(spec, key, upstream=_upstream_name(spec))
    if lab.problem() is not None or lab.upstream.idle_s != key.upstream_idle_s:
        lab.set_upstream_idle(key.upstream_idle_s)  # also restarts an upstream that died
    if not key.control and lab.proxy.proxy_idle_s != key.proxy_idle_s:
        lab.set_proxy_idle(key.proxy_idle_s)
    max_idle_s = probe_max_idle_s(key.upstream_idle_s)
    measured = (probed or {}).get(key.upstream_idle_s)
    if measured is None:
        try:
            # the load's own path and Host: an app may answer only there
            measured = probe(parse_target(f"{lab.upstream.url}{spec.path}",
                                          host_header=spec.host), n_samples=PROBE_SAMPLES,
                             max_idle_s=max_idle_s, on_progress=_stop_on(cancel))
        except ProbeError as exc:
            raise InvalidTrial(f"probing the upstream failed: {exc}") from exc
        if probed is not None and measured.earliest_close_s is not None:
            probed[key.upstream_idle_s] = measured
    close_s = measured.earliest_close_s
    trial = trial.with_(upstream_close_s=close_s, upstream_advertised_s=measured.advertised_s,
                        close_kind=measured.close_kind, proxy_lifetime_s=proxy_lifetime_s,
                        closes_by_sweep=measured.closes_by_sweep,
                        sweep_period_s=measured.sweep_period_s)
    if key.control:
        if close_s is None:
            raise InvalidTrial("the upstream never closed an idle connection: there is no "
                               "race for a control to show", trial)
        trial = trial.with_(proxy_idle_s=control_proxy_idle_s(close_s))
        lab.set_proxy_idle(trial.proxy_idle_s)
    try:
        gaps_s = gaps_for(spec, close_s, max_idle_s=max_idle_s)
        check_budget(spec, max(gaps_s))
        plan = load_plan(spec, lab.proxy.url, gaps_s, close_s=close_s, control=key.control)
    except (InvalidTrial, ConfigError) as exc:
        raise InvalidTrial(str(exc), trial) from None
    if say is not None:
        budget = trial_budget(spec, gaps_s, close_s)
        seconds = budget.max_seconds if budget is not None else (spec.max_seconds or 0)
        eta = time.strftime("%H:%M:%S", time.localtime(time.time() + seconds))
        say(f"    load budget {budget.describe() if budget else f'{seconds:g} s (max_seconds)'}"
            f"; at the latest by {eta}")
    mark = lab.proxy.race_mark()
    results = run_locust(
        plan, workdir=lab.workdir,
        on_tick=(lambda s: tick(f"    load running {s:4.0f} s")) if tick else None,
        cancel=cancel)
    signatures = lab.proxy.race_signatures_since(mark)
    problem = lab.problem()
    return measured_trial(trial, gaps_s=gaps_s, results=results, signatures=signatures,
                          problem=f"a lab process died during the trial: {problem}"
                          if problem is not None else None)
