"""The bookkeeping of synchronized bursts, free of Locust and gevent (pure, so testable).

Two roles, as in Locust's distributed mode:
- a `BurstTally` in every load process counts its users' answers: a burst is done when every
  user answered or its deadline passed; answers that arrive later (a slow request) are kept
  under their own burst's gap and go out with the next report, so no answer is lost or
  counted twice;
- one `Hub` (the single process, or the master) merges the reports of every sending process,
  applies the stopping rule, and says when the next burst starts: once every process that
  was expected for a burst has reported it (duplicates and stale reports are ignored).

Two ways to sweep the idle gap over the race window (`sweep`):
- "groups" (the default): every burst tries every gap. The users are split into one group
  per gap; bursts alternate between *staggered* ones (odd index: group g fires gap g after
  the previous burst's first answer, so the connections it reuses, all released together,
  have sat idle exactly gap g whichever of them the proxy picks) and *tight* ones (even
  index: every group at once, the largest gap after the staggered burst's first answer, so
  the connections it reuses, released over the stagger, have sat idle the smallest gap to
  the largest). Either way one burst covers the window: a full cycle per burst.
- "bursts": every user at once, one gap per burst, cycling; a cycle takes one burst per gap.
The groups are synchronized within themselves; a group's offset is part of the plan, not
of the spread.

The load also measures its own aim, because a burst that misses the few-millisecond race
window proves nothing: per burst, the launch spread (first to last request written, across
every process) and the achieved idle gap against the planned one; per reused request, how
long its connection sat idle (a histogram in whole milliseconds). Beside the outcome classes
it counts the answers by HTTP status, so that a trial the upstream did not serve can say
which statuses it got.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuner.analysis.stopping import StopRule, decide, n_race_failures

FIRST = "first"  # the first burst follows no idle gap
STEADY = "steady"
SWEEP_GROUPS = "groups"
SWEEP_BURSTS = "bursts"
SWEEPS = (SWEEP_GROUPS, SWEEP_BURSTS)


def n_groups(gaps_s: Sequence[float], sweep: str) -> int:
    return len(gaps_s) if sweep == SWEEP_GROUPS else 1


def fire_delay_s(gaps_s: Sequence[float], index: int, group: int = 0, *,
                 sweep: str = SWEEP_BURSTS) -> float:
    """How long after the previous burst's first answer group `group` of burst `index`
    fires (`gaps_s` sorted in groups mode)."""
    if index == 0:
        return 0.0
    if sweep == SWEEP_BURSTS:
        return gaps_s[(index - 1) % len(gaps_s)]
    if index % 2 == 1:
        return gaps_s[group % len(gaps_s)]
    return gaps_s[-1]


def group_offset_s(gaps_s: Sequence[float], index: int, group: int, *, sweep: str) -> float:
    """When group `group` fires, after the burst's announced instant (that of group 0)."""
    return (fire_delay_s(gaps_s, index, group, sweep=sweep)
            - fire_delay_s(gaps_s, index, 0, sweep=sweep))


def gap_key(gaps_s: Sequence[float], burst_index: int, group: int = 0, *,
            sweep: str = SWEEP_BURSTS) -> str:
    """The key an answer is counted under: the idle gap its own connection sat before it.
    A tight burst after a staggered one: group g answered gap g - gap 0 after the first
    answer, so its connection sat the largest gap less that."""
    if burst_index == 0:
        return FIRST
    if sweep == SWEEP_GROUPS and burst_index % 2 == 0:
        g = group % len(gaps_s)
        return f"{gaps_s[-1] - (gaps_s[g] - gaps_s[0]):.3f}"
    return f"{fire_delay_s(gaps_s, burst_index, group, sweep=sweep):.3f}"


