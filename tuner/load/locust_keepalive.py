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
every worker the wall-clock time of the next burst. Workers may run on other machines (pods
on other nodes): before the first burst the master measures each one's clock offset
(tuner.load.clocks) and from then on speaks to each in its own clock.

Steady mode (`--tuner-mode steady`) sends the same mean request rate with no gaps: each user
sends one request every mean period, the users' phases spread evenly across it.

Every request is classified (tuner.analysis.outcomes) and tagged with the gap before its
burst; the conductor applies the stopping rule (tuner.analysis.stopping) after each burst and
writes the totals as JSON to `--tuner-results` when the run ends.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from typing import Any

import gevent
from gevent.event import Event
from locust import FastHttpUser, LoadTestShape, constant, events, task
from locust.env import Environment
from locust.exception import StopUser
from locust.runners import MasterRunner, WorkerRunner

from tuner.analysis.outcomes import SERVED_OUTCOMES, Outcome, outcome_of_response
from tuner.analysis.stopping import StopRule
from tuner.errors import TunerError
from tuner.load.clocks import ClockSync
from tuner.load.conduct import (
    STEADY,
    SWEEP_BURSTS,
    SWEEP_GROUPS,
    SWEEPS,
    BurstTally,
    Hub,
    NextBurst,
    Stop,
    group_offset_s,
    n_groups,
)
from tuner.load.methods import parse_method_mix

_MSG_DONE = "tuner_burst_done"
_MSG_AT = "tuner_burst_at"
_MSG_PING = "tuner_clock_ping"
_MSG_PONG = "tuner_clock_pong"
#: clock pings per worker before the first burst, this far apart; the master waits at most
#: CLOCK_SYNC_WAIT_S for every worker's first answer
CLOCK_PINGS = 8
CLOCK_PING_EVERY_S = 0.02
CLOCK_SYNC_WAIT_S = 2.0
#: how long after its start a burst is reported without a late user: above the user's
#: connection_timeout + network_timeout (5 + 10 s), so only a request that failed anyway
#: can miss it (and it is then counted with the next report)
BURST_TIMEOUT_S = 20.0
#: from "every user exists" to the first burst: time for the master's message to reach
#: every worker, so that all fire at the same instant
FIRST_BURST_DELAY_S = 0.3
_NO_ANSWER = frozenset({Outcome.RESET, Outcome.TIMEOUT, Outcome.CONNECT_ERROR})


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
    group.add_argument("--tuner-sweep", choices=SWEEPS, default=SWEEP_BURSTS,
                       help="bursts: one gap per burst; groups: every burst tries every gap "
                            "(one group of users per gap; see tuner.load.conduct)")
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
    group.add_argument("--tuner-loosen-ms", type=float, default=0.0,
                       help="TESTS ONLY: delay each user's request by a random 0..N ms, to "
                            "check that a loose burst is measured and never judged safe")
    group.add_argument("--tuner-clock-sync", choices=("on", "off"), default="on",
                       help="on: the master measures each worker's clock offset and fires "
                            "every worker at the same real instant (default); off: it trusts "
                            "every worker's clock, as before (to measure what skew does)")
    group.add_argument("--tuner-delay-ms", type=float, default=0.0,
                       help="TESTS ONLY: this process's clock runs N ms behind (a node whose "
                            "clock is off): it fires N ms late and stamps its times N ms early")
    group.add_argument("--tuner-results", default="",
                       help="write the outcome counts as JSON to this file at the end")


def _options(environment: Environment) -> Any:
    assert environment.parsed_options is not None, "run under locust, which parses options"
    return environment.parsed_options


