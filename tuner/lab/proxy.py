"""What the lab's proxies share: write a config, check it with the proxy itself, start, reload
on a signal, and know when the new configuration is the only one in force.

Design decision: every rendered config answers `GET /__tuner/generation` with its generation
number, so "reloaded" means "a fresh connection is served by the new configuration" and "every
worker of the old one has exited" (an old worker could still hold a cached upstream
connection), not "the signal was sent".

The Host header toward the upstream is set by each proxy to one value (`upstream_host`):
by default the upstream's own address, `127.0.0.1:PORT`, which is what a client of the
upstream itself would send. Left alone, nginx sends its upstream block's name (`$proxy_host`)
and HAProxy and Envoy pass on the client's Host, so the upstream would see a different Host
behind each proxy; and an upstream block's name is no host name: embedded Tomcat answered
`Host: tuner_upstream` (`_` is invalid in a host name) with 400 and closed the connection,
every request of an experiment. `--host` sets another value (a virtual host the app expects).
"""

from __future__ import annotations

import subprocess
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tuner.errors import ProcessStartError, ProxyConfigError
from tuner.lab.errorlog import ErrorLog
from tuner.lab.process import LOOPBACK, ManagedProcess, http_get, require_program

GENERATION_PATH = "/__tuner/generation"
#: The client side (load generator -> proxy) must never be the hop that races, so the proxy
#: keeps idle client connections far longer than any trial runs.
CLIENT_IDLE_S = 600.0
#: `nginx -t` / `haproxy -c` take milliseconds; a hang means something else is wrong.
CHECK_TIMEOUT_S = 30.0
#: a position in the proxy's own count of races: a log offset, or a snapshot of counters
ProxyMark = int | dict[str, int]


class Proxy(ABC):
    """A reverse proxy run by the lab on 127.0.0.1:`listen_port` in front of one upstream."""

    name: str
    package: str
    #: the signal that makes the master reload its configuration
    reload_signal: int

    def __init__(self, *, workdir: Path, listen_port: int, upstream_port: int,
                 upstream_host: str | None = None) -> None:
        self.binary = self.find_binary()
        self.workdir = workdir
        self.listen_port = listen_port
        self.upstream_port = upstream_port
        #: the Host header sent to the upstream (checked by tuner.load.request.parse_host)
        self.upstream_host = upstream_host or default_upstream_host(upstream_port)
        self.generation = 0
        self.proxy_idle_s: float | None = None
        self._process: ManagedProcess | None = None

    # -- what each proxy defines -------------------------------------------------------
    conf_path: Path
    error_log: ErrorLog

    @abstractmethod
    def render(self, proxy_idle_s: float) -> str:
        """The configuration text for this generation."""

    @abstractmethod
    def check_argv(self, conf_path: Path) -> list[str]:
        """The proxy's own check of the config file at `conf_path`."""

    @abstractmethod
    def run_argv(self) -> list[str]:
        """The foreground master process."""

    @abstractmethod
    def count_signatures(self, lines: Iterable[str]) -> Counter[str]:
        """Race (and other upstream-failure) signatures in lines of this proxy's log."""

    @classmethod
    def find_binary(cls) -> str:
        """The proxy's program, or a MissingProgramError saying how to install it."""
        return require_program(cls.name, package=cls.package)

    # -- the proxy's own count of races during a trial ---------------------------------
    def race_mark(self) -> ProxyMark:
        """Where the proxy's race count stands now (an error-log offset by default)."""
        return self.error_log.mark()

    def race_signatures_since(self, mark: ProxyMark) -> Counter[str]:
        """What the proxy counted since `mark`: races, and failures of other causes."""
        assert isinstance(mark, int)
        return self.count_signatures(self.error_log.lines_since(mark))

    def version(self) -> str:
        """The proxy's version, e.g. "1.22.1"."""
        return self.binary_version()

    @classmethod
    @abstractmethod
    def binary_version(cls) -> str:
        """The installed proxy's version, without starting it."""

    # -- shared mechanics ----------------------------------------------------------------
    @property
    def process(self) -> ManagedProcess | None:
        return self._process

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.listen_port}"

    def _write_conf(self, proxy_idle_s: float) -> None:
        """Render, let the proxy check it, and only then put it in place: a rejected config
        never replaces the one in force (it is kept beside it, as `*.rejected`)."""
        self.generation += 1  # render() stamps the new generation into the config
        try:
            candidate = self._checked_candidate(proxy_idle_s)
        except BaseException:
            self.generation -= 1  # nothing new is in place: the old generation stays
            raise
        candidate.replace(self.conf_path)

    def _checked_candidate(self, proxy_idle_s: float) -> Path:
        candidate = self.conf_path.with_name(self.conf_path.name + ".candidate")
        candidate.write_text(self.render(proxy_idle_s))
        try:
            checked = subprocess.run(self.check_argv(candidate), capture_output=True, text=True,
                                     timeout=CHECK_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise ProxyConfigError(f"{self.name} did not finish checking {candidate} within "
                                   f"{CHECK_TIMEOUT_S:g}s") from exc
        if checked.returncode != 0:
            rejected = candidate.rename(candidate.with_suffix(".rejected"))
            message = (checked.stderr or checked.stdout).strip()
            raise ProxyConfigError(f"{self.name} rejected its configuration {rejected}:\n"
                                   f"{message}")
        return candidate

    def _wait_generation(self, *, timeout_s: float) -> None:
        assert self._process is not None
        expected = f"generation {self.generation}"

        def answers_generation() -> bool:
            answer = http_get(self.listen_port, GENERATION_PATH)
            return answer is not None and answer[1].strip() == expected

        self._process.wait_ready(answers_generation, timeout_s=timeout_s,
                                 what=f"answer on {self.url}{GENERATION_PATH} with {expected}")

    def start(self, *, proxy_idle_s: float, timeout_s: float = 15.0) -> None:
        self._write_conf(proxy_idle_s)
        self._process = ManagedProcess(self.run_argv(), name=self.name, log_dir=self.workdir)
        self._process.start()
        self._wait_generation(timeout_s=timeout_s)
        self.proxy_idle_s = proxy_idle_s

    def set_idle(self, proxy_idle_s: float, *, timeout_s: float = 15.0) -> None:
        """Reload with a new idle timeout; return once only the new workers remain."""
        assert self._process is not None, f"{self.name} not started"
        old_workers = children(self._process.pid)
        self._write_conf(proxy_idle_s)
        self._process.signal(self.reload_signal)
        self._wait_generation(timeout_s=timeout_s)
        deadline = time.monotonic() + timeout_s
        while old_workers & children(self._process.pid):
            if time.monotonic() > deadline:
                raise ProcessStartError(
                    f"{self.name} workers {sorted(old_workers)} still running {timeout_s:g}s "
                    f"after a reload; log {self.error_log.path}")
            time.sleep(0.02)
        self.proxy_idle_s = proxy_idle_s

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()


def default_upstream_host(upstream_port: int) -> str:
    """The Host the lab's proxies send when none is given: the upstream's own address."""
    return f"{LOOPBACK}:{upstream_port}"


def children(pid: int) -> set[int]:
    """Live child pids of `pid` (Linux /proc)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return set()
    return {int(child) for child in text.split()}
