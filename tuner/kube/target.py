"""The `kubernetes:` section of an experiment spec: where in a cluster the trials run (pure).

    kubernetes:
      namespace: tuner-demo
      service_url: http://demo-app.tuner-demo.svc/   # Locust's load goes here
      deployment: demo-app                  # restarted when the upstream idle changes
      pod_selector: app.kubernetes.io/name=demo-app   # its pods, to find the sidecars
      sidecar_port: 9901
      tuning_configmap: tuner-tuning        # patched per trial
      proxy_idle_key: upstream-keepalive-timeout
      upstream_idle_key: app-keep-alive-timeout-ms
      upstream_idle_unit: ms                # ms or s, as the app reads the key
      ledger_configmap: tuner-ledger        # a re-run Job resumes from it
      recommendation_configmap: tuner-keepalive
      rollout_timeout: 5m                   # a rollout slower than this fails its trial
      sidecar_timeout: 3m                   # so does a sidecar that never applies a trial
      api_retry_limit: 2m                   # API server unreachable this long: give up
      sidecar_token_file: /var/run/secrets/tuner/sidecar/token   # sent to /probe, /status
      workers: 0                            # N: Locust workers as N pods (tuner/kube/workers.py)
      worker_cpu: "1"                       # each worker pod's limits
      worker_memory: 512Mi
      worker_master_port: 5557              # where they reach the runner pod's Locust master

Design decision: only names and limits live here, never a client; the section is stored
with the spec, so a resumed Job aims at exactly the objects the first one did.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tuner.durations import duration_field, format_seconds, nginx_time, whole_ms, whole_s
from tuner.errors import ConfigError
from tuner.kube.objects import check_name


@dataclass(frozen=True)
class ClusterTarget:
    namespace: str
    service_url: str
    deployment: str
    pod_selector: str = ""
    sidecar_port: int = 9901
    tuning_configmap: str = "tuner-tuning"
    proxy_idle_key: str = "upstream-keepalive-timeout"
    upstream_idle_key: str = "app-keep-alive-timeout-ms"
    upstream_idle_unit: str = "ms"
    generation_key: str = "generation"
    ledger_configmap: str = "tuner-ledger"
    recommendation_configmap: str = "tuner-keepalive"
    #: a real rollout of a small Deployment takes tens of seconds; 5 min is far beyond that
    rollout_timeout_s: float = 300.0
    #: a watching sidecar applies a change in under a second, a mounted ConfigMap only
    #: after the kubelet's sync period plus cache TTL (often 60-90 s): 3 min covers both
    sidecar_timeout_s: float = 180.0
    #: how long an unreachable API server is waited for (an upgrade of a managed control
    #: plane can take a minute or two) before the experiment stops
    api_retry_limit_s: float = 120.0
    #: the bearer token the sidecars check (tuner.sidecar_auth): the Job's projected token
    #: for audience tuner-sidecar; where there is no such file (outside a pod), the
    #: kubeconfig's bearer token is sent instead
    sidecar_token_file: str = "/var/run/secrets/tuner/sidecar/token"
    #: Locust workers as pods of their own, per trial (tuner.kube.workers); 0: none
    workers: int = 0
    worker_cpu: str = "1"
    worker_memory: str = "512Mi"
    worker_master_port: int = 5557

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def proxy_value(self, proxy_idle_s: float) -> str:
        """The proxy key's value: nginx time syntax, which the sidecar reads."""
        return nginx_time(proxy_idle_s)

    def upstream_value(self, upstream_idle_s: float) -> str:
        """The upstream key's value, in the unit the app reads it in."""
        if self.upstream_idle_unit == "ms":
            return str(whole_ms(upstream_idle_s, server=f"{self.upstream_idle_key} (ms)"))
        return str(whole_s(upstream_idle_s, server=f"{self.upstream_idle_key} (s)"))


_DURATIONS = {"rollout_timeout": "rollout_timeout_s", "sidecar_timeout": "sidecar_timeout_s",
              "api_retry_limit": "api_retry_limit_s"}
_NAMES = ("deployment", "tuning_configmap", "ledger_configmap", "recommendation_configmap")
_KEYS = ("proxy_idle_key", "upstream_idle_key", "generation_key")
_REQUIRED = ("namespace", "service_url", "deployment")
#: worker pods per trial: beyond this the master's conducting, not the load, is the limit
MAX_WORKERS = 50
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?")


