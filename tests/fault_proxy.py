"""A TCP proxy on 127.0.0.1 between a Kubernetes client and the real API server, which
makes the API's outages on demand: the real server answers everything else, TLS included
(the proxy forwards bytes; it never sees a request).

- `refuse`: the listening socket is closed, so connections are refused (ECONNREFUSED), and
  open ones are reset, as while an API server restarts;
- `reset`: open connections are reset, new ones accepted and reset at once, unanswered,
  as behind a load balancer with no healthy backend; `reset_connections` counts them, so
  a test can require that a client met the outage;
- `stall`: nothing is forwarded on any connection, open or new (new ones are accepted and
  held), as when packets are dropped;
- `cut()`: every open connection (a watch in the middle of its stream) is closed now.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode = "pass"
        self.reset_connections = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener = self._listen(0)
        self.port: int = self._listener.getsockname()[1]
        self._closed = False
        self._accepting = threading.Thread(target=self._accept_loop, daemon=True)
        self._accepting.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @staticmethod
    def _listen(port: int) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        listener.settimeout(0.1)
        return listener

    # -- outages ------------------------------------------------------------------------------

    def refuse(self) -> None:
        """Refuse new connections and reset the open ones (a server that went away)."""
        with self._lock:
            self.mode = "refuse"
            self._listener.close()
        self.cut()

    def reset(self) -> None:
        """Reset new connections at once and the open ones too."""
        with self._lock:
            self.mode = "reset"
        self.cut()

    def stall(self) -> None:
        with self._lock:
            self.mode = "stall"

    def restore(self) -> None:
        with self._lock:
            if self.mode == "refuse":
                self._listener = self._listen(self.port)
            self.mode = "pass"

    def cut(self) -> int:
        """Close every open connection; return how many there were."""
        with self._lock:
            sockets, self._open = self._open, set()
        for sock in sockets:
            _close_with_reset(sock)
        return len(sockets) // 2

    def close(self) -> None:
        self._closed = True
        self._accepting.join(timeout=5)
        with self._lock:
            self._listener.close()
        self.cut()

    # -- forwarding ---------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed:
            with self._lock:
                listener, mode = self._listener, self.mode
            if mode == "refuse":
                time.sleep(0.05)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                mode = self.mode
                if mode == "reset":
                    self.reset_connections += 1
            if mode == "reset":
                _close_with_reset(client)
            elif mode == "stall":
                with self._lock:
                    self._open.add(client)  # held, unanswered, until cut() or close()
            else:
                threading.Thread(target=self._forward, args=(client,), daemon=True).start()

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _close_with_reset(client)
            return
        with self._lock:
            self._open.update((client, upstream))
        pair = {client: upstream, upstream: client}
        try:
            while True:
                if self.mode == "stall":  # the bytes wait in the kernel's buffers
                    time.sleep(0.05)
                    if self._closed:
                        return
                    continue
                readable, _, _ = select.select(list(pair), [], [], 0.2)
                if self._closed:
                    return
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    pair[sock].sendall(data)
        except (OSError, ValueError):  # cut(): the sockets were closed under us
            return
        finally:
            with self._lock:
                self._open.discard(client)
                self._open.discard(upstream)
            for sock in pair:
                sock.close()


def _close_with_reset(sock: socket.socket) -> None:
    """Close so the peer reads a reset, not an orderly end of stream."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass
