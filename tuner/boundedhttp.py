"""A small HTTP/1.x server whose every resource is bounded: the sidecar's endpoints.

Design decision: a slow client costs a file descriptor for a few seconds, never a thread.
One I/O thread accepts connections and reads each request head without blocking, under a
deadline (`head_deadline_s`, counted from the accept, not per byte: a client that sends a
byte every second gets no more time) and a size cap; only a complete head is handed to
one of a fixed number of worker threads, which run the handler and write its answer under
a send timeout. Every connection carries one request (`Connection: close`), so nothing
waits for a next request. Beyond `max_open` connections still sending their head, or
`max_queued` complete requests waiting for a worker, new ones get an immediate 503 and are
closed. So slowloris clients, floods and slow readers cannot grow the threads, the memory or
the file descriptors beyond the limits, and whatever the process does on other threads
(the sidecar applies tunings and reloads nginx on its own) goes on.

Only GET is served; the handler gets the parsed request and returns a `Response`.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import queue
import selectors
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            429: "Too Many Requests", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


@dataclass(frozen=True)
class Limits:
    """What one server may spend; the defaults suit the sidecar (a few callers, one at a
    time: the Job and a Prometheus scraper)."""

    #: threads that run handlers: a /probe holds one for up to its deadline, so 8 leave
    #: room for /status and /metrics beside it
    n_workers: int = 8
    #: complete requests waiting for a worker; more get 503 at once
    max_queued: int = 32
    #: connections whose request head is still arriving; more are answered 503 and closed
    max_open: int = 128
    #: the whole request head must arrive within this, from the accept (slowloris)
    head_deadline_s: float = 5.0
    #: a request head larger than this is refused (431): the sidecar's URLs are short
    max_head_bytes: int = 8192
    #: writing the answer to a client that does not read gives up after this
    send_timeout_s: float = 5.0


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Request:
    method: str
    #: the raw request-target, e.g. "/probe?samples=3"
    target: str
    headers: Message
    client: str


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def render_response(response: Response) -> bytes:
    """The bytes of an HTTP/1.1 answer that closes the connection (pure)."""
    lines = [f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Status')}",
             f"Content-Type: {response.content_type}",
             f"Content-Length: {len(response.body)}", "Connection: close",
             *(f"{name}: {value}" for name, value in response.headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body


def parse_head(head: bytes) -> Request | str:
    """A request head (up to and including the blank line) as a Request, or why not (pure)."""
    line, _, rest = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return "the request line is not METHOD TARGET HTTP/1.x"
    method, target, _version = (part.decode("latin-1") for part in parts)
    if not method.isalpha() or not target.startswith("/"):
        return "the request line is not METHOD /PATH HTTP/1.x"
    try:
        headers = http.client.parse_headers(io.BytesIO(rest))
    except http.client.HTTPException as exc:
        return f"the request's headers cannot be read: {exc}"
    return Request(method=method, target=target, headers=headers, client="")


def _plain(status: int, text: str, *extra: tuple[str, str]) -> bytes:
    return render_response(Response(status, (text + "\n").encode(), "text/plain", extra))


@dataclass
class _Pending:
    buffer: bytearray
    deadline: float
    client: str
    #: answered (refused) already: what the client still sends is read and dropped until it
    #: closes or the deadline, so that closing does not reset the connection (a reset can
    #: destroy the answer before the client reads it)
    is_draining: bool = False


class BoundedHTTPServer:
    def __init__(self, host: str, port: int, handle: Callable[[Request], Response], *,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family, backlog=128)
        self._listener.setblocking(False)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self.handle = handle
        self.limits = limits
        self._jobs: queue.Queue[tuple[socket.socket, Request] | None] = queue.Queue(
            maxsize=limits.max_queued)
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        #: counters a test can read: what was refused, and why
        self.n_refused: dict[str, int] = {"busy": 0, "too_many_open": 0, "head_deadline": 0,
                                          "head_too_large": 0, "bad_request": 0}

    def start(self) -> BoundedHTTPServer:
        self._threads = [threading.Thread(target=self._io_loop, name="http-io", daemon=True)]
        self._threads += [threading.Thread(target=self._work, name=f"http-worker-{i}",
                                           daemon=True) for i in range(self.limits.n_workers)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        os.write(self._wake_w, b"x")
        for _ in range(self.limits.n_workers):
            with contextlib.suppress(queue.Full):
                self._jobs.put(None, timeout=1)
        for thread in self._threads:
            thread.join(timeout=self.limits.send_timeout_s + 1)
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- the I/O thread: accept, read heads, hand complete requests over -------------------

    def _io_loop(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ, "accept")
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        pending: dict[socket.socket, _Pending] = {}
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                soonest = min((p.deadline for p in pending.values()), default=now + 1.0)
                for key, _ in selector.select(timeout=max(0.0, min(1.0, soonest - now))):
                    if key.data == "accept":
                        self._accept(selector, pending)
                    elif key.data == "read":
                        self._read(selector, pending, key.fileobj)  # type: ignore[arg-type]
                now = time.monotonic()
                for sock in [s for s, p in pending.items() if p.deadline <= now]:
                    if pending[sock].is_draining:
                        self._forget(selector, pending, sock)
                        continue
                    self.n_refused["head_deadline"] += 1
                    self._refuse(selector, pending, sock, _plain(
                        408, f"the request head did not arrive within "
                             f"{self.limits.head_deadline_s:g} s"))
        finally:
            for sock in pending:
                sock.close()
            selector.close()

    def _accept(self, selector: selectors.BaseSelector,
                pending: dict[socket.socket, _Pending]) -> None:
        for _ in range(64):  # then let the reads and deadlines have their turn
            try:
                sock, address = self._listener.accept()
            except BlockingIOError:
                return
            except OSError:  # EMFILE and the like: the backlog waits; do not spin on it
                time.sleep(0.05)
                return
            if len(pending) >= self.limits.max_open:
                self.n_refused["too_many_open"] += 1
                _send_and_close(sock, _plain(503, "too many connections; try again",
                                             ("Retry-After", "1")))
                continue
            sock.setblocking(False)
            pending[sock] = _Pending(bytearray(), time.monotonic() + self.limits.head_deadline_s,
                                     f"{address[0]}:{address[1]}")
            selector.register(sock, selectors.EVENT_READ, "read")

    def _read(self, selector: selectors.BaseSelector, pending: dict[socket.socket, _Pending],
              sock: socket.socket) -> None:
        entry = pending[sock]
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the client went away before its request was complete
            self._forget(selector, pending, sock)
            return
        if entry.is_draining:
            return
        entry.buffer += data
        end = entry.buffer.find(b"\r\n\r\n")
        if end < 0 or end + 4 > self.limits.max_head_bytes:
            if len(entry.buffer) >= self.limits.max_head_bytes:
                self.n_refused["head_too_large"] += 1
                self._refuse(selector, pending, sock, _plain(
                    431, f"the request head is larger than {self.limits.max_head_bytes} bytes"))
            return
        parsed = parse_head(bytes(entry.buffer[:end + 4]))
        if isinstance(parsed, str):
            self.n_refused["bad_request"] += 1
            self._refuse(selector, pending, sock, _plain(400, parsed))
            return
        selector.unregister(sock)
        del pending[sock]
        request = Request(parsed.method, parsed.target, parsed.headers, entry.client)
        try:
            self._jobs.put_nowait((sock, request))
        except queue.Full:
            self.n_refused["busy"] += 1
            _send_and_close(sock, _plain(503, "busy; try again", ("Retry-After", "1")))

    def _refuse(self, selector: selectors.BaseSelector, pending: dict[socket.socket, _Pending],
                sock: socket.socket, answer: bytes) -> None:
        """Answer, then drain what the client still sends for up to a second."""
        try:
            sock.send(answer)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._forget(selector, pending, sock)
            return
        entry = pending[sock]
        entry.is_draining, entry.buffer = True, bytearray()
        entry.deadline = time.monotonic() + 1.0

    def _forget(self, selector: selectors.BaseSelector, pending: dict[socket.socket, _Pending],
                sock: socket.socket) -> None:
        selector.unregister(sock)
        del pending[sock]
        sock.close()

    # -- the workers ------------------------------------------------------------------------

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            sock, request = job
            try:
                if request.method != "GET":
                    answer = _plain(405, f"{request.method[:16]} is not served; use GET",
                                    ("Allow", "GET"))
                else:
                    try:
                        answer = render_response(self.handle(request))
                    except Exception:  # a bug: reported with its traceback, the worker lives
                        traceback.print_exc(file=sys.stderr)
                        answer = _plain(500, "internal error; see the sidecar's log")
                sock.setblocking(True)
                sock.settimeout(self.limits.send_timeout_s)
                with contextlib.suppress(OSError):  # the client left or does not read
                    sock.sendall(answer)
                    sock.shutdown(socket.SHUT_WR)
            finally:
                sock.close()


def _send_and_close(sock: socket.socket, answer: bytes) -> None:
    """A short refusal, without blocking: it fits the socket's buffer, or is dropped."""
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        sock.send(answer)
    sock.close()
