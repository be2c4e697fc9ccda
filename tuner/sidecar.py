"""`tuner sidecar`: beside the proxy, apply the tuning ConfigMap and report what it saw.

It reads the tuning ConfigMap from one of two sources: a directory (`--tuning-dir`, as
Kubernetes mounts a ConfigMap: a file per key, polled), or the Kubernetes API
(`--configmap NAMESPACE/NAME`, watched by tuner.kube.watch: a change arrives in well under
a second instead of the kubelet's 60-90 s). It renders nginx include files from it, reloads
nginx with SIGHUP (its pid from the pid file; the pod shares its process namespace), tails
nginx's error log from a shared volume, and serves (tuner.sidecar_api, on the bounded
server of tuner.boundedhttp; who may call what: tuner.sidecar_auth):
  /metrics  Prometheus text: race signatures by kind, the settings in force, the generation
  /status   JSON: the generation applied, the settings, counters since start; for the Job
            also the log's mark, and with ?since=OFFSET the counters after that mark
  /probe    with --app-url: `tuner probe` of the app beside it in the pod (?samples=3
            &max_idle=60s), so a runner outside the pod learns the app's real close time
Outside Kubernetes it works the same against a local nginx with file paths (the tests).
The tuning is applied on the thread that runs `run()`, never on a thread of the HTTP
server: no client, however slow or many, holds up a tuning or an nginx reload.

Design decision: a tuning that fails validation (or that `nginx -t` rejects) is never
applied; the last good one stays in force and /status shows the error, so a typo in the
ConfigMap cannot take the proxy down mid-experiment. Likewise a source that cannot be read
(the API unreachable, forbidden, the ConfigMap missing) keeps the last good tuning in force
and shows why in /status.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tuner.analysis.signatures import count_nginx_signatures
from tuner.boundedhttp import DEFAULT_LIMITS, BoundedHTTPServer, Limits
from tuner.durations import nginx_time, parse_duration
from tuner.errors import ConfigError
from tuner.lab.errorlog import ErrorLog
from tuner.sidecar_api import SidecarAPI
from tuner.sidecar_auth import CallerCheck

#: ConfigMap keys, named as in the ingress-nginx controller ConfigMap
KEY_UPSTREAM_IDLE = "upstream-keepalive-timeout"
KEY_UPSTREAM_CONNS = "upstream-keepalive-connections"
KEY_CLIENT_IDLE = "keep-alive"
KEY_GENERATION = "generation"


@dataclass(frozen=True)
class Tuning:
    """The settings of one generation of the tuning ConfigMap."""

    generation: str
    upstream_idle_s: float | None = None
    upstream_conns: int | None = None
    client_idle_s: float | None = None


def parse_tuning(data: Mapping[str, str]) -> Tuning:
    """Validate the ConfigMap's keys (pure). Bare numbers are seconds, as ingress-nginx has."""
    def seconds(key: str) -> float | None:
        if key not in data:
            return None
        return parse_duration(data[key].strip(), what=f"{key}:")

    conns = None
    if KEY_UPSTREAM_CONNS in data:
        text = data[KEY_UPSTREAM_CONNS].strip()
        if not text.isdigit() or int(text) < 1:
            raise ConfigError(f"{KEY_UPSTREAM_CONNS}: {text!r} must be a whole number >= 1")
        conns = int(text)
    return Tuning(generation=data.get(KEY_GENERATION, "").strip() or "unset",
                  upstream_idle_s=seconds(KEY_UPSTREAM_IDLE), upstream_conns=conns,
                  client_idle_s=seconds(KEY_CLIENT_IDLE))


def render_nginx(tuning: Tuning) -> dict[str, str]:
    """The include files for nginx (pure): one inside `upstream {}`, one in `http {}`."""
    upstream = [f"# rendered by tuner sidecar, generation {tuning.generation}"]
    if tuning.upstream_conns is not None:
        upstream.append(f"keepalive {tuning.upstream_conns};")
    if tuning.upstream_idle_s is not None:
        upstream.append(f"keepalive_timeout {nginx_time(tuning.upstream_idle_s)};")
    client = [f"# rendered by tuner sidecar, generation {tuning.generation}"]
    if tuning.client_idle_s is not None:
        client.append(f"keepalive_timeout {nginx_time(tuning.client_idle_s)};")
    return {"upstream-keepalive.conf": "\n".join(upstream) + "\n",
            "client-keepalive.conf": "\n".join(client) + "\n"}


