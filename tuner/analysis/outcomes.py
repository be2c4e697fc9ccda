"""How every request ended, in the classes the analysis needs (pure).

A keep-alive race looks different per proxy: nginx answers 502, Envoy 503, and HAProxy may
close the client connection without any status, so "connection reset / empty reply" is a
class of its own, never folded into "other". Envoy answers 503 for other causes too (no
healthy upstream, overflow, connect failure); only the body of a reset on a connection the
upstream ended (response flag UC) marks its race, and the rest are `503_other`.

Served is not only 2xx: a real app often answers the race-hunting request (`POST /`) with
404 or 405, on a connection it keeps; that connection then sits idle and races exactly as
after a 200, so such an answer is `served`, not a failure. What is not served: a request the
server refused as such (400 and its kin, `REFUSED_STATUSES`: Tomcat answers a Host header
with `_` so, and closes the connection), a 5xx, no answer. Whether the upstream kept the
connection cannot be seen through a proxy (the proxy keeps the client's connection either
way), so the experiment's preflight checks that directly (tuner.analysis.preflight).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum


class Outcome(StrEnum):
    OK = "2xx"
    #: served with another status: 3xx, or a 4xx other than REFUSED_STATUSES (404, 405)
    SERVED = "served"
    BAD_GATEWAY = "502"
    UNAVAILABLE = "503"  # the race's 503 (Envoy, flag UC), or a 503 of a record before 503_other
    UNAVAILABLE_OTHER = "503_other"  # a 503 of another cause (no healthy upstream, overflow)
    GATEWAY_TIMEOUT = "504"
    OTHER_STATUS = "other_status"  # not served: a refusal (400, 431, ...), 1xx, other 5xx
    RESET = "reset"  # connection reset or closed with no reply (HAProxy's silent close)
    TIMEOUT = "timeout"  # no answer within the client's timeout
    CONNECT_ERROR = "connect_error"  # the proxy itself refused the connection


#: the outcomes of a request the upstream served (the connection was used as by a 200)
SERVED_OUTCOMES = frozenset({Outcome.OK, Outcome.SERVED})
FAILURES = frozenset(Outcome) - SERVED_OUTCOMES
#: the outcomes that follow the keep-alive race: 502 (nginx), 503 (Envoy), a reset or empty
#: reply (HAProxy's silent close); 504s, timeouts and refused connections have other causes
RACE_OUTCOMES = frozenset({Outcome.BAD_GATEWAY, Outcome.UNAVAILABLE, Outcome.RESET})


#: the end of Envoy's local reply body when the upstream ended the connection before any
#: response header (response flag UC): "upstream connect error or disconnect/reset before
#: headers. reset reason: connection termination" (with retries: "retried and the latest
#: reset reason: connection termination")
ENVOY_RACE_BODY = "reset reason: connection termination"


def outcome_of_response(status: int, body: str) -> Outcome:
    """An HTTP answer as an outcome: a 503 is the race's only with Envoy's UC body."""
    if status == 503 and ENVOY_RACE_BODY not in body:
        return Outcome.UNAVAILABLE_OTHER
    return outcome_of_status(status)


#: statuses by which a server refuses the request itself rather than serving it: bad syntax
#: or an invalid Host (RFC 9110 7.2: a server MUST answer 400 to one), a request not read in
#: time, no length, a request line, body or header fields too large, a Host it does not serve
#: (421), an upgrade it requires. Servers commonly close the connection after them (Tomcat,
#: Go net/http, Node's parser), so a load of them shows nothing of the idle race. A 400 of
#: an app that keeps its connection is refused too: it says the request was not understood,
#: so pick a request the app serves (`--path /healthz --methods GET`).
REFUSED_STATUSES = frozenset({400, 408, 411, 413, 414, 421, 426, 431})


def is_served_status(status: int) -> bool:
    """Did the server serve a request it answered with `status` (not refuse it or fail)?"""
    return 200 <= status < 400 or (400 <= status < 500 and status not in REFUSED_STATUSES)


def outcome_of_status(status: int) -> Outcome:
    if 200 <= status < 300:
        return Outcome.OK
    if is_served_status(status):
        return Outcome.SERVED
    return {502: Outcome.BAD_GATEWAY, 503: Outcome.UNAVAILABLE,
            504: Outcome.GATEWAY_TIMEOUT}.get(status, Outcome.OTHER_STATUS)


@dataclass
class OutcomeCounts:
    """Counts of outcomes, overall and per planned idle gap (seconds, to the millisecond).

    The gap is the planned one; the sleep that makes it is accurate to well under a
    millisecond on an idle machine, far below the gap steps the lab uses (2 ms)."""

    total: Counter[Outcome] = field(default_factory=Counter)
    by_gap_s: dict[float, Counter[Outcome]] = field(default_factory=dict)

    def add(self, outcome: Outcome, *, gap_s: float | None) -> None:
        self.total[outcome] += 1
        if gap_s is not None:
            self.by_gap_s.setdefault(round(gap_s, 3), Counter())[outcome] += 1

    @property
    def n_requests(self) -> int:
        return sum(self.total.values())

    @property
    def n_failed(self) -> int:
        return sum(n for outcome, n in self.total.items() if outcome in FAILURES)

    @property
    def n_502(self) -> int:
        return self.total[Outcome.BAD_GATEWAY]

    def as_dict(self) -> dict[str, int]:
        return {outcome.value: self.total[outcome] for outcome in Outcome}