@dataclass
class BurstTally:
    gaps_s: Sequence[float]
    sweep: str = SWEEP_BURSTS
    index: int = -1
    n_users: int = 0
    answers_at: list[float] = field(default_factory=list)
    #: per group: when its requests were written
    sent_at: dict[int, list[float]] = field(default_factory=dict)
    pending: dict[str, Counter[str]] = field(default_factory=dict)
    pending_idle_ms: Counter[int] = field(default_factory=Counter)
    #: answers by HTTP status, not yet reported
    pending_statuses: Counter[str] = field(default_factory=Counter)
    reported: int = -1

    def start(self, index: int, n_users: int) -> None:
        self.index, self.n_users, self.answers_at, self.sent_at = index, n_users, [], {}

    def answered(self, index: int, answered_at: float, outcome: str, *,
                 sent_at: float | None = None, idle_s: float | None = None, group: int = 0,
                 status: int = 0) -> dict[str, Any] | None:
        """Count one answer; return the burst's report once every user has answered.
        `sent_at`: when its request was written; `idle_s`: how long its connection had been
        idle then (None for a fresh connection); `group`: the user's group; `status`: its
        HTTP status (0: no HTTP answer)."""
        key = gap_key(self.gaps_s, index, group, sweep=self.sweep)
        self.pending.setdefault(key, Counter())[outcome] += 1
        if status:
            self.pending_statuses[str(status)] += 1
        if idle_s is not None and index > 0:
            self.pending_idle_ms[round(idle_s * 1000)] += 1
        if index != self.index or index <= self.reported:
            return None  # late: it goes out with the next report
        self.answers_at.append(answered_at)
        if sent_at is not None:
            self.sent_at.setdefault(group, []).append(sent_at)
        return self.report() if len(self.answers_at) >= self.n_users else None

    def report(self) -> dict[str, Any] | None:
        """The report of the current burst (also when its deadline passed); once only."""
        if self.index <= self.reported or not self.answers_at:
            return None
        self.reported = self.index
        report: dict[str, Any] = {"index": self.index, "first_answer": min(self.answers_at),
                                  **self.flush()}
        if self.sent_at:
            report["groups"] = {str(g): [min(times), max(times)]
                                for g, times in sorted(self.sent_at.items())}
        return report

    def flush(self) -> dict[str, Any]:
        """What was not yet reported, as a report's fields, and nothing is pending after
        (a burst's report takes it; at the end of the run, the late answers)."""
        late = {"counts": {k: dict(v) for k, v in self.pending.items()},
                "idle_ms": {str(ms): n for ms, n in self.pending_idle_ms.items()},
                "statuses": dict(self.pending_statuses)}
        self.pending, self.pending_idle_ms, self.pending_statuses = {}, Counter(), Counter()
        return late


@dataclass(frozen=True)
class NextBurst:
    index: int
    at: float


@dataclass(frozen=True)
class Stop:
    reason: str  # "unsafe", "safe" or "max_requests"


