"""The lab: one real reverse proxy in front of one real upstream on 127.0.0.1, with both idle
timeouts under the tool's control.

Design decision: `Lab` is a context manager that owns a private temporary directory and
every process it starts; leaving the `with` block for any reason (an exception, Ctrl-C,
SIGTERM turned into an exception by the CLI) stops them all and removes the directory.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tuner.errors import ConfigError, ProcessStartError
from tuner.lab.envoy import EnvoyProxy
from tuner.lab.haproxy import HaproxyProxy
from tuner.lab.nginx import NginxProxy
from tuner.lab.process import LOOPBACK, ManagedProcess, held_signals, http_get, pick_free_port
from tuner.lab.proxy import Proxy
from tuner.lab.upstreams import Upstream
from tuner.load.request import parse_host
from tuner.proxy_names import PROXY_NAMES

PROXIES: dict[str, type[Proxy]] = {cls.name: cls
                                   for cls in (NginxProxy, HaproxyProxy, EnvoyProxy)}
assert tuple(PROXIES) == PROXY_NAMES, "tuner/proxy_names.py is the list of proxies"
#: Application servers can take a while to import (gunicorn boots a worker first).
UPSTREAM_READY_TIMEOUT_S = 20.0


def get_proxy_class(name: str) -> type[Proxy]:
    try:
        return PROXIES[name]
    except KeyError:
        raise ConfigError(f"unknown proxy {name!r}; choose one of {', '.join(PROXIES)}") from None


class UpstreamServer:
    """A running upstream; changing its idle timeout restarts it on the same port."""

    def __init__(self, upstream: Upstream, *, workdir: Path, port: int,
                 ready_timeout_s: float = UPSTREAM_READY_TIMEOUT_S) -> None:
        self.upstream = upstream
        self.ready_timeout_s = ready_timeout_s
        self.workdir = workdir
        self.port = port
        self.idle_s: float | None = None
        self._process: ManagedProcess | None = None
        self._n_starts = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def process(self) -> ManagedProcess | None:
        return self._process

    def start(self, idle_s: float) -> None:
        argv = self.upstream.argv(port=self.port, idle_s=idle_s)  # refuses bad values first
        self.upstream.check_installed()
        self._n_starts += 1
        self._process = ManagedProcess(argv, name=f"upstream-{self.upstream.name}",
                                       log_dir=self.workdir)
        self._process.start()
        # Any HTTP answer means ready: a user's own server may 404 on this path.
        self._process.wait_ready(lambda: http_get(self.port, "/__tuner/ready") is not None,
                                 timeout_s=self.ready_timeout_s,
                                 what=f"answer HTTP on {self.url}")
        self.idle_s = idle_s

    def set_idle(self, idle_s: float) -> None:
        # Validate before stopping anything, so a bad value leaves the old server running.
        self.upstream.argv(port=self.port, idle_s=idle_s)
        self.stop()
        self.start(idle_s)

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None


@dataclass(frozen=True)
class LabInfo:
    """What a user needs to talk to a running lab."""

    proxy: str
    proxy_url: str
    proxy_idle_s: float
    proxy_version: str
    upstream: str
    upstream_url: str
    upstream_idle_s: float
    upstream_idle_option: str
    #: the Host header the proxy sends the upstream
    upstream_host: str
    proxy_config: str
    proxy_error_log: str
    workdir: str


class Lab:
    """A proxy in front of an upstream; use as `with Lab(...) as lab:`."""

    def __init__(self, *, proxy: str, upstream: Upstream, proxy_idle_s: float,
                 upstream_idle_s: float, keep_workdir: bool = False,
                 upstream_ready_timeout_s: float = UPSTREAM_READY_TIMEOUT_S,
                 upstream_host: str | None = None) -> None:
        """`upstream_host`: the Host header the proxy sends the upstream (default: the
        upstream's own 127.0.0.1:PORT; see tuner.lab.proxy)."""
        self._proxy_class = get_proxy_class(proxy)
        self.upstream_host = (None if upstream_host is None
                              else parse_host(upstream_host, what="--host"))
        # Refuse values the servers cannot take before starting anything.
        upstream.argv(port=1, idle_s=upstream_idle_s)
        self.upstream_spec = upstream
        self.initial_proxy_idle_s = proxy_idle_s
        self.initial_upstream_idle_s = upstream_idle_s
        self.keep_workdir = keep_workdir
        self.upstream_ready_timeout_s = upstream_ready_timeout_s
        self.workdir = Path(tempfile.mkdtemp(prefix="tuner-lab-"))
        self.upstream: UpstreamServer | None = None
        self.proxy: Proxy | None = None

    def __enter__(self) -> Lab:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        self.upstream = UpstreamServer(self.upstream_spec, workdir=self.workdir,
                                       port=pick_free_port(),
                                       ready_timeout_s=self.upstream_ready_timeout_s)
        self.upstream.start(self.initial_upstream_idle_s)
        self.proxy = self._proxy_class(workdir=self.workdir, listen_port=pick_free_port(),
                                       upstream_port=self.upstream.port,
                                       upstream_host=self.upstream_host)
        self.proxy.start(proxy_idle_s=self.initial_proxy_idle_s)

    def set_proxy_idle(self, proxy_idle_s: float) -> None:
        """Reload the proxy with a new idle timeout toward the upstream."""
        self._running_proxy().set_idle(proxy_idle_s)

    def set_upstream_idle(self, upstream_idle_s: float) -> None:
        """Restart the upstream with a new idle timeout (no server here reloads it)."""
        self._running_upstream().set_idle(upstream_idle_s)

    def _running_proxy(self) -> Proxy:
        if self.proxy is None:
            raise ProcessStartError("the lab is not running: use it inside `with Lab(...)`")
        return self.proxy

    def _running_upstream(self) -> UpstreamServer:
        if self.upstream is None:
            raise ProcessStartError("the lab is not running: use it inside `with Lab(...)`")
        return self.upstream

    def info(self) -> LabInfo:
        proxy, upstream = self._running_proxy(), self._running_upstream()
        assert proxy.proxy_idle_s is not None and upstream.idle_s is not None
        return LabInfo(
            proxy=proxy.name, proxy_url=proxy.url, proxy_idle_s=proxy.proxy_idle_s,
            proxy_version=proxy.version(), upstream=self.upstream_spec.name,
            upstream_url=upstream.url, upstream_idle_s=upstream.idle_s,
            upstream_idle_option=self.upstream_spec.idle_option,
            upstream_host=proxy.upstream_host, proxy_config=str(proxy.conf_path),
            proxy_error_log=str(proxy.error_log.path),
            workdir=str(self.workdir))

    def problem(self) -> str | None:
        """Why the lab is broken (a process exited), or None if both are running."""
        for server in (self.proxy, self.upstream):
            process = server.process if server is not None else None
            if process is not None and process.exit_status() is not None:
                return process.describe_exit()
        return None

    def close(self) -> None:
        """Stop every process (proxy first, so it stops sending) and remove the workdir.

        Ctrl-C and SIGTERM are held back until this is done: a second Ctrl-C in the middle
        of teardown must not leave the upstream running.
        """
        with held_signals():
            try:
                if self.proxy is not None:
                    self.proxy.stop()
            finally:
                try:
                    if self.upstream is not None:
                        self.upstream.stop()
                finally:
                    self.proxy = None
                    self.upstream = None
                    if not self.keep_workdir:
                        shutil.rmtree(self.workdir, ignore_errors=True)