def read_configmap_dir(path: Path) -> dict[str, str]:
    """A mounted ConfigMap: one file per key (Kubernetes' `..data` symlink dirs skipped)."""
    # a binaryData key need not be UTF-8: undecodable bytes become U+FFFD, so such a value
    # of a tuning key is refused by validation instead of stopping the sidecar
    return {entry.name: entry.read_bytes().decode(errors="replace")
            for entry in sorted(path.iterdir())
            if entry.is_file() and not entry.name.startswith(".")}


class TuningSource(Protocol):
    """Where the tuning ConfigMap's data comes from: `TuningDir`, or
    tuner.kube.watch.ConfigMapWatch."""

    def read(self) -> dict[str, str] | None:
        """The ConfigMap's data as last seen; None while it was never read."""

    def problem(self) -> str | None:
        """Why the data may be stale or missing; None while the source is healthy."""


@dataclass(frozen=True)
class TuningDir:
    """A mounted ConfigMap, read at every poll."""

    path: Path

    def read(self) -> dict[str, str]:
        return read_configmap_dir(self.path)

    def problem(self) -> None:
        return None


@dataclass
class SidecarState:
    applied: Tuning | None = None
    applied_at: float | None = None
    #: why the newest tuning is not in force (invalid, rejected by nginx, no reload)
    error: str | None = None
    #: why the tuning source cannot be read (TuningSource.problem)
    source_error: str | None = None
    #: why nginx's error log cannot be read (its races hidden by retries go uncounted)
    log_error: str | None = None
    n_reloads: int = 0
    #: False while nginx could not be told (reload failed): the rendering waits on disk, the
    #: running nginx still has the previous settings, and the generation is not in force
    in_force: bool = False
    signatures: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def status(self) -> dict[str, Any]:
        """What anyone who may reach /status sees (tuner.sidecar_api adds the Job's part)."""
        with self.lock:
            return {
                "generation": self.applied.generation if self.applied else None,
                "settings": asdict(self.applied) if self.applied else None,
                "applied_at": self.applied_at, "error": self.describe_error(),
                "reloads": self.n_reloads, "in_force": self.in_force,
                "signatures": dict(self.signatures)}

    def describe_error(self) -> str | None:
        """Every problem, the source's first (the caller holds the lock)."""
        return "; ".join(error for error in (self.source_error, self.log_error, self.error)
                         if error) or None

    def metrics(self) -> str:
        with self.lock:
            lines = ["# HELP tuner_proxy_log_signatures_total nginx error-log lines of upstream "
                     "failures, by kind (connect_refused is not the keep-alive race)",
                     "# TYPE tuner_proxy_log_signatures_total counter"]
            for kind in ("prematurely_closed", "reset_by_peer", "broken_pipe",
                         "connect_refused"):
                lines.append(f'tuner_proxy_log_signatures_total{{kind="{kind}"}} '
                             f"{self.signatures.get(kind, 0)}")
            lines += ["# HELP tuner_setting_seconds keep-alive settings in force",
                      "# TYPE tuner_setting_seconds gauge"]
            applied = self.applied
            if applied is not None:
                for key, value in ((KEY_UPSTREAM_IDLE, applied.upstream_idle_s),
                                   (KEY_CLIENT_IDLE, applied.client_idle_s)):
                    if value is not None:
                        lines.append(f'tuner_setting_seconds{{setting="{key}"}} {value:g}')
            lines += ["# HELP tuner_reloads_total proxy reloads done by the sidecar",
                      "# TYPE tuner_reloads_total counter",
                      f"tuner_reloads_total {self.n_reloads}",
                      "# HELP tuner_tuning_error 1 while the tuning ConfigMap is invalid "
                      "or cannot be read",
                      "# TYPE tuner_tuning_error gauge",
                      f"tuner_tuning_error {1 if self.describe_error() else 0}"]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class SidecarPaths:
    render_dir: Path
    nginx_pid: Path
    error_log: Path
    #: when given, `nginx -t -c` checks every rendering before the reload
    nginx_conf: Path | None = None
    nginx_binary: str = "nginx"
    #: the app in the same pod, for /probe (loopback)
    app_url: str | None = None
    #: the mounted tuning ConfigMap, unless the Sidecar is given another `source`
    tuning_dir: Path | None = None