class _Conductor:
    """Glue between Locust and the pure bookkeeping (tuner.load.conduct): one per process."""

    def __init__(self, environment: Environment) -> None:
        options = _options(environment)
        self.environment = environment
        self.mode = options.tuner_mode
        self.sweep = options.tuner_sweep
        self.gaps_s = [float(g) for g in options.tuner_gaps.split(",")]
        if not self.gaps_s or min(self.gaps_s) <= 0:
            raise ValueError(f"--tuner-gaps {options.tuner_gaps!r}: positive seconds needed")
        if self.sweep == SWEEP_GROUPS:
            self.gaps_s.sort()  # group g waits the g-th smallest gap
        self.n_groups = n_groups(self.gaps_s, self.sweep)
        self.methods = parse_method_mix(options.tuner_methods, what="--tuner-methods")
        self.results_path = options.tuner_results
        self.delay_s = float(options.tuner_delay_ms) / 1000
        self.clock_sync = options.tuner_clock_sync == "on"
        self.clocks = ClockSync()
        self.started_at = self.now()
        self.tally = BurstTally(self.gaps_s, sweep=self.sweep)
        self.hub = Hub(self.gaps_s, StopRule(unsafe_after_failures=options.tuner_unsafe_after,
                                             safe_after_requests=options.tuner_safe_after),
                       max_requests=options.tuner_max_requests, sweep=self.sweep)
        self.burst_index = -1
        self.burst_at = 0.0
        self.new_burst = Event()
        self.n_users = 0
        self.finished = False

    @property
    def runner(self) -> Any:
        return self.environment.runner

    def now(self) -> float:
        """This process's wall clock (behind by --tuner-delay-ms, to stand for a skewed node)."""
        return time.time() - self.delay_s

    # -- every process: when to fire, and what came back --------------------------------
    def start_first_burst(self) -> None:
        """Once every user exists (Locust says spawning is complete): in a single process
        this process fires; with workers the master sends every worker the same instant."""
        if self.hub.n_bursts or self.mode != "bursts" or self.finished:
            return
        if isinstance(self.runner, MasterRunner):
            gevent.spawn(self._sync_clocks_then_fire)
        elif self.burst_index < 0:
            self.schedule(0, self.now() + FIRST_BURST_DELAY_S)

    def _sync_clocks_then_fire(self) -> None:
        """The master: ping every worker (tuner.load.clocks), then fire the first burst."""
        if self.clock_sync:
            for _ in range(CLOCK_PINGS):
                self.runner.send_message(_MSG_PING, {"sent": self.now()})
                gevent.sleep(CLOCK_PING_EVERY_S)
            deadline = self.now() + CLOCK_SYNC_WAIT_S
            while (set(self.runner.clients.keys()) - set(self.clocks.best)
                   and self.now() < deadline):
                gevent.sleep(CLOCK_PING_EVERY_S)
        self.send_at(0, self.now() + FIRST_BURST_DELAY_S)

    def send_at(self, index: int, at: float) -> None:
        """The master: burst `index` starts at `at` (master clock), told to each worker in
        its own clock."""
        for node_id in list(self.runner.clients.keys()):
            self.runner.send_message(_MSG_AT, {"index": index,
                                               "at": self.clocks.to_worker(at, node_id)},
                                     client_id=node_id)

    def pinged(self, sent: float) -> None:
        """A worker: answer the master's clock ping with this process's time."""
        self.runner.send_message(_MSG_PONG, {"sent": sent, "worker": self.now()})

    def ponged(self, node_id: str, data: dict[str, Any]) -> None:
        self.clocks.record(node_id, sent_s=float(data["sent"]), worker_s=float(data["worker"]),
                           received_s=self.now())

    def local_users(self) -> int:
        """This process's users. Not the count `spawning_complete` gives: on a worker, that
        event comes from the master with the total over every worker (Locust 2.x), and a
        worker that waited for that many answers never reported a burst before its
        deadline (the bug behind "Locust sent no request" with --workers)."""
        return int(self.runner.user_count) if self.runner is not None else self.n_users

    def schedule(self, index: int, at: float) -> None:
        if index <= self.burst_index or self.finished:
            return
        self.burst_index, self.burst_at = index, at
        self.tally.start(index, self.local_users())
        # a fresh Event per burst: users waiting on the old one all wake, none can miss it
        released, self.new_burst = self.new_burst, Event()
        released.set()
        last_group_s = max(self.offset_s(index, g) for g in range(self.n_groups))
        gevent.spawn_later(max(0.0, at + last_group_s - self.now()) + BURST_TIMEOUT_S,
                           self._deadline, index)

    def offset_s(self, index: int, group: int) -> float:
        return group_offset_s(self.gaps_s, index, group, sweep=self.sweep)

    def group_of(self, user_number: int) -> int:
        """The group of this process's `user_number`-th user (from 1); workers start at
        their own index, so that a few users per worker still cover every group."""
        worker_index = int(getattr(self.runner, "worker_index", 0) or 0)
        return (worker_index + user_number - 1) % self.n_groups

    def answered(self, index: int, answered_at: float, outcome: Outcome, *, sent_at: float,
                 idle_s: float | None, group: int, status: int = 0) -> None:
        report = self.tally.answered(index, answered_at, outcome.value, sent_at=sent_at,
                                     idle_s=idle_s, group=group, status=status)
        if report is not None:
            self._deliver(report)

    def _deadline(self, index: int) -> None:
        if index == self.burst_index:
            report = self.tally.report()
            if report is not None:
                self._deliver(report)

    def steady_answered(self, outcome: Outcome, status: int = 0) -> None:
        self._deliver({"index": -1, "first_answer": self.now(),
                       "counts": {STEADY: {outcome.value: 1}},
                       "statuses": {str(status): 1} if status else {}})

    def _deliver(self, report: dict[str, Any]) -> None:
        """To the master from a worker; to this process's own hub otherwise."""
        if isinstance(self.runner, WorkerRunner):
            self.runner.send_message(_MSG_DONE, report)
        else:
            self.on_report("local", report)

    # -- the hub (single process or master) ---------------------------------------------
    def on_report(self, sender: str, report: dict[str, Any]) -> None:
        if report["index"] < 0:
            decision: NextBurst | Stop | None = self.hub.steady(report["counts"],
                                                                report.get("statuses"))
        else:
            if isinstance(self.runner, MasterRunner):
                self.hub.expect(int(report["index"]), frozenset(
                    node_id for node_id, worker in self.runner.clients.items()
                    if worker.user_count > 0))
            decision = self.hub.report(sender, report)
        if isinstance(decision, Stop):
            self.finish()
        elif isinstance(decision, NextBurst):
            if isinstance(self.runner, MasterRunner):
                self.send_at(decision.index, decision.at)
            else:
                self.schedule(decision.index, decision.at)

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.write_results()
        if self.runner is not None:
            gevent.spawn(self.runner.quit)

    def write_results(self) -> None:
        if not self.results_path or isinstance(self.runner, WorkerRunner):
            return
        late = self.tally.flush()  # answers that arrived after their burst's report
        self.hub.merge(late["counts"], late["idle_ms"], late["statuses"])
        document = self.hub.results(mode=self.mode, elapsed_s=self.now() - self.started_at)
        if isinstance(self.runner, MasterRunner):
            document["clock_sync"] = self.clock_sync
            document["clocks"] = self.clocks.summary()
        temporary = f"{self.results_path}.tmp"
        with open(temporary, "w") as out:
            json.dump(document, out)
        os.replace(temporary, self.results_path)  # never a half-written file


