"""HAProxy as the lab's reverse proxy.

What bounds HAProxy 2.6's idle server-side connections (read in src/mux_h1.c, src/server.c
and src/backend.c of v2.6, and checked against 2.6.12 here):
- No timeout applies to a connection parked in the server's idle pool: not `timeout server`
  (only while a response is awaited), not `timeout http-keep-alive` or `timeout client`
  (client side). HAProxy does watch it for reads, so an upstream's close removes it.
- Every `pool-purge-delay` (server keyword, default 5s) `srv_cleanup_idle_conns` closes about
  half of the connections above its estimate of the connections it needs. A lone idle
  connection lived 3.0 s with `pool-purge-delay 1s` and 15 s with the default: the knob that
  plays nginx's `keepalive_timeout` here, but coarse (2-3x its value).
- `pool-max-conn 0`, `http-reuse never` or `pool-purge-delay 0` keep no idle connection.
- Reuse is oldest-first (an ebtree lookup returns the first inserted duplicate), not LIFO.
- On the race, with the default `http-reuse safe` and `retry-on conn-failure`, a reused
  connection that dies before the response makes HAProxy close the *client* connection with
  no status and no log line; `retry-on empty-response` replays the request instead.
Measured in the lab (Node keepAliveTimeout 1000 ms, real close 2.0 s, synchronized bursts of
30 POSTs): pool-purge-delay 60s gave 29 resets in 360 requests; 500ms gave 0 in 360.

Design decision: run in master-worker mode (`-W`) and reload with SIGUSR2, as systemd does.
"""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tuner.analysis.signatures import count_haproxy_signatures
from tuner.durations import haproxy_time
from tuner.lab.errorlog import ErrorLog
from tuner.lab.process import LOOPBACK, require_program
from tuner.lab.proxy import CLIENT_IDLE_S, GENERATION_PATH, Proxy, default_upstream_host

#: The proxy's response timeout toward the upstream; not an idle timeout.
SERVER_RESPONSE_S = 60.0


def render_haproxy_cfg(*, listen_port: int, upstream_port: int, proxy_idle_s: float,
                       generation: int, upstream_host: str | None = None) -> str:
    """The whole haproxy.cfg for the lab (pure). `upstream_host`: the Host header toward the
    upstream (default: its own address; see tuner.lab.proxy)."""
    host = upstream_host or default_upstream_host(upstream_port)
    return f"""# rendered by tuner, generation {generation}
global
    # Logs go to the process's stdout, which the lab keeps as this proxy's error log.
    log stdout format raw local0 info
    maxconn 4096

defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client {haproxy_time(CLIENT_IDLE_S)}
    timeout http-keep-alive {haproxy_time(CLIENT_IDLE_S)}
    timeout http-request 60s
    timeout server {haproxy_time(SERVER_RESPONSE_S)}

frontend tuner_front
    bind {LOOPBACK}:{listen_port}
    http-request return status 200 content-type text/plain \
        string "generation {generation}" if {{ path {GENERATION_PATH} }}
    default_backend tuner_upstream

backend tuner_upstream
    # The defaults, spelled out: reuse idle server connections when safe; retry only
    # connection failures (a reused connection that dies before the response is not one).
    http-reuse safe
    retries 3
    retry-on conn-failure
    # HAProxy passes the client's Host on; the upstream gets one Host behind every proxy
    http-request set-header Host {host}
    # Idle server connections have no idle timer; each pool-purge-delay HAProxy closes
    # about half of those above its estimate of need. This is the proxy idle knob.
    server upstream {LOOPBACK}:{upstream_port} pool-purge-delay {haproxy_time(proxy_idle_s)}
"""


class HaproxyProxy(Proxy):
    """A running HAProxy master (master-worker mode) in front of one upstream port."""

    name = "haproxy"
    package = "haproxy"
    reload_signal = signal.SIGUSR2

    def __init__(self, *, workdir: Path, listen_port: int, upstream_port: int,
                 upstream_host: str | None = None) -> None:
        super().__init__(workdir=workdir, listen_port=listen_port, upstream_port=upstream_port,
                         upstream_host=upstream_host)
        self.conf_path = workdir / "haproxy.cfg"
        # HAProxy cannot log to a file itself; its stdout (the log target) is the file.
        self.error_log = ErrorLog(workdir / "haproxy.stdout")

    def render(self, proxy_idle_s: float) -> str:
        return render_haproxy_cfg(listen_port=self.listen_port, upstream_port=self.upstream_port,
                                  proxy_idle_s=proxy_idle_s, generation=self.generation,
                                  upstream_host=self.upstream_host)

    def count_signatures(self, lines: Iterable[str]) -> Counter[str]:
        return count_haproxy_signatures(lines)

    def check_argv(self, conf_path: Path) -> list[str]:
        return [self.binary, "-c", "-q", "-f", str(conf_path)]

    def run_argv(self) -> list[str]:
        return [self.binary, "-W", "-db", "-f", str(self.conf_path)]

    @classmethod
    def binary_version(cls) -> str:
        binary = require_program(cls.name, package=cls.package)
        out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
        first = out.stdout.splitlines()[0] if out.stdout else ""
        return first.removeprefix("HAProxy version ").split(" ")[0]
