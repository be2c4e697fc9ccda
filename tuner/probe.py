"""`tuner probe`: measure a server's real idle keep-alive close time.

Design decision: trust nothing the server says. Each sample connection gets one request
answered in full, then the socket is watched until the server closes it (FIN: recv returns
b""; RST: ECONNRESET). The time from the end of the response to that moment is the real idle
close time; Node 20 advertises `timeout=2` for keepAliveTimeout=2000 and closes after 3.0 s.

All samples are watched together in one selector loop, and close times are stamped the
moment the loop sees them (no thread hand-offs). One extra connection, answered `stagger_s`
after the samples, is reused the instant the first sample closes: its idle age is then just
under the measured close time, and it must be served.

Some servers close by a periodic sweep instead of a timer per connection, and then the
samples, answered together, all see one phase of it (a 2 s setting swept every 10 s closed
them after anything from 2 to 12 s). So while the samples wait, more connections are
answered at staggered instants, ever further apart, until the first close: every sweep then
meets connections of many ages, and `tuner.analysis.closes` reads the rule from which of them
it closed. The probe ends at the second close instant after the samples' (a timer server: a
moment after the first; a sweep: one period later), so it costs one idle period plus, for a
sweeping server, one sweep period.
"""

from __future__ import annotations

import http.client
import math
import selectors
import socket
import ssl
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tuner.analysis.closes import SAME_INSTANT_S, CloseRule, Observed, infer_close_rule
from tuner.errors import ConfigError, ProbeError

#: The window check's connection is answered this long after the samples, so when the first
#: sample closes it has been idle this much less than the measured close time.
DEFAULT_STAGGER_S = 0.1
#: Staggered connections: the first this long after the samples, then each this far after
#: the last or `STAGGER_GROWTH_RATE` of the time since the samples, whichever is longer. A
#: sweep then meets connections whose ages differ by at most 5 % of its period (0.5 s at a
#: 10 s sweep), and a probe of a server that closes after 60 s holds about 100 connections.
STAGGER_MIN_SPACING_S = 0.05
STAGGER_GROWTH_RATE = 0.05
#: at most this many staggered connections per probe (file descriptors, the server's limits)
MAX_STAGGERED = 150
CONNECT_TIMEOUT_S = 10.0
RESPONSE_TIMEOUT_S = 10.0
_BODY_METHODS = ("POST", "PUT", "PATCH")


@dataclass(frozen=True)
class ProbeTarget:
    """Where and what to send: a parsed, validated URL plus request options."""

    url: str
    scheme: str
    host: str
    port: int
    path: str
    method: str = "GET"
    host_header: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    verify_tls: bool = True

    def request_bytes(self) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {self.host_header}"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        if self.method in _BODY_METHODS and not any(
                name.lower() == "content-length" for name in self.headers):
            lines.append("Content-Length: 0")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_target(url: str, *, method: str = "GET", host_header: str | None = None,
                 headers: Mapping[str, str] | None = None, verify_tls: bool = True
                 ) -> ProbeTarget:
    """Validate `url` (http or https, a host, an optional port); ConfigError if it is not."""
    parts = urlsplit(url)
    if (parts.scheme not in ("http", "https") or not parts.hostname
            or any(c.isspace() for c in url)):
        raise ConfigError(f"URL {url!r} is not an http:// or https:// URL with a host; "
                          "write e.g. http://127.0.0.1:8080/health")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError(f"URL {url!r} has an invalid port") from None
    if not method.isalpha():
        raise ConfigError(f"--method {method!r} is not an HTTP method")
    if host_header is not None and (not host_header or any(c.isspace() for c in host_header)):
        raise ConfigError(f"--host {host_header!r} is not a Host header value, e.g. "
                          "api.internal or api.internal:8080")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return ProbeTarget(url=url, scheme=parts.scheme, host=parts.hostname, port=port, path=path,
                       method=method.upper(), host_header=host_header or parts.netloc,
                       headers=dict(headers or {}), verify_tls=verify_tls)


@dataclass(frozen=True)
class Sample:
    """One connection: how long it lived idle after its response, and how it ended."""

    #: seconds from the end of the response to the close; None if it was not closed
    idle_close_s: float | None
    #: "fin", "rst", "none" (open and still served at the limit), or "on_next_request"
    #: (open at the limit, but a request sent on it was dropped)
    close_kind: str
    advertised_s: float | None


