"""Measure a server's real idle keep-alive close time with raw sockets.

Design decision: trust nothing the server says. A connection is opened, one request is
answered in full, and then the socket is watched until the server closes it (FIN: recv
returns b""; RST: ECONNRESET). The time from the end of the response to that moment is the
real idle close time; Node 20 advertises `timeout=2` for keepAliveTimeout=2000 and closes
after 3.0 s.
"""

from __future__ import annotations

import http.client
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tuner.errors import ProbeError


@dataclass(frozen=True)
class IdleClose:
    """One sample: how long an idle connection lived after its response, and how it ended."""

    #: seconds from the end of the response to the close; None if still open at the limit
    idle_close_s: float | None
    #: "fin", "rst" or "none"
    close_kind: str
    #: what the Keep-Alive response header advertised, in seconds, if anything
    advertised_s: float | None


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


def sample_idle_close(host: str, port: int, *, path: str = "/", max_idle_s: float = 600.0
                      ) -> IdleClose:
    """Open one connection, GET `path`, then time the server's close of the idle socket."""
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except OSError as exc:
        raise ProbeError(f"cannot connect to {host}:{port}: {exc.strerror or exc}; is the "
                         "server running and listening there?") from exc
    with sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        response = http.client.HTTPResponse(sock, method="GET")
        try:
            response.begin()
            response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ProbeError(f"{host}:{port} did not answer HTTP/1.1 to GET {path}: "
                             f"{exc!r}") from exc
        answered_at = time.monotonic()
        advertised_s = parse_keep_alive_timeout(response.getheader("Keep-Alive"))
        if response.will_close:
            return IdleClose(0.0, "fin", advertised_s)
        sock.settimeout(max_idle_s)
        try:
            data = sock.recv(1)
        except TimeoutError:
            return IdleClose(None, "none", advertised_s)
        except ConnectionResetError:
            return IdleClose(time.monotonic() - answered_at, "rst", advertised_s)
        closed_at = time.monotonic()
        if data:
            raise ProbeError(f"{host}:{port} sent unrequested data on an idle connection")
        return IdleClose(closed_at - answered_at, "fin", advertised_s)


def sample_idle_closes(host: str, port: int, *, samples: int, path: str = "/",
                       max_idle_s: float = 600.0) -> list[IdleClose]:
    """`samples` connections measured in parallel, so the wait is one idle period."""
    with ThreadPoolExecutor(max_workers=samples) as pool:
        futures = [pool.submit(sample_idle_close, host, port, path=path, max_idle_s=max_idle_s)
                   for _ in range(samples)]
        return [future.result() for future in futures]