@dataclass
class Hub:
    gaps_s: Sequence[float]
    rule: StopRule
    max_requests: int = 0
    sweep: str = SWEEP_BURSTS
    total: Counter[str] = field(default_factory=Counter)
    by_gap: dict[str, Counter[str]] = field(default_factory=dict)
    expected: dict[int, frozenset[str]] = field(default_factory=dict)
    received: dict[int, dict[str, float]] = field(default_factory=dict)
    #: per burst and group: the first and the last request written, over every process
    sent: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)
    idle_ms: Counter[int] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    n_bursts: int = 0
    stop_reason: str = "budget"

    def merge(self, counts: Mapping[str, Mapping[str, int]],
              idle_ms: Mapping[str, int] | None = None,
              statuses: Mapping[str, int] | None = None) -> None:
        for key, outcomes in counts.items():
            self.by_gap.setdefault(key, Counter()).update(outcomes)
            self.total.update(outcomes)
        for ms, n in (idle_ms or {}).items():
            self.idle_ms[int(ms)] += n
        self.statuses.update(statuses or {})

    def _merge_sent(self, index: int, report: Mapping[str, Any]) -> None:
        for group_name, (first, last) in report.get("groups", {}).items():
            key = (index, int(group_name))
            if key in self.sent:
                first, last = min(first, self.sent[key][0]), max(last, self.sent[key][1])
            self.sent[key] = (float(first), float(last))

    def expect(self, index: int, senders: frozenset[str]) -> None:
        """Which processes must report burst `index` before the next one starts."""
        self.expected.setdefault(index, senders)

    @property
    def n_reused(self) -> int:
        """Requests that followed an idle gap (every burst but the first)."""
        return sum(sum(c.values()) for k, c in self.by_gap.items() if k not in (FIRST, STEADY))

    @property
    def n_cycles(self) -> int:
        """Complete passes over the gap schedule: in groups mode, every reused burst in
        which every group fired; else one per len(gaps) reused bursts."""
        if self.sweep == SWEEP_GROUPS:
            groups = set(range(n_groups(self.gaps_s, self.sweep)))
            return sum(1 for index in range(1, self.n_bursts)
                       if {g for i, g in self.sent if i == index} >= groups)
        return max(0, self.n_bursts - 1) // len(self.gaps_s)

    def report(self, sender: str, report: Mapping[str, Any]) -> NextBurst | Stop | None:
        """Merge one process's report; decide once every expected process has reported."""
        self.merge(report["counts"], report.get("idle_ms"), report.get("statuses"))
        index = int(report["index"])
        self._merge_sent(index, report)
        got = self.received.setdefault(index, {})
        if sender in got or index < self.n_bursts:
            return self._check_stop()  # a duplicate or stale report: counts only
        got[sender] = float(report["first_answer"])
        if set(got) < self.expected.get(index, frozenset({sender})):
            return None
        self.n_bursts = index + 1
        stop = self._check_stop(after_burst=True)
        if stop is not None:
            return stop
        return NextBurst(index + 1, min(got.values())
                         + fire_delay_s(self.gaps_s, index + 1, sweep=self.sweep))

    def steady(self, counts: Mapping[str, Mapping[str, int]],
               statuses: Mapping[str, int] | None = None) -> Stop | None:
        """Steady mode: merge, and stop on the unsafe threshold or the request budget only."""
        self.merge(counts, statuses=statuses)
        return self._check_stop()

    def _check_stop(self, *, after_burst: bool = False) -> Stop | None:
        verdict = decide(n_race=n_race_failures(self.total), n_reused=self.n_reused,
                         n_cycles=self.n_cycles, rule=self.rule) if after_burst else (
            "unsafe" if self.rule.unsafe_after_failures
            and n_race_failures(self.total) >= self.rule.unsafe_after_failures else None)
        if verdict is None and self.max_requests and sum(self.total.values()) >= self.max_requests:
            verdict = "max_requests"
        if verdict is not None:
            self.stop_reason = verdict
            return Stop(verdict)
        return None

    def burst_spreads_ms(self) -> list[float]:
        """Per burst and group: first to last request written, over every process (a
        group's planned offset is not spread)."""
        return [round((last - first) * 1000, 3) for _, (first, last) in sorted(self.sent.items())]

    def gap_errors_ms(self) -> list[float]:
        """Per burst and group after a gap: when its first request was written, against the
        plan (the previous burst's first answer plus the group's delay)."""
        errors = []
        for (index, group), (first_sent, _) in sorted(self.sent.items()):
            answers = self.received.get(index - 1)
            if index == 0 or not answers:
                continue
            planned_s = fire_delay_s(self.gaps_s, index, group, sweep=self.sweep)
            errors.append(round((first_sent - min(answers.values()) - planned_s) * 1000, 3))
        return errors

    def results(self, *, mode: str, elapsed_s: float) -> dict[str, Any]:
        return {"mode": mode, "sweep": self.sweep, "stop_reason": self.stop_reason,
                "n_bursts": self.n_bursts,
                "gaps_s": list(self.gaps_s), "counts": dict(self.total),
                "by_gap": {k: dict(v) for k, v in sorted(self.by_gap.items())},
                "n_requests": sum(self.total.values()), "n_reused": self.n_reused,
                "n_cycles": self.n_cycles, "elapsed_s": round(elapsed_s, 3),
                "burst_spread_ms": self.burst_spreads_ms(),
                "gap_error_ms": self.gap_errors_ms(),
                "idle_ms": {str(ms): n for ms, n in sorted(self.idle_ms.items())},
                "statuses": dict(sorted(self.statuses.items())),
                # how many load processes reported each burst (the most over the bursts)
                "n_processes": max((len(got) for got in self.received.values()), default=0)}
