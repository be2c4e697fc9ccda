"""Small HTTP/1.1 servers that behave as real apps do toward requests they do not serve, for
the preflight's and the trials' tests (run as `--upstream-cmd`):

    python tests/strict_server.py --port {port} --idle-ms {idle_ms} --mode MODE

modes:
  strict-host  as embedded Tomcat 11: a Host header with `_` (or none) is answered 400 and
               the connection closed; any other request 200, connection kept
  not-found    404 to every request, connection kept (an app without a route for POST /)
  bad-request  400 to every request, connection kept (a refusal that keeps the connection)
  refuse       400 and Connection: close to every request (Tomcat's answer to its bad Host)
  close        200 and Connection: close to every request (keep-alive off)
  silent-close 200, then the connection closed without a Connection: close header

Each connection is closed after --idle-ms idle (a per-connection timer, as Tomcat's), so the
lab's probe measures a close. Stdlib only.
"""

from __future__ import annotations

import argparse
import http.server
import re

_VALID_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "StrictTest/1.0"
    sys_version = ""
    mode = "strict-host"

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        mode = self.mode
        host = self.headers.get("Host") or ""
        if mode == "strict-host":
            if _VALID_HOST.fullmatch(host):
                self._send(200, keep=True)
            else:
                self._send(400, keep=False)
        elif mode == "not-found":
            self._send(404, keep=True)
        elif mode == "bad-request":
            self._send(400, keep=True)
        elif mode == "refuse":
            self._send(400, keep=False)
        elif mode == "close":
            self._send(200, keep=False)
        elif mode == "silent-close":
            self._send(200, keep=True)
            self.close_connection = True  # without saying so
        else:
            raise SystemExit(f"unknown mode {mode}")

    def _send(self, status: int, *, keep: bool) -> None:
        body = f'{{"status": {status}, "host": "{self.headers.get("Host")}"}}'.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if not keep:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = not keep

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _answer



class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # a burst of 100 users connects at once


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--idle-ms", type=int, required=True)
    parser.add_argument("--mode", default="strict-host")
    args = parser.parse_args()
    Handler.mode = args.mode
    # the socket's timeout while it waits for the next request: the stdlib then closes the
    # idle connection (BaseHTTPRequestHandler: "Request timed out"), a timer per connection
    Handler.timeout = args.idle_ms / 1000
    Server(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
