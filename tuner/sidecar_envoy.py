"""`tuner sidecar --envoy-admin ... --envoy-cds ...`: the sidecar beside an Envoy instead of
nginx.

The same tuning ConfigMap (`upstream-keepalive-timeout`, `generation`), the same sources and
the same /status, /metrics and /probe as tuner.sidecar; what differs is the proxy side:
- the idle timeout is rendered into Envoy's dynamic resources: the CDS file Envoy watches
  (cluster `app` toward the app's port in the pod, `common_http_protocol_options
  .idle_timeout`), swapped by an atomic rename, as the lab does (tuner.lab.envoy); no
  signal, no restart, the listener stays;
- "in force" is what Envoy's admin `/config_dump` shows (the rendered version with the idle
  timeout), polled for up to IN_FORCE_TIMEOUT_S;
- races are counted from Envoy's admin stats, not a log: the delta of
  `cluster.app.upstream_cx_destroy_remote_with_active_rq` since the sidecar started. For
  /status?since=N, the "log offset" is that counter's value: a runner that marks the offset
  before its load and asks with since= after it gets the trial's races, as with nginx.

Design decision: a subclass of tuner.sidecar.Sidecar in a module of its own, so nginx's
sidecar code stays as it is; it overrides how a tuning is applied and how races are counted.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.analysis.signatures import ENVOY_STATS, envoy_signatures
from tuner.boundedhttp import DEFAULT_LIMITS, BoundedHTTPServer, Limits
from tuner.errors import ConfigError
from tuner.lab.envoy import CLUSTER, in_force_idle, render_envoy_cds, same_duration
from tuner.sidecar import Sidecar, SidecarPaths, SidecarState, TuningSource, parse_tuning
from tuner.sidecar_api import SidecarAPI
from tuner.sidecar_auth import CallerCheck

#: Envoy's own default, used when the tuning names no idle timeout
ENVOY_DEFAULT_IDLE_S = 3600.0
#: a CDS file is applied within a few hundred ms (0.14 s measured in the lab)
IN_FORCE_TIMEOUT_S = 5.0
_RACE_STAT = "upstream_cx_destroy_remote_with_active_rq"
_ADMIN_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class EnvoyPaths:
    #: Envoy's admin endpoint in the pod, e.g. http://127.0.0.1:9901
    admin_url: str
    #: the CDS file Envoy's bootstrap names in `cds_config.path_config_source.path`
    cds_path: Path
    #: the app's port in the pod (cluster `app` goes to 127.0.0.1:app_port)
    app_port: int
    app_url: str | None = None
    tuning_dir: Path | None = None


class EnvoyAdmin:
    """Envoy's admin endpoint: the config dump and the cluster counters."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url.rstrip("/")

    def get_json(self, path: str) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(self.admin_url + path,
                                        timeout=_ADMIN_TIMEOUT_S) as response:
                document: dict[str, Any] = json.loads(response.read())
                return document
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def stats(self) -> dict[str, int] | None:
        wanted = "|".join(f"cluster\\.{CLUSTER}\\.{stat}" for stat in ENVOY_STATS)
        document = self.get_json(f"/stats?format=json&filter=^({wanted})$")
        if document is None:
            return None
        values = {str(s["name"]): int(s["value"]) for s in document.get("stats", [])
                  if "value" in s}
        return {stat: values.get(f"cluster.{CLUSTER}.{stat}", 0) for stat in ENVOY_STATS}


class EnvoySidecarState(SidecarState):
    """/metrics also shows Envoy's cluster counters since the sidecar started."""

    def metrics(self) -> str:
        text = super().metrics()
        with self.lock:
            lines = ["# HELP tuner_envoy_cluster_events_total Envoy cluster counters since the "
                     "sidecar started (remote_close_with_active_rq: one per keep-alive race)",
                     "# TYPE tuner_envoy_cluster_events_total counter"]
            for kind in ENVOY_STATS.values():
                lines.append(f'tuner_envoy_cluster_events_total{{kind="{kind}"}} '
                             f"{self.signatures.get(kind, 0)}")
        return text + "\n".join(lines) + "\n"