class Sidecar:
    def __init__(self, paths: SidecarPaths, *, poll_s: float = 0.5,
                 source: TuningSource | None = None) -> None:
        if source is None:
            if paths.tuning_dir is None:
                raise ConfigError("the sidecar needs a tuning source: a tuning directory or "
                                  "a ConfigMap to watch")
            source = TuningDir(paths.tuning_dir)
        self.source = source
        self.paths = paths
        self.poll_s = poll_s
        self.state = SidecarState()
        self.log = ErrorLog(paths.error_log)
        self._log_offset = self.log.mark()
        self._seen: dict[str, str] | None = None
        self._stop = threading.Event()

    def step(self) -> None:
        """One poll: apply a changed tuning, count new error-log lines."""
        data = self.source.read()
        if data is not None and data != self._seen:
            self._seen = data
            self._apply(data)
        problem = self.source.problem()
        with self.state.lock:
            self.state.source_error = problem
        try:
            lines, self._log_offset = self.log.read_since(self._log_offset)
            log_error = None
        except OSError as exc:  # e.g. a log written by another user, unreadable to us
            lines, log_error = [], (f"cannot read nginx's error log {self.log.path} "
                                    f"({exc.strerror}): races nginx hid by retrying go "
                                    "uncounted; make it readable to the sidecar's user")
        counts = count_nginx_signatures(lines)
        with self.state.lock:
            self.state.log_error = log_error
            self.state.signatures.update(counts)

    def _apply(self, data: Mapping[str, str]) -> None:
        try:
            tuning = parse_tuning(data)
            files = render_nginx(tuning)
        except ConfigError as exc:
            with self.state.lock:
                self.state.error = f"tuning not applied: {exc}"
            return
        previous = {name: (self.paths.render_dir / name).read_text()
                    for name in files if (self.paths.render_dir / name).exists()}
        for name, text in files.items():
            temporary = self.paths.render_dir / f".{name}.tmp"
            temporary.write_text(text)
            temporary.replace(self.paths.render_dir / name)
        problem = self._check()
        if problem is not None:
            for name, text in previous.items():  # put the last good rendering back
                (self.paths.render_dir / name).write_text(text)
            with self.state.lock:
                self.state.error = f"nginx rejected generation {tuning.generation}: {problem}"
            return
        problem = self._reload()
        with self.state.lock:
            self.state.applied, self.state.applied_at = tuning, time.time()
            self.state.error = problem
            self.state.n_reloads += problem is None
            self.state.in_force = problem is None

    def _check(self) -> str | None:
        if self.paths.nginx_conf is None:
            return None
        checked = subprocess.run([self.paths.nginx_binary, "-t", "-q", "-c",
                                  str(self.paths.nginx_conf)], capture_output=True, text=True,
                                 timeout=30)
        return None if checked.returncode == 0 else (checked.stderr or checked.stdout).strip()

    def _reload(self) -> str | None:
        """SIGHUP nginx; the problem if it could not be signalled (the rendering stays in
        place for nginx's next start)."""
        try:
            pid = int(self.paths.nginx_pid.read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError) as exc:
            return (f"could not signal nginx (pid file {self.paths.nginx_pid}): {exc}; the "
                    "rendering is in place for its next start")
        return None

    def serve(self, host: str, port: int, *, callers: CallerCheck,
              limits: Limits = DEFAULT_LIMITS) -> BoundedHTTPServer:
        """Serve /metrics, /status and /probe on a bounded server (started)."""
        api = SidecarAPI(state=self.state, error_log=self.paths.error_log,
                         app_url=self.paths.app_url, callers=callers)
        return BoundedHTTPServer(host, port, api.handle, limits=limits).start()

    def run(self) -> None:
        """Poll until stopped (SIGTERM and Ctrl-C end the CLI's process)."""
        while not self._stop.is_set():
            self.step()
            self._stop.wait(self.poll_s)

    def stop(self) -> None:
        self._stop.set()
