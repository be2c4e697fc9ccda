"""The preflight's requests on a running lab: one straight to the upstream, one through the
proxy, per method of the mix, each on a fresh connection (what they mean, and the verdict:
tuner.analysis.preflight).

Design decision: raw sockets and `http.client.HTTPResponse`, as the probe does, so the
request is exactly the load's (method, path, Host, the same body) and the connection can be
watched after the answer: a server may close it without saying `Connection: close`, which
only a read that meets EOF shows.
"""

from __future__ import annotations

import contextlib
import http.client
import select
import socket
import time

from tuner.analysis.preflight import (
    SHOWN_HEADERS,
    Answer,
    MethodCheck,
    PreflightResult,
    judge_preflight,
)
from tuner.lab.lab import Lab
from tuner.lab.process import LOOPBACK
from tuner.load.methods import parse_method_mix

#: what the load sends with POST, PUT and PATCH (tuner.load.locust_keepalive)
BODY = b'{"tuner": "race-hunting"}'
BODY_METHODS = ("POST", "PUT", "PATCH")
#: how long to wait for a close after the answer: a server that closes after answering does
#: so at once (Tomcat after its 400: within a millisecond); a quarter of the idle timeout at
#: most, so an idle close is never taken for one
PEEK_S = 0.25
ANSWER_TIMEOUT_S = 10.0
#: answers are read in full to see the connection's state after them; bound what is kept
_MAX_BODY = 1 << 20


def ask(port: int, *, method: str, path: str, host: str, peek_s: float = PEEK_S,
        timeout_s: float = ANSWER_TIMEOUT_S) -> Answer:
    """Send one request to 127.0.0.1:`port` on a fresh connection; the answer, and whether
    the server ended the connection within `peek_s` after it."""
    body = BODY if method in BODY_METHODS else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tuner-preflight\r\n"
    if method in BODY_METHODS:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    try:
        sock = socket.create_connection((LOOPBACK, port), timeout=timeout_s)
    except OSError as exc:
        return Answer(None, error=f"connecting to {LOOPBACK}:{port}: {exc.strerror or exc}")
    with contextlib.closing(sock):
        try:
            sock.sendall(head.encode() + b"\r\n" + body)
            response = http.client.HTTPResponse(sock, method=method)
            response.begin()
            response.read(_MAX_BODY)
        except TimeoutError:
            return Answer(None, error=f"no answer within {timeout_s:g} s")
        except (OSError, http.client.HTTPException) as exc:
            return Answer(None, error=f"{type(exc).__name__}: {exc}".rstrip(": "))
        headers = {name: value for name in SHOWN_HEADERS
                   if (value := response.getheader(name)) is not None}
        closed_by = None
        if response.will_close:
            closed_by = ("Connection: close" if "close" in headers.get("Connection", "").lower()
                         else f"an HTTP/{response.version / 10:g} answer without keep-alive")
        else:
            closed_by = _closed_within(sock, peek_s)
        return Answer(response.status, response.reason, headers, closed_by)


def _closed_within(sock: socket.socket, peek_s: float) -> str | None:
    """How the server ended the connection within `peek_s` of its answer, or None."""
    answered = time.monotonic()
    readable, _, _ = select.select([sock], [], [], peek_s)
    if not readable:
        return None
    try:
        data = sock.recv(1, socket.MSG_PEEK)
    except OSError as exc:
        return f"reset it: {exc.strerror or exc}"
    if data:
        return None  # bytes beyond the answer: not a close (the load would see them)
    elapsed_ms = (time.monotonic() - answered) * 1000
    return f"closed it {elapsed_ms:.0f} ms after answering, without Connection: close"


def preflight(lab: Lab, *, methods: str, path: str) -> PreflightResult:
    """Ask the running `lab` once per method of the mix, straight and through the proxy,
    with the Host its proxy sends the upstream; judge the answers."""
    proxy, upstream = lab.proxy, lab.upstream
    assert proxy is not None and upstream is not None, "preflight needs a running lab"
    idle_s = upstream.idle_s or PEEK_S * 4
    peek_s = min(PEEK_S, idle_s / 4)
    checks = []
    for method in dict.fromkeys(parse_method_mix(methods)):  # each method once, in order
        direct = ask(upstream.port, method=method, path=path, host=proxy.upstream_host,
                     peek_s=peek_s)
        proxied = ask(proxy.listen_port, method=method, path=path,
                      host=f"{LOOPBACK}:{proxy.listen_port}", peek_s=0)
        checks.append(MethodCheck(method, direct, proxied))
    return judge_preflight(checks, path=path, host=proxy.upstream_host,
                           upstream_url=upstream.url, proxy=proxy.name, proxy_url=proxy.url)
