"""Servers the scan must list without stalling, run as real processes by the tests:

    python tests/scan_servers.py silent HOST PORT   accepts connections and never answers
    python tests/scan_servers.py h2 HOST PORT       speaks HTTP/2 only (prior knowledge, the
                                                    h2 library's server side), as gRPC does

Both listen on HOST:PORT and run until SIGTERM.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
from types import FrameType


def _silent(conn: socket.socket) -> None:
    with conn:
        while conn.recv(65536):  # read, never answer, until the client gives up
            pass


def _h2(conn: socket.socket) -> None:
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions

    config = h2.config.H2Configuration(client_side=False)
    h2conn = h2.connection.H2Connection(config=config)
    with conn:
        h2conn.initiate_connection()  # the server's SETTINGS, sent at once
        conn.sendall(h2conn.data_to_send())
        while data := conn.recv(65536):
            try:
                events = h2conn.receive_data(data)
            except h2.exceptions.ProtocolError:  # e.g. an HTTP/1.1 request line
                conn.sendall(h2conn.data_to_send())  # GOAWAY
                return
            for event in events:
                if isinstance(event, h2.events.RequestReceived):
                    h2conn.send_headers(event.stream_id, [(":status", "200")],
                                        end_stream=True)
            conn.sendall(h2conn.data_to_send())


def main() -> None:
    kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    handler = {"silent": _silent, "h2": _h2}[kind]

    def stop(_signum: int, _frame: FrameType | None) -> None:
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    with socket.create_server((host, port)) as server:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=handler, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