class EnvoySidecarAPI(SidecarAPI):
    """/status's mark is the race counter's value; ?since=MARK gives the races after it."""

    def __init__(self, *, admin: EnvoyAdmin, state: Any, app_url: str | None,
                 callers: CallerCheck) -> None:
        super().__init__(state=state, error_log=Path("/nonexistent/envoy-writes-no-race-log"),
                         app_url=app_url, callers=callers)
        self.admin = admin

    def mark(self) -> int:
        stats = self.admin.stats()
        return stats[_RACE_STAT] if stats is not None else 0

    def counts_since(self, mark: int) -> Counter[str] | None:
        stats = self.admin.stats()
        if stats is None:
            return None
        return envoy_signatures(before={_RACE_STAT: mark}, after={_RACE_STAT: stats[_RACE_STAT]})


class EnvoySidecar(Sidecar):
    def __init__(self, paths: EnvoyPaths, *, poll_s: float = 0.5,
                 source: TuningSource | None = None) -> None:
        super().__init__(SidecarPaths(render_dir=paths.cds_path.parent,
                                      nginx_pid=Path("/nonexistent"),
                                      error_log=paths.cds_path.with_suffix(".unused-log"),
                                      app_url=paths.app_url, tuning_dir=paths.tuning_dir),
                         poll_s=poll_s, source=source)
        self.envoy = paths
        self.admin = EnvoyAdmin(paths.admin_url)
        self.state = EnvoySidecarState()
        self._n_versions = 0
        self._baseline: dict[str, int] | None = None

    def serve(self, host: str, port: int, *, callers: CallerCheck,
              limits: Limits = DEFAULT_LIMITS) -> BoundedHTTPServer:
        api = EnvoySidecarAPI(admin=self.admin, state=self.state, app_url=self.paths.app_url,
                              callers=callers)
        return BoundedHTTPServer(host, port, api.handle, limits=limits).start()

    def step(self) -> None:
        data = self.source.read()
        if data is not None and data != self._seen:
            self._seen = data
            self._apply(data)
        problem = self.source.problem()
        stats = self.admin.stats()
        if stats is not None and self._baseline is None:
            self._baseline = stats
        with self.state.lock:
            self.state.source_error = problem
            if stats is not None and self._baseline is not None:
                self.state.signatures = envoy_signatures(before=self._baseline, after=stats)

    def _apply(self, data: Mapping[str, str]) -> None:
        try:
            tuning = parse_tuning(data)
            idle_s = tuning.upstream_idle_s or ENVOY_DEFAULT_IDLE_S
            text = render_envoy_cds(upstream_port=self.envoy.app_port, proxy_idle_s=idle_s,
                                    generation=self._n_versions + 1)
        except ConfigError as exc:
            with self.state.lock:
                self.state.error = f"tuning not applied: {exc}"
            return
        self._n_versions += 1
        temporary = self.envoy.cds_path.with_name(f".{self.envoy.cds_path.name}.tmp")
        temporary.write_text(text)
        temporary.replace(self.envoy.cds_path)  # Envoy watches for this move
        problem = self._wait_in_force(str(self._n_versions), idle_s)
        with self.state.lock:
            self.state.applied, self.state.applied_at = tuning, time.time()
            self.state.error = problem
            self.state.n_reloads += problem is None
            self.state.in_force = problem is None

    def _wait_in_force(self, version: str, idle_s: float) -> str | None:
        deadline = time.monotonic() + IN_FORCE_TIMEOUT_S
        while time.monotonic() < deadline:
            dump = self.admin.get_json("/config_dump?resource=dynamic_active_clusters")
            idle = in_force_idle(dump, version=version) if dump is not None else None
            if idle is not None and same_duration(idle, idle_s):
                return None
            time.sleep(0.05)
        return (f"Envoy ({self.admin.admin_url}) did not show CDS version {version} in its "
                f"/config_dump within {IN_FORCE_TIMEOUT_S:g}s: is {self.envoy.cds_path} the "
                "path its bootstrap watches, and did it reject the cluster (see its log)?")

