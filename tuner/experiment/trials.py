"""What every experiment target shares: the trial order, resuming, the progress loop, and
turning a load's results into a trial record with its verdict.

Design decision: a target (the local lab, a cluster) only supplies "run this one trial and
give me what it measured"; the loop owns ordering, attempts, the verdict and the store, so a
trial reaches disk in one transaction before the next starts, and every target's trials are
judged alike (tuner.analysis.judge), against the experiment's positive control.

The control runs first: the proxy idle timeout well above the upstream's measured close,
the same load. It must race; if it does not, this load cannot show the race here, and no
trial of the experiment may be called safe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from tuner.analysis.budget import Budget, LoadShape, default_budget, least_budget_s
from tuner.analysis.closes import SWEEP_WAIT_S
from tuner.analysis.judge import Control, judge_trial, n_in_window, p95
from tuner.analysis.signatures import n_races
from tuner.durations import format_seconds
from tuner.errors import ConfigError
from tuner.experiment.spec import ExperimentSpec
from tuner.load.bursts import straddling_gaps
from tuner.load.locust_runner import LocustPlan
from tuner.store import ResultsStore, StoredTrial
from tuner.trial import Trial, cell_name

#: connections the probe measures before each trial (the minimum is what gaps straddle)
PROBE_SAMPLES = 3


class InvalidTrial(Exception):
    """Raised inside a trial that cannot give a keep-alive result; the loop records the
    trial as invalid with this reason (and what was measured before, `partial`) and goes
    on (it is run again on resume)."""

    def __init__(self, reason: str, partial: Trial | None = None) -> None:
        super().__init__(reason)
        self.partial = partial


@dataclass(frozen=True)
class TrialKey:
    proxy_idle_s: float
    upstream_idle_s: float
    repeat: int
    #: the positive control: its proxy idle timeout is chosen from the measured close
    control: bool = False

    @property
    def cell(self) -> str:
        return cell_name(self.proxy_idle_s, self.upstream_idle_s, control=self.control)

    def describe(self) -> str:
        if self.control:
            return (f"CONTROL: proxy idle well above the close, upstream idle "
                    f"{format_seconds(self.upstream_idle_s)}")
        return (f"proxy idle {format_seconds(self.proxy_idle_s)}, upstream idle "
                f"{format_seconds(self.upstream_idle_s)}, repeat {self.repeat + 1}")


def control_key(spec: ExperimentSpec) -> TrialKey:
    return TrialKey(0.0, spec.upstream_idle_s[0], 0, control=True)


def trial_order(spec: ExperimentSpec) -> list[TrialKey]:
    """Every trial of the spec: the control first, then the grid in the order its seed
    shuffles it into (pure)."""
    keys = [TrialKey(p, u, r) for r in range(spec.repeats) for p, u in spec.cells()]
    random.Random(spec.seed).shuffle(keys)
    return ([control_key(spec)] if spec.control else []) + keys


def control_proxy_idle_s(upstream_close_s: float) -> float:
    """The control's proxy idle timeout: "well above" the close, by the larger of 1 s and
    half the close, so that no error in the close or the gaps can put it below; rounded
    up to 100 ms."""
    return math.ceil(round((upstream_close_s + max(1.0, 0.5 * upstream_close_s)) * 10, 6)) / 10


@dataclass
class TrialPlan:
    """What is left of an experiment: trials recorded as invalid are run again as a
    further attempt (the attempt is part of the store's key)."""

    order: list[TrialKey]
    todo: list[TrialKey]
    attempts: dict[tuple[str, int], int] = field(default_factory=dict)
    #: the newest control trial already stored (a resumed run judges against it)
    control: Trial | None = None

    @property
    def n_done(self) -> int:
        return len(self.order) - len(self.todo)


def plan_trials(store: ResultsStore, experiment_id: str, spec: ExperimentSpec) -> TrialPlan:
    order = trial_order(spec)
    attempts: dict[tuple[str, int], int] = {}
    valid = set()
    control = None
    for stored in store.trials(experiment_id):
        key = (stored.cell, stored.repeat)
        attempts[key] = max(attempts.get(key, 0), stored.attempt + 1)
        if stored.trial.is_valid:
            valid.add(key)
        if stored.trial.control:
            control = stored.trial
    todo = [key for key in order if (key.cell, key.repeat) not in valid]
    return TrialPlan(order, todo, attempts, control)


def control_of(spec: ExperimentSpec, control: Trial | None) -> Control:
    return Control.of(control, skipped=not spec.control)


def run_trials(store: ResultsStore, experiment_id: str, plan: TrialPlan, *,
               spec: ExperimentSpec, run_one: Callable[[TrialKey], Trial],
               new: Callable[[TrialKey], Trial], say: Callable[[str], None],
               recorded: Callable[[int, StoredTrial], None] | None = None,
               parallel: int = 1, cancel: threading.Event | None = None) -> None:
    """Run every trial left in `plan`, judge it, and store it as soon as it ends. `run_one`
    measures a trial (or raises InvalidTrial); `new` makes the record of a trial before
    anything ran; `recorded` hears of each stored trial with its index in the order.

    `parallel` > 1: after the control, up to that many trials run at once (`run_one` must
    then be safe to call from several threads: each call on a lab of its own); judging and
    storing stay in this thread, one trial at a time, in the order they end. Ctrl-C and
    SIGTERM reach only this thread: on the way out it sets `cancel`, which the trials in
    the other threads watch, so they stop within a second instead of running out their
    budgets (the pool waits for them)."""
    started = time.monotonic()
    n_failed_so_far = 0
    control = plan.control
    pending: dict[Future[Trial], tuple[TrialKey, float]] = {}
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool, \
            _cancelled_on_exit(cancel):
        for i, key in enumerate(plan.todo):
            elapsed_s = time.monotonic() - started
            eta = (f", ETA {format_seconds(round(elapsed_s / i * (len(plan.todo) - i)))}"
                   if i and parallel <= 1 else "")
            # the control first and alone: every other trial is judged against it
            alone = parallel <= 1 or key.control or (spec.control and control is None
                                                     and any(k.control for k in plan.todo))
            while pending and (alone or len(pending) >= parallel):
                done = next(as_completed(pending))
                done_key, done_started = pending.pop(done)
                control, n_failed = _record(store, experiment_id, plan, spec, done_key,
                                            _result(done, done_key, new), done_started,
                                            control=control, say=say, recorded=recorded)
                n_failed_so_far += n_failed
            say(f"[{plan.n_done + i + 1}/{len(plan.order)}] {key.describe()} "
                f"(elapsed {format_seconds(max(1, round(elapsed_s)))}{eta}, "
                f"failures so far {n_failed_so_far})")
            if alone:  # in this thread: Ctrl-C and SIGTERM reach the trial itself
                trial_started = time.time()
                try:
                    trial = run_one(key)
                except InvalidTrial as exc:
                    trial = (exc.partial or new(key)).with_(invalid_reason=str(exc))
                control, n_failed = _record(store, experiment_id, plan, spec, key, trial,
                                            trial_started, control=control, say=say,
                                            recorded=recorded)
                n_failed_so_far += n_failed
            else:
                pending[pool.submit(run_one, key)] = (key, time.time())
        for done in as_completed(list(pending)):
            done_key, done_started = pending.pop(done)
            control, _ = _record(store, experiment_id, plan, spec, done_key,
                                 _result(done, done_key, new), done_started, control=control,
                                 say=say, recorded=recorded)


@contextlib.contextmanager
def _cancelled_on_exit(cancel: threading.Event | None) -> Iterator[None]:
    """Set `cancel` when the block ends by an exception (Ctrl-C, SIGTERM, a bug)."""
    try:
        yield
    except BaseException:
        if cancel is not None:
            cancel.set()
        raise


def _result(future: Future[Trial], key: TrialKey, new: Callable[[TrialKey], Trial]) -> Trial:
    """The measured trial, or its invalid record (InvalidTrial); any other error is a bug
    and propagates with its traceback."""
    try:
        return future.result()
    except InvalidTrial as exc:
        return (exc.partial or new(key)).with_(invalid_reason=str(exc))


def _record(store: ResultsStore, experiment_id: str, plan: TrialPlan, spec: ExperimentSpec,
            key: TrialKey, trial: Trial, trial_started: float, *, control: Trial | None,
            say: Callable[[str], None],
            recorded: Callable[[int, StoredTrial], None] | None) -> tuple[Trial | None, int]:
    """Judge and store one measured trial; returns the control so far and its failures."""
    # the control is judged like any trial; its margin makes it unsafe whatever it saw
    trial = judge_trial(trial, rule=spec.stop, control=(
        Control.none("this is the control") if key.control else control_of(spec, control)))
    stored = StoredTrial(experiment_id, key.cell, key.repeat, trial_started, time.time(),
                         trial, plan.attempts.get((key.cell, key.repeat), 0))
    store.add_trial(stored)
    if recorded is not None:
        recorded(plan.order.index(key), stored)
    say("    " + describe_trial(trial))
    if key.control:
        control = trial
        say("    " + control_of(spec, control).text)
    return control, trial.n_failed


def new_trial(spec: ExperimentSpec, key: TrialKey, *, upstream: str) -> Trial:
    """A trial's record before anything ran: invalid until a verdict replaces that."""
    return Trial(proxy=spec.proxy, upstream=upstream, proxy_idle_s=key.proxy_idle_s,
                 upstream_idle_s=key.upstream_idle_s, repeat=key.repeat, control=key.control)


def gaps_for(spec: ExperimentSpec, close_s: float | None, *, max_idle_s: float
             ) -> list[float]:
    """The idle gaps a trial cycles: the spec's, or a sweep at the measured close, likeliest
    to race first (the middle of the default span, then nearer the close: races cluster
    there, so an unsafe cell stops a period or two sooner; the groups sweep sorts them)."""
    if spec.gaps_s is not None:
        return list(spec.gaps_s)
    if close_s is None:
        raise InvalidTrial(f"the upstream kept idle connections open for "
                           f"{format_seconds(max_idle_s)}: no close to straddle; give the "
                           "spec a list of gaps")
    shape = spec.shape(close_s)
    gaps = straddling_gaps(close_s, below_s=shape.gap_below_s, above_s=shape.gap_above_s,
                           n_steps=shape.gap_steps)
    middle_s = (gaps[0] + gaps[-1]) / 2
    return sorted(gaps, key=lambda gap_s: (round(abs(gap_s - middle_s), 6), -gap_s))


def shape_of(spec: ExperimentSpec, gaps_s: list[float], close_s: float | None) -> LoadShape:
    """The load's shape of a trial: decided at the measured close, as gaps_for did (the
    spec's own gaps without a close: at the largest of them)."""
    return spec.shape(close_s if close_s is not None else max(gaps_s))


def probe_max_idle_s(upstream_idle_s: float) -> float:
    """How long the probe waits for a close: Node closes a second after its setting, and
    a sweeping server up to a period later, and the probe waits one more period to see it
    (SWEEP_WAIT_S each); beyond this the upstream is taken to never close. Only a server
    that never closes waits it out."""
    return max(10.0, 3 * upstream_idle_s + 5) + 2 * SWEEP_WAIT_S


def trial_budget(spec: ExperimentSpec, gaps_s: list[float], close_s: float | None
                 ) -> Budget | None:
    """The default load budget of a trial with these gaps (None: the spec sets one)."""
    if spec.max_seconds is not None:
        return None
    return default_budget(close_s=max(gaps_s),
                          burst_size=shape_of(spec, gaps_s, close_s).burst_size,
                          n_gaps=len(gaps_s), sweep=spec.sweep, rule=spec.stop)


def check_budget(spec: ExperimentSpec, close_s: float) -> None:
    """Refuse a budget that cannot reach any verdict at this close."""
    least_s = least_budget_s(close_s)
    if spec.max_seconds is not None and spec.max_seconds < least_s:
        shape = spec.shape(close_s)
        budget = default_budget(close_s=close_s, burst_size=shape.burst_size,
                                n_gaps=shape.gap_steps, sweep=spec.sweep, rule=spec.stop)
        raise ConfigError(
            f"max_seconds {format_seconds(spec.max_seconds)} cannot reach any verdict with "
            f"an upstream closing at about {close_s:g} s: every burst after the first waits "
            f"one close, so it takes at least {format_seconds(math.ceil(least_s))}; give "
            f"max_seconds {format_seconds(math.ceil(budget.max_seconds))} or more, or leave it "
            "out (the default follows the close)")


def load_plan(spec: ExperimentSpec, url: str, gaps_s: list[float], *,
              close_s: float | None, control: bool = False) -> LocustPlan:
    """The load of one trial. The control never stops as "safe": its one job is to race,
    so it hunts for the whole budget (measured: controls that stopped after two reused
    bursts of 150 users with no race made every safe cell of their experiment
    inconclusive)."""
    budget = trial_budget(spec, gaps_s, close_s)
    max_seconds = budget.max_seconds if budget is not None else spec.max_seconds
    assert max_seconds is not None
    stop = dataclasses.replace(spec.stop, safe_after_requests=0) if control else spec.stop
    return LocustPlan(host_url=url, gaps_s=gaps_s,
                      burst_size=shape_of(spec, gaps_s, close_s).burst_size,
                      methods=spec.methods, path=spec.path, max_seconds=max_seconds,
                      sweep=spec.sweep,
                      max_requests=spec.max_requests, workers=spec.workers, seed=spec.seed,
                      stop=stop, loosen_ms=spec.loosen_ms)


def measured_trial(trial: Trial, *, gaps_s: list[float], results: Mapping[str, Any],
                   signatures: Mapping[str, int], problem: str | None) -> Trial:
    """`trial` with what the load and the proxy's log saw (pure); not yet judged.
    `problem`: why the target itself went wrong during the load (the trial is invalid)."""
    counts: dict[str, int] = {str(k): int(v) for k, v in results.get("counts", {}).items()}
    spreads = [float(x) for x in results.get("burst_spread_ms", [])]
    gap_errors = [abs(float(x)) for x in results.get("gap_error_ms", [])]
    trial = trial.with_(
        gaps_s=tuple(gaps_s), outcomes=counts, by_gap=results.get("by_gap", {}),
        statuses={str(k): int(v) for k, v in results.get("statuses", {}).items()},
        n_reused=int(results.get("n_reused", 0)), n_bursts=int(results.get("n_bursts", 0)),
        n_cycles=int(results["n_cycles"]) if "n_cycles" in results else None,
        stop_reason=results.get("stop_reason"), elapsed_s=results.get("elapsed_s"),
        n_proxy_log_races=n_races(signatures), log_signatures=dict(signatures),
        burst_spread_ms_p95=p95(spreads), gap_error_ms_p95=p95(gap_errors),
        burst_spread_ms_median=statistics.median(spreads) if spreads else None,
        n_in_window=n_in_window(results.get("idle_ms", {}), trial.upstream_close_s),
        n_load_processes=int(results["n_processes"]) if "n_processes" in results else None,
        clock_offsets_ms={worker: float(clock["offset_ms"])
                          for worker, clock in (results.get("clocks") or {}).items()})
    if problem is not None:
        return trial.with_(invalid_reason=problem)
    if signatures.get("connect_refused", 0):
        return trial.with_(invalid_reason=(
            f"the proxy could not connect to the upstream {signatures['connect_refused']} "
            "times: it was down, which is not a keep-alive result"))
    if trial.n_requests == 0:
        return trial.with_(invalid_reason="Locust sent no request")
    unserved = unserved_reason(trial)
    if unserved is not None:
        return trial.with_(invalid_reason=unserved)
    return trial


def unserved_reason(trial: Trial) -> str | None:
    """Why a trial whose answers were mostly neither served nor the race is no keep-alive
    result (pure); None if most were. A load the upstream refused (every request 400, as
    embedded Tomcat answered a Host it refuses) never sat on an idle connection: its "no
    race" is no evidence, and its failures are not the race's."""
    if 2 * trial.n_unserved <= trial.n_requests:
        return None
    statuses = ", ".join(f"{n} x {status}" for status, n in sorted(
        trial.statuses.items(), key=lambda item: (-item[1], item[0])))
    other = {kind: n for kind, n in trial.outcomes.items()
             if kind in ("timeout", "connect_error") and n}
    seen = "; ".join(part for part in (
        f"statuses {statuses}" if statuses else "",
        ", ".join(f"{n} x {kind}" for kind, n in sorted(other.items()))) if part)
    return (f"the upstream did not serve the load: {trial.n_unserved} of {trial.n_requests} "
            f"answers were neither served nor the race ({seen or 'no status recorded'}); a "
            "refused request (400) or an error (5xx, timeout) leaves no idle connection to "
            "race, so this is no keep-alive result. Check the request with the preflight's "
            "--host, --path and --methods")


def describe_trial(trial: Trial) -> str:
    """One line for people about a finished trial."""
    if trial.verdict == "invalid":
        return f"INVALID: {trial.invalid_reason}"
    close = (f"{trial.upstream_close_s:.3f} s" if trial.upstream_close_s is not None
             else "never")
    lifetime = (f", proxy kept them up to {trial.proxy_lifetime_s:.3f} s"
                if trial.proxy_lifetime_s is not None else "")
    aim = (f"; bursts written within {trial.burst_spread_ms_median:.1f} ms (median, p95 "
           f"{trial.burst_spread_ms_p95 or 0:.1f} ms), {trial.n_in_window} requests in the "
           "window" if trial.burst_spread_ms_median is not None else "")
    if trial.clock_offsets_ms:
        offsets = sorted(trial.clock_offsets_ms.values())
        aim += (f"; {len(offsets)} workers, clocks {offsets[0]:+.1f} to {offsets[-1]:+.1f} ms "
                "off the master's (corrected)")
    others = [f"{n} x {status}" for status, n in sorted(trial.statuses.items())
              if not status.startswith("2") and status != "502"]
    statuses = f", statuses {', '.join(others)}" if others else ""
    return (f"{trial.verdict.upper()}: {trial.verdict_text}\n"
            f"    {trial.n_failed} failed of {trial.n_requests} ({trial.n_502} x 502"
            f"{statuses}), "
            f"{trial.n_proxy_log_races} race lines in the proxy log; upstream closed idle "
            f"connections after {close}{lifetime}{aim}")