@dataclass(frozen=True)
class WindowCheck:
    """A connection reused just before the measured close time: was it served?"""

    reused_at_idle_s: float | None
    served: bool
    status: int | None
    note: str
    #: set when the check connection, answered later, was closed before it could be reused
    closed_first_idle_s: float | None = None


@dataclass(frozen=True)
class ProbeResult:
    url: str
    samples: list[Sample]
    window: WindowCheck | None
    elapsed_s: float
    max_idle_s: float
    #: False when the server closed after its response (Connection: close, HTTP/1.0)
    keeps_alive: bool = True
    #: the close rule read from the samples and the staggered connections together
    rule: CloseRule | None = None
    #: how many staggered connections were answered besides the samples
    n_staggered: int = 0

    @property
    def closes_s(self) -> list[float]:
        return sorted(s.idle_close_s for s in self.samples if s.idle_close_s is not None)

    @property
    def advertised_s(self) -> float | None:
        return next((s.advertised_s for s in self.samples if s.advertised_s is not None), None)

    @property
    def idle_close_s(self) -> float | None:
        return self.closes_s[0] if self.closes_s else None

    @property
    def closes_by_sweep(self) -> bool:
        return self.rule is not None and self.rule.closes_by_sweep

    @property
    def sweep_period_s(self) -> float | None:
        return self.rule.sweep_period_s if self.rule is not None else None

    @property
    def earliest_close_s(self) -> float | None:
        """The earliest idle age at which the server may close a connection, to plan with:
        the youngest close seen, or, for a server that sweeps, the oldest age a sweep was
        seen to leave open; earlier still if a connection reused earlier was dropped
        (gunicorn sweeps expired connections about once a second, so it can close at 1.1 s
        yet refuse reuse at 1.0 s)."""
        window = self.window
        candidates = [self.idle_close_s,
                      self.rule.earliest_close_s if self.rule is not None else None]
        if window is not None:
            candidates.append(window.closed_first_idle_s)
            if not window.served:
                candidates.append(window.reused_at_idle_s)
        known = [c for c in candidates if c is not None]
        return min(known) if known else None

    @property
    def close_kind(self) -> str:
        """The most common way the server ended idle connections: fin, rst or none."""
        kinds = Counter(s.close_kind for s in self.samples if s.close_kind in ("fin", "rst"))
        return kinds.most_common(1)[0][0] if kinds else "none"

    @property
    def closes_on_next_request(self) -> bool:
        return any(s.close_kind == "on_next_request" for s in self.samples)

    def as_json(self) -> dict[str, object]:
        closes = self.closes_s
        return {
            "url": self.url,
            "advertised_s": self.advertised_s,
            "idle_close_s": _round(self.idle_close_s),
            "idle_close_median_s": _round(statistics.median(closes)) if closes else None,
            "idle_close_max_s": _round(closes[-1]) if closes else None,
            "earliest_close_s": _round(self.earliest_close_s),
            "closes_by_sweep": self.closes_by_sweep,
            "sweep_period_s": _round(self.sweep_period_s),
            "sweep": None if self.rule is None else {
                "youngest_close_s": _round(self.rule.youngest_close_s),
                "oldest_survivor_s": _round(self.rule.oldest_survivor_s),
                "n_close_instants": len(self.rule.close_instants),
                "n_staggered": self.n_staggered},
            "close_kind": self.close_kind,
            "closes_on_next_request": self.closes_on_next_request,
            "keeps_alive": self.keeps_alive,
            "samples": len(self.samples),
            "sample_closes": [
                {"idle_close_s": _round(s.idle_close_s), "close_kind": s.close_kind}
                for s in self.samples],
            "window": None if self.window is None else {
                "reused_at_idle_s": _round(self.window.reused_at_idle_s),
                "served": self.window.served, "status": self.window.status,
                "closed_first_idle_s": _round(self.window.closed_first_idle_s),
                "note": self.window.note},
            "max_idle_s": self.max_idle_s,
            "elapsed_s": _round(self.elapsed_s),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def parse_keep_alive_timeout(header: str | None) -> float | None:
    """The `timeout=N` of a Keep-Alive header, in seconds (pure)."""
    if not header:
        return None
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key.strip().lower() == "timeout":
            try:
                return float(value.strip())
            except ValueError:
                return None
    return None


class _Conn:
    """One probe connection and what happened to it."""

    def __init__(self, target: ProbeTarget, *, until: float = math.inf,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 answer_timeout_s: float = RESPONSE_TIMEOUT_S) -> None:
        self.target = target
        #: time.monotonic() by which the whole probe must end (its total deadline)
        self.until = until
        self.answer_timeout_s = answer_timeout_s
        try:
            raw = socket.create_connection((target.host, target.port),
                                           timeout=self.timeout_s(connect_timeout_s))
        except OSError as exc:
            raise ProbeError(
                f"cannot connect to {target.host}:{target.port} ({target.url}): "
                f"{exc.strerror or exc}; is the server running and listening there?") from exc
        if target.scheme == "https":
            context = ssl.create_default_context()
            if not target.verify_tls:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            try:
                raw = context.wrap_socket(raw, server_hostname=target.host)
            except (OSError, ssl.SSLError) as exc:
                raw.close()
                raise ProbeError(f"TLS handshake with {target.host}:{target.port} failed: "
                                 f"{exc}; is it an https server? (--insecure skips "
                                 "certificate checks)") from exc
        self.sock: socket.socket = raw
        self.answered_at: float | None = None
        self.advertised_s: float | None = None
        self.kept_alive = True
        self.closed_at: float | None = None
        self.close_kind = "none"

    def timeout_s(self, limit_s: float) -> float:
        """`limit_s`, or less when the probe's total deadline comes first."""
        left_s = self.until - time.monotonic()
        if left_s <= 0:
            raise _deadline_passed(self.target)
        return min(limit_s, left_s)

    def round_trip(self) -> http.client.HTTPResponse:
        """Send the request and read the whole response, blocking; OSError/HTTPException
        when the server does not answer."""
        self.sock.setblocking(True)
        self.sock.settimeout(self.timeout_s(self.answer_timeout_s))
        self.sock.sendall(self.target.request_bytes())
        response = http.client.HTTPResponse(self.sock, method=self.target.method)
        response.begin()
        response.read()
        return response

    def exchange(self) -> http.client.HTTPResponse:
        """The first request of a sample: a server that does not answer is an error."""
        try:
            response = self.round_trip()
        except (OSError, http.client.HTTPException) as exc:
            raise ProbeError(f"{self.target.url} did not answer HTTP/1.1 to "
                             f"{self.target.method} {self.target.path}: {exc!r}") from exc
        self.answered_at = time.monotonic()
        self.advertised_s = parse_keep_alive_timeout(response.getheader("Keep-Alive"))
        self.kept_alive = not response.will_close
        return response

    def poll_closed(self) -> bool:
        """Read what is there without blocking; True once the server has closed."""
        try:
            data = self.sock.recv(4096)
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        except OSError:  # ECONNRESET, or a TLS layer torn down by one
            self._closed("rst")
            return True
        if not data:
            self._closed("fin")
            return True
        return False  # e.g. a "408 Request Timeout" some servers send before closing

    def _closed(self, kind: str) -> None:
        self.closed_at = time.monotonic()
        self.close_kind = kind

    def sample(self) -> Sample:
        assert self.answered_at is not None
        idle = None if self.closed_at is None else self.closed_at - self.answered_at
        return Sample(idle, self.close_kind, self.advertised_s)

    def close(self) -> None:
        self.sock.close()


def _deadline_passed(target: ProbeTarget) -> ProbeError:
    return ProbeError(f"probing {target.url} did not finish within its total deadline: the "
                      "server answered too slowly; probe again with a longer --max-idle")


def _reuse(conn: _Conn) -> tuple[bool, int | None]:
    """Send one more request on an idle connection: (served, status)."""
    try:
        return True, conn.round_trip().status
    except (OSError, http.client.HTTPException):
        return False, None


def probe(target: ProbeTarget, *, n_samples: int = 5, max_idle_s: float = 600.0,
          stagger_s: float = DEFAULT_STAGGER_S, max_staggered: int = MAX_STAGGERED,
          on_progress: Callable[[float, int], None] | None = None,
          deadline_s: float | None = None, connect_timeout_s: float = CONNECT_TIMEOUT_S,
          answer_timeout_s: float = RESPONSE_TIMEOUT_S) -> ProbeResult:
    """Measure how long `target` keeps idle keep-alive connections; see the module doc.
    With `deadline_s`, the whole probe ends within that (a ProbeError if it could not
    finish), however slowly the server answers. `connect_timeout_s` and `answer_timeout_s`
    bound each connect and each answer (a scan of many pods lowers them so one silent pod
    costs seconds, not the default ten). `max_staggered`: the most staggered connections
    (0: none, then a sweeping server is seen in one phase only)."""
    if n_samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {n_samples}")
    started = time.monotonic()
    until = math.inf if deadline_s is None else started + deadline_s
    conns: list[_Conn] = []
    checker: _Conn | None = None
    stagger = _Stagger(target, until=until, max_conns=max_staggered,
                       connect_timeout_s=connect_timeout_s, answer_timeout_s=answer_timeout_s)
    try:
        options = {"connect_timeout_s": connect_timeout_s, "answer_timeout_s": answer_timeout_s}
        for _ in range(n_samples):
            conns.append(_Conn(target, until=until, **options))
        checker = _Conn(target, until=until, **options)
        for conn in conns:
            conn.exchange()
        if not all(conn.kept_alive for conn in conns):
            return ProbeResult(url=target.url, samples=[
                Sample(None, "none", c.advertised_s) for c in conns], window=None,
                elapsed_s=time.monotonic() - started, max_idle_s=max_idle_s, keeps_alive=False)
        time.sleep(stagger_s)
        checker.exchange()
        window = _watch(conns, checker, stagger, max_idle_s=max_idle_s,
                        on_progress=on_progress)
        for conn in conns:
            if conn.closed_at is None:
                served, _ = _reuse(conn)
                conn.close_kind = "none" if served else "on_next_request"
        observed = [Observed(c.answered_at, c.closed_at) for c in (*conns, *stagger.conns)
                    if c.answered_at is not None]
        return ProbeResult(url=target.url, samples=[c.sample() for c in conns], window=window,
                           elapsed_s=time.monotonic() - started, max_idle_s=max_idle_s,
                           rule=infer_close_rule(observed), n_staggered=len(stagger.conns))
    finally:
        for conn in (*conns, *stagger.conns):
            conn.close()
        if checker is not None:
            checker.close()


class _Stagger:
    """The staggered connections: answered one at a time, ever further apart, from the
    samples until the first close (see STAGGER_GROWTH_RATE)."""

    def __init__(self, target: ProbeTarget, *, until: float, max_conns: int,
                 connect_timeout_s: float, answer_timeout_s: float) -> None:
        self.target = target
        self.until = until
        self.max_conns = max_conns
        self.options = {"connect_timeout_s": connect_timeout_s,
                        "answer_timeout_s": answer_timeout_s}
        self.conns: list[_Conn] = []
        #: the staggered connections not closed yet
        self.watched: set[_Conn] = set()
        self.origin = 0.0
        self.next_at = math.inf

    def start(self, origin: float) -> None:
        self.origin = origin
        self.next_at = origin + STAGGER_MIN_SPACING_S if self.max_conns > 0 else math.inf

    def stop(self) -> None:
        self.next_at = math.inf

    def open_one(self, selector: selectors.BaseSelector) -> None:
        """Answer one more connection now and watch it; the blocking round trip takes about
        a millisecond on loopback (closes seen meanwhile are stamped when it returns)."""
        try:
            conn = _Conn(self.target, until=self.until, **self.options)
        except ProbeError:  # a server at its connection limit: the samples still count
            self.stop()
            return
        try:
            conn.exchange()
        except ProbeError:
            conn.close()
            self.stop()
            return
        if not conn.kept_alive:  # its close would read as an idle close at age 0
            conn.close()
            self.stop()
            return
        self.conns.append(conn)
        self.watched.add(conn)
        conn.sock.setblocking(False)
        selector.register(conn.sock, selectors.EVENT_READ, conn)
        now = time.monotonic()
        if len(self.conns) >= self.max_conns:
            self.stop()
        else:
            self.next_at = now + max(STAGGER_MIN_SPACING_S,
                                     STAGGER_GROWTH_RATE * (now - self.origin))


def _watch(conns: list[_Conn], checker: _Conn, stagger: _Stagger, *, max_idle_s: float,
           on_progress: Callable[[float, int], None] | None) -> WindowCheck | None:
    """Wait for every sample to close (or reach `max_idle_s`) and for a second close
    instant; reuse `checker` at the first close; answer the staggered connections until then.

    Every ready socket of a wake-up is stamped before anything else is done, and the reuse
    is sent without blocking and its answer read from the same loop, so no close is
    stamped late because the loop was busy.
    """
    selector = selectors.DefaultSelector()
    for conn in (*conns, checker):
        conn.sock.setblocking(False)
        selector.register(conn.sock, selectors.EVENT_READ, conn)
    first_answer = min(c.answered_at for c in conns if c.answered_at is not None)
    deadline = first_answer + max_idle_s
    check = _WindowCheckInFlight(checker)
    stagger.start(time.monotonic())
    n_open = len(conns)
    first_close_at: float | None = None
    #: when the second close instant has been seen in full (its group's last closes stamped)
    rule_seen_at = math.inf
    next_progress = time.monotonic() + 1.0
    try:
        while True:
            now = time.monotonic()
            # a timer server's second close instant comes a moment after the first (the
            # next staggered connection); a sweeping server's, one sweep period later
            rule_seen = now >= rule_seen_at or not stagger.watched
            samples_done = (n_open == 0 and rule_seen) or now >= deadline
            if samples_done and check.is_done(now):
                break
            if now >= checker.until:
                raise _deadline_passed(checker.target)
            if now >= stagger.next_at:
                stagger.open_one(selector)
                continue
            until = min(check.reply_deadline if samples_done else deadline, checker.until,
                        stagger.next_at, rule_seen_at)
            for key, _ in selector.select(timeout=min(1.0, max(0.0, until - now))):
                watched: _Conn = key.data
                if watched is checker:
                    if check.on_readable():
                        selector.unregister(checker.sock)
                elif watched.poll_closed():
                    selector.unregister(watched.sock)
                    assert watched.closed_at is not None
                    if watched in stagger.watched:
                        stagger.watched.discard(watched)
                    else:
                        n_open -= 1
                    if first_close_at is None:
                        first_close_at = watched.closed_at
                        stagger.stop()
                    elif (watched.closed_at > first_close_at + SAME_INSTANT_S
                          and rule_seen_at == math.inf):
                        # the rest of this sweep's closes are stamped before the end, or
                        # they would count as connections it left open
                        rule_seen_at = watched.closed_at + SAME_INSTANT_S
            if n_open < len(conns) and not check.started:
                check.reuse_now()
            if on_progress is not None and time.monotonic() >= next_progress:
                on_progress(time.monotonic() - first_answer, n_open)
                next_progress += 1.0
    finally:
        selector.close()
    return check.result


class _WindowCheckInFlight:
    """The check connection's state: idle, reused (awaiting the answer), or resolved."""

    def __init__(self, conn: _Conn) -> None:
        self.conn = conn
        self.started = False
        self.reused_at_idle_s: float | None = None
        self.reply_deadline = float("inf")
        self.reply = bytearray()
        self.result: WindowCheck | None = None

    def is_done(self, now: float) -> bool:
        if not self.started:
            return True  # no sample closed: nothing to check against
        if self.result is None and now >= self.reply_deadline:
            self.result = WindowCheck(
                self.reused_at_idle_s, False, None,
                f"NOT served: no answer within {self.conn.answer_timeout_s:g} s")
        return self.result is not None

    def reuse_now(self) -> None:
        self.started = True
        if self.result is not None:
            return  # it closed before the first sample did
        assert self.conn.answered_at is not None
        self.reused_at_idle_s = time.monotonic() - self.conn.answered_at
        self.reply_deadline = time.monotonic() + self.conn.answer_timeout_s
        try:
            self.conn.sock.send(self.conn.target.request_bytes())  # small: fits the buffer
        except OSError:
            self._resolve_not_served()

    def on_readable(self) -> bool:
        """Handle data or a close on the check connection; True once resolved."""
        if not self.started:
            if self.conn.poll_closed():
                assert self.conn.answered_at is not None and self.conn.closed_at is not None
                age_s = self.conn.closed_at - self.conn.answered_at
                self.result = WindowCheck(
                    None, False, None,
                    f"the check connection, answered later, was closed no later than the "
                    f"first sample, after only {age_s:.3f} s idle (the server closes by a "
                    "periodic sweep); plan with that shorter time", closed_first_idle_s=age_s)
                return True
            return False
        try:
            data = self.conn.sock.recv(4096)
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        except OSError:
            data = b""
        if not data:
            self._resolve_not_served()
            return True
        self.reply += data
        if b"\r\n" not in self.reply:
            return False
        status_line = bytes(self.reply).split(b"\r\n", 1)[0].split()
        if len(status_line) >= 2 and status_line[0].startswith(b"HTTP/") \
                and status_line[1].isdigit():
            self.result = WindowCheck(
                self.reused_at_idle_s, True, int(status_line[1]),
                "served: a connection reused just before the measured close is safe")
        else:
            self._resolve_not_served()
        return True

    def _resolve_not_served(self) -> None:
        self.result = WindowCheck(
            self.reused_at_idle_s, False, None,
            f"NOT served: the server dropped a connection idle {self.reused_at_idle_s or 0:.3f} "
            "s, before the measured close; plan with that shorter time")