_conductor: _Conductor | None = None


@events.init.add_listener
def _on_init(environment: Environment, **_kwargs: Any) -> None:
    global _conductor
    try:
        _conductor = _Conductor(environment)
    except (ValueError, TunerError) as exc:
        # Locust logs and swallows exceptions of init listeners; stop the run instead of
        # idling through its budget, and say why (run_locust reports the missing results).
        logging.error("tuner: bad options: %s", exc)
        if environment.runner is not None:
            gevent.spawn(environment.runner.quit)
        return
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        def on_done(msg: Any, **_kw: Any) -> None:  # Locust passes `msg=` by name
            if _conductor is not None:
                _conductor.on_report(str(msg.node_id), _conductor.clocks.report_to_master(
                    str(msg.node_id), msg.data))

        def on_pong(msg: Any, **_kw: Any) -> None:
            if _conductor is not None:
                _conductor.ponged(str(msg.node_id), msg.data)
        runner.register_message(_MSG_DONE, on_done)
        runner.register_message(_MSG_PONG, on_pong)
    elif isinstance(runner, WorkerRunner):
        def on_at(msg: Any, **_kw: Any) -> None:
            if _conductor is not None:
                _conductor.schedule(msg.data["index"], msg.data["at"])

        def on_ping(msg: Any, **_kw: Any) -> None:
            if _conductor is not None:
                _conductor.pinged(msg.data["sent"])
        runner.register_message(_MSG_AT, on_at)
        runner.register_message(_MSG_PING, on_ping)


