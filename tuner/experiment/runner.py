"""`tuner experiment`: run every trial of a spec on the local lab and record each one.

One trial = one cell of the grid (proxy idle x upstream idle) and one repeat:
  1. set the lab's timeouts (reload the proxy / restart the upstream) and wait for readiness;
  2. probe the upstream's real idle close time (it is what the gaps straddle, and it is
     recorded with the trial);
  3. run the race-hunting Locust load, bounded by the budget and the stopping rule;
  4. count the proxy's error-log signatures written during the trial;
  5. decide the verdict, or mark the trial invalid with its cause;
  6. write it to the results store in one transaction, before the next trial starts.

Design decision: trials run in an order shuffled by the spec's seed, so that a drift of the
machine (a noisy neighbour, a warming cache) cannot line up with one axis of the grid; the
order is recomputed from the seed on --resume, and finished trials are skipped by key.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import random
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner import __version__
from tuner.analysis.outcomes import Outcome
from tuner.analysis.signatures import count_haproxy_signatures, count_nginx_signatures, n_races
from tuner.analysis.stopping import n_race_failures, trial_verdict
from tuner.durations import format_seconds, plain_seconds
from tuner.errors import ConfigError, ProbeError
from tuner.experiment.spec import ExperimentSpec
from tuner.lab import Lab
from tuner.lab.lab import get_proxy_class
from tuner.lab.upstreams import upstream_from
from tuner.load.bursts import straddling_gaps
from tuner.load.locust_runner import LocustPlan, run_locust
from tuner.probe import parse_target, probe
from tuner.store import ResultsStore, TrialRecord

#: connections the probe measures before each trial (the minimum is what gaps straddle)
PROBE_SAMPLES = 3


@dataclass(frozen=True)
class TrialKey:
    proxy_idle_s: float
    upstream_idle_s: float
    repeat: int

    @property
    def cell(self) -> str:
        return f"{plain_seconds(self.proxy_idle_s)}|{plain_seconds(self.upstream_idle_s)}"


def trial_order(spec: ExperimentSpec) -> list[TrialKey]:
    """Every trial of the spec, in the order its seed shuffles them into (pure)."""
    keys = [TrialKey(p, u, r) for r in range(spec.repeats) for p, u in spec.cells()]
    random.Random(spec.seed).shuffle(keys)
    return keys


def check_grid(spec: ExperimentSpec) -> None:
    """Refuse, before anything starts, a grid value the upstream cannot take."""
    upstream = upstream_from(spec.upstream, spec.upstream_cmd)
    for idle_s in spec.upstream_idle_s:
        try:
            upstream.argv(port=1, idle_s=idle_s)
        except ConfigError as exc:
            raise ConfigError(f"upstream_idle {format_seconds(idle_s)}: {exc}") from None


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
    trials: list[TrialRecord]
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
        check_grid(spec)  # before the store file is even created
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
        order = trial_order(spec)
        attempts: dict[tuple[str, int], int] = {}
        valid = set()
        for trial in store.trials(experiment_id):
            key = (trial.cell, trial.repeat)
            attempts[key] = max(attempts.get(key, 0), trial.attempt + 1)
            if trial.record.get("verdict") != "invalid":
                valid.add(key)
        todo = [key for key in order if (key.cell, key.repeat) not in valid]
        say(f"{'resuming ' if stored else ''}experiment {experiment_id}: {len(order)} trials"
            f"{f', {len(valid)} already recorded' if stored else ''}, results in {db}")
        if todo:
            first = todo[0]
            with Lab(proxy=spec.proxy, upstream=upstream_from(spec.upstream, spec.upstream_cmd),
                     proxy_idle_s=first.proxy_idle_s,
                     upstream_idle_s=first.upstream_idle_s) as lab:
                _run_trials(lab, spec, store, experiment_id, todo, attempts,
                            n_total=len(order), n_done=len(valid), say=say, tick=tick)
        trials = store.trials(experiment_id)
    return ExperimentRun(experiment_id, db, spec, trials, len(order))


def _run_trials(lab: Lab, spec: ExperimentSpec, store: ResultsStore, experiment_id: str,
                todo: list[TrialKey], attempts: dict[tuple[str, int], int], *, n_total: int,
                n_done: int,
                say: Callable[[str], None], tick: Callable[[str], None] | None) -> None:
    started = time.monotonic()
    n_failed_so_far = 0
    for i, key in enumerate(todo):
        number = n_done + i + 1
        elapsed_s = time.monotonic() - started
        eta = (f", ETA {format_seconds(round(elapsed_s / i * (len(todo) - i)))}"
               if i else "")
        say(f"[{number}/{n_total}] proxy idle {format_seconds(key.proxy_idle_s)}, upstream "
            f"idle {format_seconds(key.upstream_idle_s)}, repeat {key.repeat + 1} "
            f"(elapsed {format_seconds(max(1, round(elapsed_s)))}{eta}, "
            f"failures so far {n_failed_so_far})")
        trial_started = time.time()
        record = run_trial(lab, spec, key, tick=tick)
        store.add_trial(TrialRecord(experiment_id, key.cell, key.repeat, trial_started,
                                    time.time(), record,
                                    attempts.get((key.cell, key.repeat), 0)))
        n_failed_so_far += int(record.get("n_failed", 0))
        say("    " + describe_trial(record))


def run_trial(lab: Lab, spec: ExperimentSpec, key: TrialKey,
              tick: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One trial on a running lab; returns the record to store (never raises for a trial
    that went wrong in the lab: it is recorded as invalid, with the cause)."""
    assert lab.proxy is not None and lab.upstream is not None
    record: dict[str, Any] = {
        "proxy": spec.proxy, "upstream": spec.upstream if not spec.upstream_cmd else "command",
        "proxy_idle_s": key.proxy_idle_s, "upstream_idle_s": key.upstream_idle_s,
        "repeat": key.repeat, "verdict": "invalid", "invalid_reason": None}
    if lab.problem() is not None or lab.upstream.idle_s != key.upstream_idle_s:
        lab.set_upstream_idle(key.upstream_idle_s)  # also restarts an upstream that died
    if lab.proxy.proxy_idle_s != key.proxy_idle_s:
        lab.set_proxy_idle(key.proxy_idle_s)
    max_idle_s = max(10.0, 3 * key.upstream_idle_s + 5)
    try:
        measured = probe(parse_target(f"{lab.upstream.url}/"), n_samples=PROBE_SAMPLES,
                         max_idle_s=max_idle_s)
    except ProbeError as exc:
        record["invalid_reason"] = f"probing the upstream failed: {exc}"
        return record
    close_s = measured.effective_close_s
    record.update(upstream_close_s=close_s, upstream_advertised_s=measured.advertised_s,
                  close_kind=measured.close_kind)
    if spec.gaps_s is not None:
        gaps_s: list[float] = list(spec.gaps_s)
    elif close_s is None:
        record["invalid_reason"] = (f"the upstream kept idle connections open for "
                                    f"{format_seconds(max_idle_s)}: no close to straddle; "
                                    "give the spec a list of gaps")
        return record
    else:
        gaps_s = straddling_gaps(close_s, below_s=spec.gap_half_width_s,
                                 above_s=spec.gap_half_width_s, n_steps=spec.gap_steps)
    mark = lab.proxy.error_log.mark()
    results = run_locust(
        LocustPlan(host_url=lab.proxy.url, gaps_s=gaps_s, burst_size=spec.burst_size,
                   methods=spec.methods, max_seconds=spec.max_seconds,
                   max_requests=spec.max_requests, workers=spec.workers, seed=spec.seed,
                   stop=spec.stop),
        workdir=lab.workdir,
        on_tick=(lambda s: tick(f"    load running {s:4.0f} s")) if tick else None)
    lines = lab.proxy.error_log.lines_since(mark)
    signatures = (count_nginx_signatures(lines) if spec.proxy == "nginx"
                  else count_haproxy_signatures(lines))
    counts: dict[str, int] = results.get("counts", {})
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
    problem = lab.problem()
    if problem is not None:
        record["invalid_reason"] = f"a lab process died during the trial: {problem}"
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


def describe_trial(record: dict[str, Any]) -> str:
    """One line for people about a finished trial."""
    if record["verdict"] == "invalid":
        return f"INVALID: {record['invalid_reason']}"
    return (f"{record['verdict'].upper()}: {record['n_failed']} failed of "
            f"{record['n_requests']} ({record['n_502']} x 502), "
            f"{record['n_proxy_log_races']} race lines in the proxy log; upstream closed "
            f"idle connections after {record['upstream_close_s']:.3f} s")
