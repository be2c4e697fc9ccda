"""Ground truth for an idle-close rule, without the probe: staggered raw reuse.

`n_dropped(port, idle_s=D)` opens `n` connections, answers one request on each at instants
spread evenly over `span_s` (so a sweeping server's sweeps meet them at every phase), leaves
each idle exactly D after its own answer, then sends a second request on it. A connection
that is closed by then, or whose second request gets no answer, is dropped: a proxy keeping
connections D idle would have raced on it (or, had it seen the FIN, opened a new one).
One thread, blocking sockets, events in time order: each round trip takes about a
millisecond on loopback, far below the sweep periods and idle ages it tells apart.
"""

from __future__ import annotations

import http.client
import select
import socket
import time

_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def _round_trip(sock: socket.socket) -> bool:
    """One request and its whole answer; False when the connection is gone."""
    try:
        sock.sendall(_REQUEST)
        response = http.client.HTTPResponse(sock)
        response.begin()
        response.read()
        return not response.will_close
    except (OSError, http.client.HTTPException):
        return False


def _is_closed(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def n_dropped(port: int, *, idle_s: float, n: int = 40, span_s: float,
              host: str = "127.0.0.1", timeout_s: float = 5.0) -> int:
    """How many of `n` staggered connections, each idle exactly `idle_s`, were dropped."""
    start = time.monotonic() + 0.2
    # each connection is opened just before its first request: a server times out a
    # connection that sent nothing, too (Tomcat's connectionTimeout)
    socks: list[socket.socket] = []
    try:
        # (when, index, is_reuse): answers spread over the span, each reuse idle_s later
        events = sorted([(start + i * span_s / n, i, False) for i in range(n)])
        dropped = 0
        while events:
            when, i, is_reuse = events.pop(0)
            time.sleep(max(0.0, when - time.monotonic()))
            if not is_reuse:
                socks.append(socket.create_connection((host, port), timeout=timeout_s))
                if not _round_trip(socks[i]):
                    raise AssertionError(f"connection {i} was not served its first request")
                events.append((time.monotonic() + idle_s, i, True))
                events.sort()
            elif _is_closed(socks[i]) or not _round_trip(socks[i]):
                dropped += 1
        return dropped
    finally:
        for sock in socks:
            sock.close()
