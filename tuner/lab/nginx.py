"""nginx as the lab's reverse proxy: an `upstream` block whose `keepalive_timeout` is the
proxy's idle timeout toward the upstream.

Design decision: a changed timeout is applied with a real reload (SIGHUP), as in
production; see `tuner.lab.proxy` for how the lab knows the reload is complete.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tuner.analysis.signatures import count_nginx_signatures
from tuner.durations import nginx_time
from tuner.lab.errorlog import ErrorLog
from tuner.lab.process import LOOPBACK, require_program
from tuner.lab.proxy import CLIENT_IDLE_S, GENERATION_PATH, Proxy, default_upstream_host

#: Cached idle connections per worker: above the largest burst the lab sends (1,000), so a
#: burst's connections all stay cached through the idle gap (the condition for the race).
#: A burst of N users holds 2N descriptors in nginx (client and upstream side): 1,000 users
#: fit worker_connections 4096 and the hard descriptor limit here (20,000).
DEFAULT_KEEPALIVE_CONNS = 1024
_TEMP_MODULES = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def render_nginx_conf(*, workdir: Path, listen_port: int, upstream_port: int,
                      proxy_idle_s: float, keepalive_conns: int, generation: int,
                      run_as_root: bool, client_idle_s: float = CLIENT_IDLE_S,
                      upstream_host: str | None = None) -> str:
    """The whole nginx.conf for the lab (pure). `upstream_host`: the Host header toward the
    upstream (default: its own address; see tuner.lab.proxy)."""
    host = upstream_host or default_upstream_host(upstream_port)
    temp_paths = "\n".join(f"    {module}_temp_path {workdir}/tmp_{module};"
                           for module in _TEMP_MODULES)
    # As root, nginx would switch its workers to `nobody`, who cannot reach the lab's private
    # 0700 directory; the lab is loopback-only and short-lived, so workers stay root.
    user = "user root root;\n" if run_as_root else ""
    return f"""# rendered by tuner, generation {generation}
{user}worker_processes 1;
daemon off;
master_process on;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    log_format tuner '$msec $request_method $status "$upstream_status" $request_time';
    access_log {workdir}/access.log tuner;
{temp_paths}
    keepalive_timeout {nginx_time(client_idle_s)};
    keepalive_requests 100000;
    upstream tuner_upstream {{
        server {LOOPBACK}:{upstream_port} max_fails=0;
        keepalive {keepalive_conns};
        keepalive_timeout {nginx_time(proxy_idle_s)};
        keepalive_requests 10000;
    }}
    server {{
        listen {LOOPBACK}:{listen_port};
        location = {GENERATION_PATH} {{
            return 200 "generation {generation}\\n";
        }}
        location / {{
            proxy_pass http://tuner_upstream;
            # Both are needed for upstream keep-alive before nginx 1.29.7.
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # not nginx's default $proxy_host, the upstream block's name "tuner_upstream",
            # which strict servers (Tomcat) refuse with 400: see tuner.lab.proxy
            proxy_set_header Host "{host}";
        }}
    }}
}}
"""


class NginxProxy(Proxy):
    """A running nginx master in front of one upstream port."""

    name = "nginx"
    package = "nginx"
    reload_signal = signal.SIGHUP

    def __init__(self, *, workdir: Path, listen_port: int, upstream_port: int,
                 upstream_host: str | None = None,
                 keepalive_conns: int = DEFAULT_KEEPALIVE_CONNS,
                 client_idle_s: float = CLIENT_IDLE_S) -> None:
        super().__init__(workdir=workdir, listen_port=listen_port, upstream_port=upstream_port,
                         upstream_host=upstream_host)
        self.keepalive_conns = keepalive_conns
        self.client_idle_s = client_idle_s
        self.conf_path = workdir / "nginx.conf"
        self.error_log = ErrorLog(workdir / "error.log")
        self.access_log_path = workdir / "access.log"
        for module in _TEMP_MODULES:
            (workdir / f"tmp_{module}").mkdir(exist_ok=True)

    def render(self, proxy_idle_s: float) -> str:
        return render_nginx_conf(
            workdir=self.workdir, listen_port=self.listen_port, upstream_port=self.upstream_port,
            proxy_idle_s=proxy_idle_s, keepalive_conns=self.keepalive_conns,
            generation=self.generation, run_as_root=os.geteuid() == 0,
            client_idle_s=self.client_idle_s, upstream_host=self.upstream_host)

    def _argv(self, conf_path: Path, *extra: str) -> list[str]:
        return [self.binary, "-p", str(self.workdir), "-c", str(conf_path),
                "-e", str(self.error_log.path), *extra]

    def count_signatures(self, lines: Iterable[str]) -> Counter[str]:
        return count_nginx_signatures(lines)

    def check_argv(self, conf_path: Path) -> list[str]:
        return self._argv(conf_path, "-t", "-q")

    def run_argv(self) -> list[str]:
        return self._argv(self.conf_path)

    @classmethod
    def binary_version(cls) -> str:
        binary = require_program(cls.name, package=cls.package)
        out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
        return (out.stderr or out.stdout).strip().removeprefix("nginx version: nginx/")
