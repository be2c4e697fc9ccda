"""Race-hunting bursts: N requests sent at the same instant on N kept-alive connections,
then an idle gap, repeated.

Why bursts: nginx and most proxies reuse the most recently used idle connection, so steady
load keeps connections hot and never shows the race. A burst makes the proxy open (and then
cache) many upstream connections; the gap lets them all sit idle for about the upstream's
real close time; the next burst reuses them at once, some in the instant the upstream
closes them.

Why raw sockets: the burst must be synchronized. An asyncio HTTP client spreads 30 requests
over ~25 ms, so the upstream's close timers spread the same way and a burst meets at most
one closing connection; 0 failures in 1,200 requests here. Writing all requests in one
tight loop on pre-opened connections puts them within about a millisecond: 12 x 502 in 450
requests (nginx 1.22 -> Node 20 keepAliveTimeout 1000 ms, gaps 1.98-2.02 s, loopback).

This is the lab's small built-in load for `make demo` and the tests; experiments drive Locust.
Every run is bounded by `n_bursts` and `max_seconds` and stops by itself.
"""

from __future__ import annotations

import http.client
import ipaddress
import selectors
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from tuner.analysis.outcomes import Outcome, OutcomeCounts, outcome_of_response
from tuner.errors import ConfigError, LoadError


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class BurstPlan:
    """What to send: `burst_size` simultaneous requests after each gap in `gaps_s` (cycled)."""

    url: str
    gaps_s: Sequence[float]
    burst_size: int = 30
    n_bursts: int = 10
    method: str = "POST"
    body: bytes = b'{"tuner": "race-hunting burst"}'
    max_seconds: float = 60.0
    request_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not _is_loopback(parts.hostname or ""):
            raise ConfigError(f"the lab's burst load only targets http:// on loopback "
                              f"(127.0.0.0/8, ::1); {self.url!r} is not")
        if not self.gaps_s or min(self.gaps_s) <= 0:
            raise ConfigError(f"idle gaps must be a non-empty list of positive seconds, "
                              f"got {list(self.gaps_s)}")
        if self.burst_size < 1 or self.n_bursts < 1:
            raise ConfigError(f"burst_size ({self.burst_size}) and n_bursts ({self.n_bursts}) "
                              "must be at least 1")


@dataclass(frozen=True)
class BurstReport:
    counts: OutcomeCounts
    n_bursts: int
    elapsed_s: float


def straddling_gaps(center_s: float, *, below_s: float, above_s: float,
                    n_steps: int) -> list[float]:
    """`n_steps` evenly spaced gaps from `center_s - below_s` to `center_s + above_s`."""
    if n_steps < 2:
        return [center_s]
    step = (below_s + above_s) / (n_steps - 1)
    return [round(center_s - below_s + i * step, 6) for i in range(n_steps)]


class _Connection:
    """One kept-alive client connection to the proxy."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)

    def close(self) -> None:
        self.sock.close()


class _BurstClient:
    def __init__(self, plan: BurstPlan) -> None:
        parts = urlsplit(plan.url)
        self.plan = plan
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = (f"{plan.method} {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(plan.body)}\r\n\r\n")
        self.request = head.encode() + plan.body
        self.conns: list[_Connection | None] = [None] * plan.burst_size
        self.last_connect_error: OSError | None = None

    def _connect(self, i: int) -> _Connection | None:
        conn = self.conns[i]
        if conn is None:
            try:
                conn = _Connection(self.host, self.port, self.plan.request_timeout_s)
            except OSError as exc:
                self.last_connect_error = exc
                return None
            self.conns[i] = conn
        return conn

    def burst(self) -> tuple[list[Outcome], float]:
        """Send on every connection first (the synchronized part), then read every answer.

        Returns the outcomes and the monotonic time the first answer arrived: the upstream
        starts its idle timers when it answers, so the next gap is measured from there
        (measured from the last answer, it would drift with the time spent reading).
        """
        # Connections dropped by the last burst are re-opened first, so the sends below
        # stay one tight loop.
        ready = [self._connect(i) for i in range(len(self.conns))]
        sent: list[_Connection | None] = []
        for i, conn in enumerate(ready):
            if conn is not None:
                try:
                    conn.sock.sendall(self.request)
                except OSError:
                    self._drop(i)
                    conn = None
            sent.append(conn)
        first_answer_at = _first_readable_at([c for c in sent if c is not None],
                                             timeout_s=self.plan.request_timeout_s)
        outcomes = []
        for i, conn in enumerate(sent):
            if conn is None:
                outcomes.append(Outcome.CONNECT_ERROR)
                continue
            outcome, keep = self._read(conn)
            if not keep:
                self._drop(i)
            outcomes.append(outcome)
        return outcomes, first_answer_at

    def _read(self, conn: _Connection) -> tuple[Outcome, bool]:
        response = http.client.HTTPResponse(conn.sock, method=self.plan.method)
        try:
            response.begin()
            body = response.read()
        except TimeoutError:
            return Outcome.TIMEOUT, False
        except (OSError, http.client.HTTPException):
            # reset, or closed with no (complete) reply: HAProxy's silent close looks so
            return Outcome.RESET, False
        return (outcome_of_response(response.status, body.decode(errors="replace")),
                not response.will_close)

    def _drop(self, i: int) -> None:
        conn = self.conns[i]
        if conn is not None:
            conn.close()
        self.conns[i] = None

    def close(self) -> None:
        for i in range(len(self.conns)):
            self._drop(i)


def _first_readable_at(conns: list[_Connection], *, timeout_s: float) -> float:
    """When the first answer (or close) arrived on any of `conns`."""
    if conns:
        with selectors.DefaultSelector() as selector:
            for conn in conns:
                selector.register(conn.sock, selectors.EVENT_READ)
            selector.select(timeout=timeout_s)
    return time.monotonic()


def run_bursts(plan: BurstPlan, *, on_burst: Callable[[int, OutcomeCounts], None] | None = None
               ) -> BurstReport:
    """Send the bursts; bounded by `plan.n_bursts` and `plan.max_seconds`."""
    counts = OutcomeCounts()
    client = _BurstClient(plan)
    started = time.monotonic()
    deadline = started + plan.max_seconds
    n_done = 0
    gap_s: float | None = None  # the first burst follows no idle gap
    try:
        for i in range(plan.n_bursts):
            outcomes, answered_at = client.burst()
            if all(outcome is Outcome.CONNECT_ERROR for outcome in outcomes):
                raise LoadError(f"could not connect to {plan.url} at all "
                                f"({client.last_connect_error}); is the proxy running?")
            for outcome in outcomes:
                counts.add(outcome, gap_s=gap_s)
            n_done = i + 1
            if on_burst is not None:
                on_burst(n_done, counts)
            gap_s = plan.gaps_s[i % len(plan.gaps_s)]
            if n_done == plan.n_bursts or answered_at + gap_s > deadline:
                break
            time.sleep(max(0.0, answered_at + gap_s - time.monotonic()))
    finally:
        client.close()
    return BurstReport(counts=counts, n_bursts=n_done, elapsed_s=time.monotonic() - started)
