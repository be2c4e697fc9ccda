"""What every experiment target shares: the trial order, resuming, the progress loop, and
turning a load's results into a trial record with its verdict.

Design decision: a target (the local lab, a cluster) only supplies "run this one trial and
give me its record"; the loop owns ordering, attempts and the store, so a trial reaches
disk in one transaction before the next starts, whichever target ran it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tuner.analysis.outcomes import Outcome
from tuner.analysis.signatures import n_races
from tuner.analysis.stopping import n_race_failures, trial_verdict
from tuner.durations import format_seconds, plain_seconds
from tuner.experiment.spec import ExperimentSpec
from tuner.load.bursts import straddling_gaps
from tuner.load.locust_runner import LocustPlan
from tuner.store import ResultsStore, TrialRecord

#: connections the probe measures before each trial (the minimum is what gaps straddle)
PROBE_SAMPLES = 3


class InvalidTrial(Exception):
    """Raised inside a trial that cannot give a keep-alive result; the loop records the
    trial as invalid with this reason and goes on (it is run again on resume)."""


@dataclass(frozen=True)
class TrialKey:
    proxy_idle_s: float
    upstream_idle_s: float
    repeat: int

    @property
    def cell(self) -> str:
        return f"{plain_seconds(self.proxy_idle_s)}|{plain_seconds(self.upstream_idle_s)}"

    def describe(self) -> str:
        return (f"proxy idle {format_seconds(self.proxy_idle_s)}, upstream idle "
                f"{format_seconds(self.upstream_idle_s)}, repeat {self.repeat + 1}")


def trial_order(spec: ExperimentSpec) -> list[TrialKey]:
    """Every trial of the spec, in the order its seed shuffles them into (pure)."""
    keys = [TrialKey(p, u, r) for r in range(spec.repeats) for p, u in spec.cells()]
    random.Random(spec.seed).shuffle(keys)
    return keys


@dataclass
class TrialPlan:
    """What is left of an experiment: trials recorded as invalid are run again as a
    further attempt (the attempt is part of the store's key)."""

    order: list[TrialKey]
    todo: list[TrialKey]
    attempts: dict[tuple[str, int], int] = field(default_factory=dict)

    @property
    def n_done(self) -> int:
        return len(self.order) - len(self.todo)


def plan_trials(store: ResultsStore, experiment_id: str, spec: ExperimentSpec) -> TrialPlan:
    order = trial_order(spec)
    attempts: dict[tuple[str, int], int] = {}
    valid = set()
    for trial in store.trials(experiment_id):
        key = (trial.cell, trial.repeat)
        attempts[key] = max(attempts.get(key, 0), trial.attempt + 1)
        if trial.record.get("verdict") != "invalid":
            valid.add(key)
    todo = [key for key in order if (key.cell, key.repeat) not in valid]
    return TrialPlan(order, todo, attempts)


def run_trials(store: ResultsStore, experiment_id: str, plan: TrialPlan, *,
               run_one: Callable[[TrialKey, dict[str, Any]], dict[str, Any]],
               new: Callable[[TrialKey], dict[str, Any]],
               say: Callable[[str], None],
               recorded: Callable[[int, TrialRecord], None] | None = None) -> None:
    """Run every trial left in `plan`, storing each one as soon as it ends. `run_one` fills
    the record `new` made (or raises InvalidTrial); `recorded` hears of each stored trial
    with its index in the experiment's order."""
    started = time.monotonic()
    n_failed_so_far = 0
    for i, key in enumerate(plan.todo):
        elapsed_s = time.monotonic() - started
        eta = (f", ETA {format_seconds(round(elapsed_s / i * (len(plan.todo) - i)))}"
               if i else "")
        say(f"[{plan.n_done + i + 1}/{len(plan.order)}] {key.describe()} "
            f"(elapsed {format_seconds(max(1, round(elapsed_s)))}{eta}, "
            f"failures so far {n_failed_so_far})")
        trial_started = time.time()
        record = new(key)
        try:
            record = run_one(key, record)
        except InvalidTrial as exc:
            record["invalid_reason"] = str(exc)
        trial = TrialRecord(experiment_id, key.cell, key.repeat, trial_started, time.time(),
                            record, plan.attempts.get((key.cell, key.repeat), 0))
        store.add_trial(trial)
        if recorded is not None:
            recorded(plan.order.index(key), trial)
        n_failed_so_far += int(record.get("n_failed", 0))
        say("    " + describe_trial(record))


def new_record(spec: ExperimentSpec, key: TrialKey, *, upstream: str) -> dict[str, Any]:
    """A trial's record before anything ran: invalid until a verdict replaces that."""
    return {"proxy": spec.proxy, "upstream": upstream, "proxy_idle_s": key.proxy_idle_s,
            "upstream_idle_s": key.upstream_idle_s, "repeat": key.repeat,
            "verdict": "invalid", "invalid_reason": None}


def gaps_for(spec: ExperimentSpec, close_s: float | None, *, max_idle_s: float
             ) -> list[float]:
    """The idle gaps a trial cycles: the spec's, or a sweep around the measured close."""
    if spec.gaps_s is not None:
        return list(spec.gaps_s)
    if close_s is None:
        raise InvalidTrial(f"the upstream kept idle connections open for "
                           f"{format_seconds(max_idle_s)}: no close to straddle; give the "
                           "spec a list of gaps")
    return straddling_gaps(close_s, below_s=spec.gap_half_width_s,
                           above_s=spec.gap_half_width_s, n_steps=spec.gap_steps)


def probe_max_idle_s(upstream_idle_s: float) -> float:
    """How long the probe waits for a close: Node closes a second after its setting, and
    some servers sweep late; beyond this the upstream is taken to never close."""
    return max(10.0, 3 * upstream_idle_s + 5)


def load_plan(spec: ExperimentSpec, url: str, gaps_s: list[float]) -> LocustPlan:
    return LocustPlan(host_url=url, gaps_s=gaps_s, burst_size=spec.burst_size,
                      methods=spec.methods, max_seconds=spec.max_seconds,
                      max_requests=spec.max_requests, workers=spec.workers, seed=spec.seed,
                      stop=spec.stop)


def finish_record(record: dict[str, Any], spec: ExperimentSpec, *, gaps_s: list[float],
                  results: Mapping[str, Any], signatures: Mapping[str, int],
                  problem: str | None) -> dict[str, Any]:
    """Fill in what the load and the proxy's log saw, then the verdict (pure). `problem`:
    why the target itself went wrong during the load, which makes the trial invalid."""
    counts: dict[str, int] = dict(results.get("counts", {}))
    n_requests = sum(counts.values())
    n_failed = sum(n for kind, n in counts.items() if kind != Outcome.OK)
    n_reused = int(results.get("n_reused", 0))
    n_cycles = int(results.get("n_cycles", 0))
    record.update(
        gaps_s=gaps_s, n_requests=n_requests, n_502=counts.get(Outcome.BAD_GATEWAY.value, 0),
        n_failed=n_failed, failure_rate=(n_failed / n_requests) if n_requests else None,
        n_race_failures=n_race_failures(counts), n_reused=n_reused, outcomes=counts,
        by_gap=results.get("by_gap", {}), n_bursts=results.get("n_bursts", 0),
        stop_reason=results.get("stop_reason"), elapsed_s=results.get("elapsed_s"),
        n_proxy_log_races=n_races(signatures), log_signatures=dict(signatures))
    if problem is not None:
        record["invalid_reason"] = problem
    elif signatures.get("connect_refused", 0):
        record["invalid_reason"] = (f"the proxy could not connect to the upstream "
                                    f"{signatures['connect_refused']} times: it was down, "
                                    "which is not a keep-alive result")
    elif n_requests == 0:
        record["invalid_reason"] = "Locust sent no request"
    else:
        record["verdict"] = trial_verdict(n_race=record["n_race_failures"], n_reused=n_reused,
                                          n_cycles=n_cycles, rule=spec.stop)
    return record


def describe_trial(record: Mapping[str, Any]) -> str:
    """One line for people about a finished trial."""
    if record["verdict"] == "invalid":
        return f"INVALID: {record['invalid_reason']}"
    return (f"{record['verdict'].upper()}: {record['n_failed']} failed of "
            f"{record['n_requests']} ({record['n_502']} x 502), "
            f"{record['n_proxy_log_races']} race lines in the proxy log; upstream closed "
            f"idle connections after {record['upstream_close_s']:.3f} s")
