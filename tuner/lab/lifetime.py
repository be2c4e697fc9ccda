"""Measure how long a proxy really keeps an idle upstream connection: the probe's mirror.

The probe measures the upstream's side (how long it keeps an idle connection). This
measures the proxy's: a real proxy process, started with the setting under test, in front
of an upstream of ours that never closes and stamps, for every connection, when it sent its
last response and when the proxy closed the connection. The difference is the connection's
idle lifetime in the proxy's pool.

Why it matters: the model compares the upstream's close with the proxy's *lifetime*, and a
proxy's setting is not always its lifetime. nginx closes on `keepalive_timeout` (a few ms
late); HAProxy has no idle timer for server connections at all: every `pool-purge-delay` it
closes about half of the idle ones above its estimate of need, so some live 2-3 times the
setting (see tuner/lab/haproxy.py). Margins, verdicts and recommendations use the measured
maximum.

Loopback only, bounded: one burst of `n_connections` requests, then a wait of at most
`wait_limit_s(proxy_idle_s)`.
"""

from __future__ import annotations

import shutil
import socketserver
import tempfile
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tuner.errors import Cancelled, LabError
from tuner.lab.lab import get_proxy_class
from tuner.lab.process import LOOPBACK, pick_free_port
from tuner.load.bursts import BurstPlan, run_bursts

#: connections the burst opens in the proxy's pool: enough for HAProxy's purge, which
#: closes "about half of those above need" per period, to show its long tail
N_CONNECTIONS = 16
_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


def wait_limit_s(proxy_idle_s: float) -> float:
    """How long to wait for the last close. Measured with 16 pooled connections: HAProxy
    2.6's lived up to 6x its `pool-purge-delay` (3.0 s at 500 ms, 5.0 s at 1 s); nginx's
    within 2 ms of `keepalive_timeout`. 8x plus 2 s leaves room, and the wait ends as soon
    as every connection closed."""
    return 8 * proxy_idle_s + 2.0


@dataclass(frozen=True)
class Lifetime:
    """The idle lifetimes of the connections a proxy pooled, at one setting."""

    proxy: str
    proxy_idle_s: float
    lifetimes_s: tuple[float, ...]
    #: connections still open when the wait ended (their lifetime is at least `waited_s`)
    n_still_open: int
    waited_s: float

    @property
    def max_s(self) -> float | None:
        """The longest idle lifetime; the wait itself when a connection outlived it."""
        if self.n_still_open:
            return self.waited_s
        return max(self.lifetimes_s) if self.lifetimes_s else None

    @property
    def min_s(self) -> float | None:
        return min(self.lifetimes_s) if self.lifetimes_s else None


class _Stamps:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_response_at: dict[int, float] = {}
        self.closed_at: dict[int, float] = {}

    def lifetimes(self) -> tuple[list[float], int]:
        with self.lock:
            done = [self.closed_at[c] - self.last_response_at[c] for c in self.closed_at
                    if c in self.last_response_at]
            n_open = sum(1 for c in self.last_response_at if c not in self.closed_at)
        return done, n_open


class _NeverClosingHandler(socketserver.BaseRequestHandler):
    """Answers every request on a connection and never closes it; stamps the times."""

    server: _StampingServer

    def handle(self) -> None:
        stamps, conn_id = self.server.stamps, id(self)
        buffer = b""
        while True:
            try:
                chunk = self.request.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                with stamps.lock:
                    stamps.closed_at[conn_id] = time.monotonic()
                return
            buffer += chunk
            while b"\r\n\r\n" in buffer:
                head, _, rest = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip() or 0)
                if len(rest) < length:
                    break
                buffer = rest[length:]
                self.request.sendall(_RESPONSE)
                with stamps.lock:
                    stamps.last_response_at[conn_id] = time.monotonic()


class _StampingServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__((LOOPBACK, 0), _NeverClosingHandler)
        self.stamps = _Stamps()

    @property
    def port(self) -> int:
        port: int = self.server_address[1]
        return port


def measure_lifetime(proxy: str, proxy_idle_s: float, *,
                     n_connections: int = N_CONNECTIONS,
                     cancel: threading.Event | None = None) -> Lifetime:
    """Start `proxy` with `proxy_idle_s` in front of a never-closing upstream, fill its pool
    with one burst, and time how long each pooled connection stays open. `cancel`: stop
    waiting (Cancelled) when the run is interrupted."""
    server = _StampingServer()
    thread = threading.Thread(target=server.serve_forever, name="tuner-lifetime", daemon=True)
    thread.start()
    workdir = Path(tempfile.mkdtemp(prefix=f"tuner-lifetime-{proxy}-"))
    instance = get_proxy_class(proxy)(workdir=workdir, listen_port=pick_free_port(),
                                      upstream_port=server.port)
    try:
        instance.start(proxy_idle_s=proxy_idle_s)
        run_bursts(BurstPlan(url=instance.url + "/", gaps_s=[1.0], burst_size=n_connections,
                             n_bursts=1, max_seconds=30))
        started = time.monotonic()
        limit_s = wait_limit_s(proxy_idle_s)
        while time.monotonic() - started < limit_s:
            done, n_open = server.stamps.lifetimes()
            if done and not n_open:
                break
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"measuring {proxy}'s idle lifetime stopped: the run was "
                                "interrupted")
            time.sleep(0.01)
        done, n_open = server.stamps.lifetimes()
        if not done and not n_open:
            raise LabError(f"{proxy} at 127.0.0.1:{instance.listen_port} opened no "
                           f"connection to the stamping upstream on port {server.port}; its "
                           f"error log: {instance.error_log.path}")
        return Lifetime(proxy, proxy_idle_s, tuple(sorted(done)), n_open,
                        round(time.monotonic() - started, 3))
    finally:
        instance.stop()
        server.shutdown()
        server.server_close()
        shutil.rmtree(workdir, ignore_errors=True)


def measure_lifetimes(proxy: str, settings_s: Iterable[float], *,
                      cancel: threading.Event | None = None) -> dict[float, Lifetime]:
    """Every setting at once (each with a proxy of its own): the wall time is that of the
    longest setting, not their sum."""
    values = sorted(set(settings_s))
    with ThreadPoolExecutor(max_workers=max(1, len(values))) as pool:
        results = pool.map(lambda s: measure_lifetime(proxy, s, cancel=cancel), values)
        return dict(zip(values, results, strict=True))