@events.spawning_complete.add_listener
def _on_spawned(user_count: int, **_kwargs: Any) -> None:
    if _conductor is None:
        return
    if isinstance(_conductor.runner, WorkerRunner):
        return  # the master conducts, the first burst too
    _conductor.n_users = user_count
    _conductor.start_first_burst()


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_kwargs: Any) -> None:
    if _conductor is not None:
        _conductor.write_results()


def classify(status_code: int, error: BaseException | None, body: str = "") -> Outcome:
    """A FastHttpUser response as an outcome; status 0 means no HTTP answer at all. The body
    tells Envoy's race 503 from its others."""
    if status_code:
        return outcome_of_response(status_code, body)
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

    n_started = 0

    def on_start(self) -> None:
        if _conductor is None:
            raise StopUser()  # the options were bad: the run is being stopped
        options = _options(self.environment)
        RaceHuntingUser.n_started += 1
        self.random = random.Random(options.tuner_seed * 100_003 + RaceHuntingUser.n_started)
        self.body = '{"tuner": "race-hunting"}'
        self.done_index = -1
        self.steady_phase = RaceHuntingUser.n_started
        self.sweep_group = _conductor.group_of(RaceHuntingUser.n_started)
        #: when this user's connection last got an answer (it has sat idle since)
        self.last_answer_at: float | None = None

    def _send(self) -> tuple[Outcome, float, int]:
        """One request: its outcome, when it was answered, and its HTTP status (0: none)."""
        assert _conductor is not None
        method = self.random.choice(_conductor.methods)
        body = self.body if method in ("POST", "PUT", "PATCH") else None
        # no redirects followed: a 3xx is the upstream's answer on this connection, and a
        # second request would not follow an idle gap
        with self.client.request(method, _options(self.environment).tuner_path,
                                 data=body, catch_response=True,
                                 allow_redirects=False) as response:
            error = response.request_meta.get("exception")
            status = int(response.status_code or 0)
            outcome = classify(status, error,
                               (response.text or "") if status == 503 else "")
            if outcome in SERVED_OUTCOMES:
                response.success()
            else:
                response.failure(f"{outcome.value}: {error or status}")
        return outcome, _conductor.now(), status

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
        loosen_ms = _options(self.environment).tuner_loosen_ms
        gevent.sleep(max(0.0, at + _conductor.offset_s(index, self.sweep_group) - _conductor.now())
                     + (self.random.uniform(0, loosen_ms) / 1000 if loosen_ms else 0.0))
        sent_at = _conductor.now()
        idle_s = sent_at - self.last_answer_at if self.last_answer_at is not None else None
        outcome, answered_at, status = self._send()
        # no HTTP answer leaves no connection behind: the next request starts a fresh one
        self.last_answer_at = None if outcome in _NO_ANSWER else answered_at
        self.done_index = index
        _conductor.answered(index, answered_at, outcome, sent_at=sent_at, idle_s=idle_s,
                            group=self.sweep_group, status=status)

    def _steady(self) -> None:
        """The same mean rate as the bursts, without gaps: one request per mean period."""
        assert _conductor is not None
        period_s = sum(_conductor.gaps_s) / len(_conductor.gaps_s)
        if self.done_index < 0:
            n_users = max(1, _options(self.environment).tuner_burst_size)
            gevent.sleep(period_s * (self.steady_phase % n_users) / n_users)
        started = _conductor.now()
        outcome, _, status = self._send()
        self.done_index += 1
        _conductor.steady_answered(outcome, status)
        gevent.sleep(max(0.0, period_s - (_conductor.now() - started)))


class BurstShape(LoadTestShape):
    """All burst users at once, for at most --tuner-max-seconds; then the run ends."""

    def tick(self) -> tuple[int, float] | None:
        if self.runner is None:
            return None
        options = _options(self.runner.environment)
        if self.get_run_time() > options.tuner_max_seconds:
            return None
        return options.tuner_burst_size, float(max(1, options.tuner_burst_size) * 100)