def parse_cluster_target(value: object) -> dict[str, Any]:
    """Validate the spec's `kubernetes` section; the result is JSON-ready (for the store)
    and every error names the key."""
    if not isinstance(value, dict):
        raise ConfigError(f"kubernetes: {value!r} must be a mapping with at least "
                          f"{', '.join(_REQUIRED)}")
    fields = {f.name for f in dataclasses.fields(ClusterTarget)} - set(_DURATIONS.values())
    known = fields | set(_DURATIONS)
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"kubernetes.{unknown[0]}: unknown key; the keys are "
                          f"{', '.join(sorted(known))}")
    for key in _REQUIRED:
        if not isinstance(value.get(key), str) or not value[key]:
            raise ConfigError(f"kubernetes.{key}: missing or not a string")
    result: dict[str, Any] = {}
    for key, item in value.items():
        where = f"kubernetes.{key}"
        if key in _DURATIONS:
            result[_DURATIONS[key]] = duration_field(where, item)
        elif key in ("sidecar_port", "worker_master_port"):
            if isinstance(item, bool) or not isinstance(item, int) or not 0 < item < 65536:
                raise ConfigError(f"{where}: {item!r} must be a port number (1-65535)")
            result[key] = item
        elif key == "workers":
            if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= MAX_WORKERS:
                raise ConfigError(f"{where}: {item!r} must be a whole number of worker pods, "
                                  f"0 to {MAX_WORKERS}")
            result[key] = item
        elif key in ("worker_cpu", "worker_memory"):
            text = str(item) if isinstance(item, int | float) and not isinstance(item, bool) \
                else item
            if not isinstance(text, str) or not _QUANTITY.fullmatch(text):
                raise ConfigError(f"{where}: {item!r} is not a Kubernetes quantity (e.g. "
                                  f"{'500m or 1' if key == 'worker_cpu' else '512Mi'})")
            result[key] = text
        elif not isinstance(item, str):
            raise ConfigError(f"{where}: {item!r} must be a string")
        elif key == "namespace":
            result[key] = check_name(where, item, max_length=63)
        elif key in _NAMES:
            result[key] = check_name(where, item)
        elif key == "upstream_idle_unit":
            if item not in ("ms", "s"):
                raise ConfigError(f"{where}: {item!r} is not ms or s")
            result[key] = item
        elif key == "service_url":
            url = urlsplit(item)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ConfigError(f"{where}: {item!r} is not an http:// or https:// URL of "
                                  "the Service, e.g. http://demo-app.tuner-demo.svc/")
            result[key] = item
        elif key == "sidecar_token_file":
            if not item.startswith("/"):
                raise ConfigError(f"{where}: {item!r} must be an absolute path, e.g. "
                                  "/var/run/secrets/tuner/sidecar/token")
            result[key] = item
        elif key in _KEYS or key == "pod_selector":
            if not item.strip():
                raise ConfigError(f"{where}: must not be empty")
            result[key] = item
    result.setdefault("pod_selector", f"app.kubernetes.io/name={result['deployment']}")
    return result


def cluster_target(section: dict[str, Any], *, upstream_idle_s: tuple[float, ...],
                   proxy_idle_s: tuple[float, ...]) -> ClusterTarget:
    """The target of a parsed section, checked against the grid: every value must be
    writable in its key's unit before the first trial changes anything."""
    if not section:
        raise ConfigError("--target kubernetes needs the spec's `kubernetes:` section (at "
                          f"least {', '.join(_REQUIRED)}); see the tuner-spec ConfigMap in "
                          "manifests/overlays/demo/configmaps.yaml")
    target = ClusterTarget(**section)
    for i, seconds in enumerate(upstream_idle_s):
        try:
            target.upstream_value(seconds)
        except ConfigError as exc:
            raise ConfigError(f"upstream_idle[{i}] {format_seconds(seconds)}: {exc}") from None
    for i, seconds in enumerate(proxy_idle_s):
        try:
            target.proxy_value(seconds)
        except ConfigError as exc:
            raise ConfigError(f"proxy_idle[{i}] {format_seconds(seconds)}: {exc}") from None
    return target
