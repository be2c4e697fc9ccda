"""Locust users and shape for race-hunting load. Loaded by `locust -f`, never by `tuner`
itself (Locust monkey-patches the process with gevent on import).

Race-hunting: every user holds one kept-alive connection to the proxy and sends exactly one
request per burst; all users of a burst fire at the same instant, so the proxy opens (and
caches) as many upstream connections, and the next burst reuses them all at once after an
idle gap. Gaps are measured from the first answer of the previous burst (the upstream
starts its idle timers when it answers) and cycle through `--tuner-gaps`.

Who conducts: in a single process, the process itself. With workers (`--processes N` or
`--master`/`--worker`), the master: every worker reports when its users' burst is done
(with its first answer time and its outcome counts), and once all have, the master sends
every worker the wall-clock time of the next burst.

Steady mode (`--tuner-mode steady`) sends the same mean request rate with no gaps: each user
sends one request every mean period, the users' phases spread evenly across it.

Every request is classified (tuner.analysis.outcomes) and tagged with the gap before its
burst; the conductor applies the stopping rule (tuner.analysis.stopping) after each burst and
writes the totals as JSON to `--tuner-results` when the run ends.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from typing import Any

import gevent
from gevent.event import Event
from locust import FastHttpUser, LoadTestShape, constant, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from tuner.analysis.outcomes import Outcome, outcome_of_status
from tuner.analysis.stopping import StopRule, decide, n_race_failures

_MSG_DONE = "tuner_burst_done"
_MSG_AT = "tuner_burst_at"
#: how long a burst may take before the conductor moves on without a late user
BURST_TIMEOUT_S = 15.0


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("tuner race-hunting load")
    group.add_argument("--tuner-gaps", default="2.0",
                       help="idle gaps in seconds between bursts, cycled (e.g. 1.99,2.0,2.01)")
    group.add_argument("--tuner-burst-size", type=int, default=30,
                       help="users, so requests per burst (default 30)")
    group.add_argument("--tuner-methods", default="POST",
                       help="method mix, e.g. POST or POST:3,GET:1 (default POST: nginx "
                            "retries idempotent methods and hides the race)")
    group.add_argument("--tuner-path", default="/", help="request path (default /)")
    group.add_argument("--tuner-mode", choices=("bursts", "steady"), default="bursts")
    group.add_argument("--tuner-max-requests", type=int, default=0,
                       help="stop after this many requests (0: no limit)")
    group.add_argument("--tuner-max-seconds", type=float, default=60.0,
                       help="stop after this long (default 60)")
    group.add_argument("--tuner-unsafe-after", type=int, default=StopRule.unsafe_after_failures,
                       help="stop after this many race failures (0: never early)")
    group.add_argument("--tuner-safe-after", type=int, default=StopRule.safe_after_requests,
                       help="stop as safe after this many reused requests and no race "
                            "failure, once every gap was tried (0: never early)")
    group.add_argument("--tuner-seed", type=int, default=0, help="seed for the method mix")
    group.add_argument("--tuner-results", default="",
                       help="write the outcome counts as JSON to this file at the end")


def _options(environment: Environment) -> Any:
    assert environment.parsed_options is not None, "run under locust, which parses options"
    return environment.parsed_options


def parse_method_mix(text: str) -> list[str]:
    """"POST:3,GET:1" -> ["POST", "POST", "POST", "GET"]."""
    mix: list[str] = []
    for part in text.split(","):
        method, _, weight = part.strip().partition(":")
        mix += [method.upper()] * (int(weight) if weight else 1)
    if not mix or not all(m.isalpha() for m in mix):
        raise ValueError(f"--tuner-methods {text!r} is not a method mix such as POST:3,GET:1")
    return mix


class _Conductor:
    """Schedules bursts in one process and, where it is the hub, decides what comes next."""

    def __init__(self, environment: Environment) -> None:
        options = _options(environment)
        self.environment = environment
        self.gaps_s = [float(g) for g in options.tuner_gaps.split(",")]
        self.rule = StopRule(
            unsafe_after_failures=options.tuner_unsafe_after or 10**9,
            safe_after_requests=options.tuner_safe_after or 10**9)
        self.max_requests = options.tuner_max_requests or 10**12
        self.results_path = options.tuner_results
        self.started_at = time.time()
        # burst scheduling (every process)
        self.burst_index = -1
        self.burst_at = 0.0
        self.new_burst = Event()
        self.users: list[RaceHuntingUser] = []
        self.answers: list[float] = []
        self.local_counts: dict[str, Counter[str]] = {}
        # hub state (local runner or master)
        self.total: Counter[str] = Counter()
        self.by_gap: dict[str, Counter[str]] = {}
        self.n_reports = 0
        self.first_answers: list[float] = []
        self.stop_reason = "budget"
        self.n_bursts = 0
        self.finished = False

    @property
    def is_worker(self) -> bool:
        return isinstance(self.environment.runner, WorkerRunner)

    def gap_for(self, burst_index: int) -> float | None:
        return None if burst_index == 0 else self.gaps_s[(burst_index - 1) % len(self.gaps_s)]

    # -- every process: users ask when to fire, and report their answer ----------------
    def register(self, user: RaceHuntingUser) -> None:
        self.users.append(user)
        if self.burst_index < 0 and not self.is_worker:
            # the first burst once every user exists (the shape spawns them all at once)
            gevent.spawn_later(1.0, self.schedule, 0, time.time())

    def schedule(self, index: int, at: float) -> None:
        if index <= self.burst_index:
            return
        self.burst_index, self.burst_at = index, at
        self.answers = []
        self.local_counts = {}
        # a fresh Event per burst: users waiting on the old one all wake, none can miss it
        released, self.new_burst = self.new_burst, Event()
        released.set()
        gevent.spawn(self._close_burst_after_timeout, index)

    def answered(self, index: int, answered_at: float, outcome: Outcome) -> None:
        if index != self.burst_index:
            return
        gap = self.gap_for(index)
        key = "first" if gap is None else f"{gap:.3f}"
        self.local_counts.setdefault(key, Counter())[outcome.value] += 1
        self.answers.append(answered_at)
        if len(self.answers) == len(self.users):
            self._burst_done(index)

    def _close_burst_after_timeout(self, index: int) -> None:
        gevent.sleep(BURST_TIMEOUT_S)
        if index == self.burst_index and self.answers:
            self._burst_done(index)

    def _burst_done(self, index: int) -> None:

        report = {"index": index, "first_answer": min(self.answers),
                  "counts": {k: dict(v) for k, v in self.local_counts.items()}}
        self.answers = [float("inf")]  # done: late answers must not report twice
        runner = self.environment.runner
        if isinstance(runner, WorkerRunner):
            runner.send_message(_MSG_DONE, report)
        else:
            self.hub_report(report, n_expected=1)

    # -- the hub: merge reports, apply the rule, schedule the next burst -------------------
    def steady_answered(self, outcome: Outcome) -> None:
        """Steady mode: every answer is reported on its own (index -1), no bursts."""
        report = {"index": -1, "first_answer": time.time(),
                  "counts": {"steady": {outcome.value: 1}}}
        runner = self.environment.runner
        if isinstance(runner, WorkerRunner):
            runner.send_message(_MSG_DONE, report)
        else:
            self.hub_report(report, n_expected=1)

    def hub_report(self, report: dict[str, Any], *, n_expected: int) -> None:
        for key, counts in report["counts"].items():
            self.by_gap.setdefault(key, Counter()).update(counts)
            self.total.update(counts)
        if report["index"] < 0:  # steady: no bursts to schedule, never "safe" early
            n_race = n_race_failures(self.total)
            if n_race >= self.rule.unsafe_after_failures or (
                    sum(self.total.values()) >= self.max_requests):
                self.stop_reason = "unsafe" if n_race >= self.rule.unsafe_after_failures \
                    else "max_requests"
                self.finish()
            return
        self.first_answers.append(report["first_answer"])
        self.n_reports += 1
        if self.n_reports < n_expected:
            return
        index = report["index"]
        self.n_bursts = index + 1
        first_answer = min(self.first_answers)
        self.n_reports, self.first_answers = 0, []
        n_reused = sum(sum(c.values()) for k, c in self.by_gap.items() if k != "first")
        n_cycles = index // len(self.gaps_s)
        verdict = decide(n_race=n_race_failures(self.total), n_reused=n_reused,
                         n_cycles=n_cycles, rule=self.rule)
        if verdict is not None or sum(self.total.values()) >= self.max_requests:
            self.stop_reason = verdict or "max_requests"
            self.finish()
            return
        next_at = first_answer + self.gaps_s[index % len(self.gaps_s)]
        runner = self.environment.runner
        if isinstance(runner, MasterRunner):
            runner.send_message(_MSG_AT, {"index": index + 1, "at": next_at})
        else:
            self.schedule(index + 1, next_at)

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.write_results()
        runner = self.environment.runner
        if runner is not None:
            gevent.spawn(runner.quit)

    def write_results(self) -> None:
        if not self.results_path or self.is_worker:
            return
        document = {
            "mode": _options(self.environment).tuner_mode,
            "stop_reason": self.stop_reason,
            "n_bursts": self.n_bursts,
            "gaps_s": self.gaps_s,
            "counts": dict(self.total),
            "by_gap": {k: dict(v) for k, v in sorted(self.by_gap.items())},
            "n_requests": sum(self.total.values()),
            "elapsed_s": round(time.time() - self.started_at, 3),
        }
        temporary = f"{self.results_path}.tmp"
        with open(temporary, "w") as out:
            json.dump(document, out)
        os.replace(temporary, self.results_path)  # never a half-written file


_conductor: _Conductor | None = None


@events.init.add_listener
def _on_init(environment: Environment, **_kwargs: Any) -> None:
    global _conductor
    _conductor = _Conductor(environment)
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        def on_done(msg: Any, **_kw: Any) -> None:  # Locust passes `msg=` by name
            assert _conductor is not None
            n_workers = max(1, sum(1 for w in runner.clients.values() if w.user_count > 0))
            _conductor.hub_report(msg.data, n_expected=n_workers)
        runner.register_message(_MSG_DONE, on_done)
    elif isinstance(runner, WorkerRunner):
        def on_at(msg: Any, **_kw: Any) -> None:
            assert _conductor is not None
            _conductor.schedule(msg.data["index"], msg.data["at"])
        runner.register_message(_MSG_AT, on_at)
        # the first burst of a worker: as soon as its users exist
        def first_burst() -> None:
            if _conductor is not None:
                _conductor.schedule(0, time.time())
        gevent.spawn_later(1.0, first_burst)


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_kwargs: Any) -> None:
    if _conductor is not None:
        _conductor.write_results()


def classify(status_code: int, error: BaseException | None) -> Outcome:
    """A FastHttpUser response as an outcome; status 0 means no HTTP answer at all."""
    if status_code:
        return outcome_of_status(status_code)
    if isinstance(error, (TimeoutError, gevent.Timeout)):
        return Outcome.TIMEOUT
    if isinstance(error, ConnectionRefusedError):
        return Outcome.CONNECT_ERROR
    return Outcome.RESET


class RaceHuntingUser(FastHttpUser):
    """One slot of every burst: one kept-alive connection, one request per burst."""

    # no retries, ever: a retry would hide exactly what we measure
    max_retries = 0
    network_timeout = 10.0
    connection_timeout = 5.0
    wait_time = constant(0)  # the conductor paces the user

    def on_start(self) -> None:
        assert _conductor is not None
        options = _options(self.environment)
        self.methods = parse_method_mix(options.tuner_methods)
        self.random = random.Random(options.tuner_seed + len(_conductor.users))
        self.body = '{"tuner": "race-hunting"}'
        self.done_index = -1
        self.steady_phase = len(_conductor.users)
        _conductor.register(self)

    def _send(self) -> tuple[Outcome, float]:
        method = self.random.choice(self.methods)
        body = self.body if method in ("POST", "PUT", "PATCH") else None
        with self.client.request(method, _options(self.environment).tuner_path,
                                 data=body, catch_response=True) as response:
            error = response.request_meta.get("exception")
            outcome = classify(response.status_code, error)
            if outcome is Outcome.OK:
                response.success()
            else:
                response.failure(f"{outcome.value}: {error or response.status_code}")
        return outcome, time.time()

    @task
    def fire(self) -> None:
        assert _conductor is not None
        if _options(self.environment).tuner_mode == "steady":
            self._steady()
            return
        while _conductor.burst_index <= self.done_index:
            _conductor.new_burst.wait(timeout=1.0)
            if _conductor.finished:
                return
        index, at = _conductor.burst_index, _conductor.burst_at
        gevent.sleep(max(0.0, at - time.time()))
        outcome, answered_at = self._send()
        self.done_index = index
        _conductor.answered(index, answered_at, outcome)

    def _steady(self) -> None:
        """The same mean rate as the bursts, without gaps: one request per mean period."""
        assert _conductor is not None
        period_s = sum(_conductor.gaps_s) / len(_conductor.gaps_s)
        if self.done_index < 0:
            n_users = max(1, _options(self.environment).tuner_burst_size)
            gevent.sleep(period_s * (self.steady_phase % n_users) / n_users)
        started = time.time()
        outcome, _ = self._send()
        self.done_index += 1
        _conductor.steady_answered(outcome)
        gevent.sleep(max(0.0, period_s - (time.time() - started)))


class BurstShape(LoadTestShape):
    """All burst users at once, for at most --tuner-max-seconds; then the run ends."""

    def tick(self) -> tuple[int, float] | None:
        if self.runner is None:
            return None
        options = _options(self.runner.environment)
        if self.get_run_time() > options.tuner_max_seconds:
            return None
        return options.tuner_burst_size, float(max(1, options.tuner_burst_size) * 100)
