"""One finding per probed pod: the verdict (analysis.verdict.judge) and the fix on each side,
in that side's own syntax (pure).

Design decision: how long to watch each pod follows from its route's setting: just long
enough for `judge` to call a pod that has not closed yet safe (`smallest_safe_upstream_close_s`
of the proxy's idle timeout), never longer than --max-idle. Behind a 60 s ingress-nginx
that is 67 s; behind a 1 h Envoy pool it is --max-idle, and a pod still open then is
"inconclusive", with the limit that would settle it. Plus `SWEEP_WAIT_S`: a pod still open
at that age may be one that closes by a sweep (tuner.probe) whose next sweep has not come.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from tuner.analysis.closes import SWEEP_WAIT_S
from tuner.analysis.verdict import judge, smallest_safe_upstream_close_s
from tuner.durations import format_seconds, plain_seconds
from tuner.scan import dataplanes as dp
from tuner.scan.dataplanes import IdleSetting
from tuner.scan.discovery import Gap, PodTarget, Route
from tuner.scan.outcome import MEASURED, ProbeOutcome

#: app protocols the HTTP/1.1 probe cannot speak (Service port appProtocol, ingress-nginx
#: backend-protocol): listed, not probed
HTTP2_PROTOCOLS = {"kubernetes.io/h2c", "h2c", "grpc", "grpcs", "http2"}
BACKEND_PROTOCOL = "nginx.ingress.kubernetes.io/backend-protocol"
UPSTREAM_VHOST = "nginx.ingress.kubernetes.io/upstream-vhost"
SERVER_HINTS = ("Node server.keepAliveTimeout (Node 20 closes 1 s later), gunicorn --keep-alive, "
                "uvicorn --timeout-keep-alive, Go http.Server.IdleTimeout")


@dataclass(frozen=True)
class Plan:
    """How to probe one target, or why not."""

    target: PodTarget
    setting: IdleSetting
    max_idle_s: float
    scheme: str = "http"
    host_header: str = ""
    #: set when the pod is not probed (HTTP/2 only, no idle pool): the reason
    skip: str = ""


@dataclass(frozen=True)
class Finding:
    route: str
    route_kind: str
    route_namespace: str
    route_name: str
    service: str  # ns/name
    pod: str
    owner: str
    address: str
    data_plane: str
    proxy_idle_s: float | None
    idle_source: str
    #: how the probe went: measured, refused, timeout, http2-only, not-http, skipped,
    #: no-endpoints
    probe: str
    upstream_close_s: float | None
    probed_for_s: float | None
    #: measured close minus the proxy's idle timeout (negative: the app closes first)
    slack_s: float | None
    required_margin_s: float | None
    #: safe, unsafe, inconclusive, unknown (no proxy setting), unprobed
    verdict: str
    message: str
    fix_proxy: str = ""
    fix_app: str = ""
    n_same_owner: int = 1
    #: the pod closes idle connections by a periodic sweep (`upstream_close_s` is then the
    #: earliest idle age a sweep may close one at)
    closes_by_sweep: bool = False
    sweep_period_s: float | None = None

    @property
    def is_exposed(self) -> bool:
        return self.verdict == "unsafe"


def plan(target: PodTarget, setting: IdleSetting, *, max_idle_s: float,
         margin_s: float | None = None) -> Plan:
    route = target.route
    protocol = (route.annotations.get(BACKEND_PROTOCOL, "") if route.kind == "Ingress"
                else "").lower()
    app_protocol = target.app_protocol.lower()
    if protocol in HTTP2_PROTOCOLS or app_protocol in HTTP2_PROTOCOLS:
        said = f"backend-protocol {protocol}" if protocol in HTTP2_PROTOCOLS else \
            f"appProtocol {target.app_protocol}"
        return Plan(target, setting, 0.0, skip=f"HTTP/2 backend ({said}): the HTTP/1.1 "
                                                 "probe cannot measure it")
    if not setting.pools:
        return Plan(target, setting, 0.0, skip="the data plane keeps no idle connections")
    limit_s = max_idle_s
    if setting.proxy_idle_s is not None:
        limit_s = min(max_idle_s, smallest_safe_upstream_close_s(setting.proxy_idle_s,
                                                                 margin_s) + SWEEP_WAIT_S)
    host = route.annotations.get(UPSTREAM_VHOST, "") if route.kind == "Ingress" else ""
    if not host and route.host and not route.host.startswith("*"):
        host = route.host
    scheme = "https" if protocol in ("https", "auto_https") else "http"
    return Plan(target, setting, limit_s, scheme=scheme, host_header=host)


def _base(route: Route, target: PodTarget | None, setting: IdleSetting) -> Finding:
    return Finding(
        route=route.label, route_kind=route.kind, route_namespace=route.namespace,
        route_name=route.name, service=f"{route.service_namespace}/{route.service}",
        pod=target.pod if target else "", owner=target.owner if target else "",
        address=f"{target.address}:{target.port}" if target else "",
        data_plane=setting.data_plane, proxy_idle_s=setting.proxy_idle_s,
        idle_source=setting.source, probe="skipped", upstream_close_s=None,
        probed_for_s=None, slack_s=None, required_margin_s=None, verdict="unprobed",
        message="", n_same_owner=target.n_same_owner if target else 1)


def finding(plan_: Plan, outcome: ProbeOutcome | None, *, margin_s: float | None = None
            ) -> Finding:
    target, setting = plan_.target, plan_.setting
    route = target.route
    base = _base(route, target, setting)
    if outcome is None:
        return replace(base, verdict="safe" if not setting.pools else "unprobed",
                       message=plan_.skip)
    if outcome.status != MEASURED:
        return replace(base, probe=outcome.status, message=outcome.detail)
    close_s = outcome.close_s
    base = replace(base, probe=MEASURED, upstream_close_s=close_s,
                   probed_for_s=plan_.max_idle_s, closes_by_sweep=outcome.closes_by_sweep,
                   sweep_period_s=outcome.sweep_period_s)
    if setting.proxy_idle_s is None:
        message = (f"closes idle connections after {close_s:.1f} s; the data plane's idle "
                   "timeout is unknown: give --proxy-idle" if close_s is not None else
                   f"kept idle connections open for the {format_seconds(plan_.max_idle_s)} "
                   "probed; the data plane's idle timeout is unknown: give --proxy-idle")
        return replace(base, verdict="unknown", message=message)
    verdict = judge(proxy_idle_s=setting.proxy_idle_s, upstream_close_s=close_s,
                    max_idle_s=plan_.max_idle_s, margin_s=margin_s,
                    closes_on_next_request=outcome.closes_on_next_request,
                    keeps_alive=outcome.keeps_alive, closes_by_sweep=outcome.closes_by_sweep,
                    sweep_period_s=outcome.sweep_period_s)
    fix_proxy = fix_app = ""
    if verdict.status == "unsafe":
        if verdict.max_safe_proxy_idle_s is not None:
            fix_proxy = proxy_fix(route, setting, verdict.max_safe_proxy_idle_s)
        measured = "never kept" if close_s is None else f"{close_s:.1f} s"
        fix_app = (f"make the app keep idle connections at least "
                   f"{format_seconds(verdict.min_safe_upstream_close_s)} (measured: "
                   f"{measured}) with its own setting ({SERVER_HINTS}), then scan again")
    return replace(base, slack_s=None if close_s is None else close_s - setting.proxy_idle_s,
                   required_margin_s=verdict.margin_s, verdict=verdict.status,
                   message=verdict.message, fix_proxy=fix_proxy, fix_app=fix_app)


def gap_finding(gap: Gap, setting: IdleSetting) -> Finding:
    return replace(_base(gap.route, None, setting), probe="no-endpoints", message=gap.reason)


def _gateway_duration(seconds: float) -> str:
    """Gateway API / Envoy Gateway / NGINX Gateway Fabric duration: one unit, whole."""
    ms = math.floor(round(seconds * 1000, 6))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def proxy_fix(route: Route, setting: IdleSetting, max_safe_s: float) -> str:
    """The data plane's own object and field, set to the largest safe value."""
    plane = setting.data_plane
    if plane == dp.INGRESS_NGINX:
        whole_s = math.floor(max_safe_s)
        if whole_s < 1:
            return (f"none: {dp.INGRESS_NGINX_KEY} takes whole seconds and the largest safe "
                    f"value is {format_seconds(max_safe_s)}; fix the app")
        return (f"ConfigMap {setting.config_ref}: {dp.INGRESS_NGINX_KEY}: \"{whole_s}\" "
                "(global: every Ingress of this controller)")
    if plane == dp.ISTIO:
        host = f"{route.service}.{route.service_namespace}.svc.cluster.local"
        return (f"DestinationRule (host {host}): spec.trafficPolicy.connectionPool.http."
                f"idleTimeout: {plain_seconds(max_safe_s)}s")
    if plane == dp.ENVOY_GATEWAY:
        return (f"BackendTrafficPolicy (targetRefs: HTTPRoute {route.namespace}/{route.name}"
                f"): spec.timeout.http.connectionIdleTimeout: {_gateway_duration(max_safe_s)}")
    if plane == dp.NGINX_GATEWAY_FABRIC:
        return (f"UpstreamSettingsPolicy (targetRefs: Service {route.service_namespace}/"
                f"{route.service}): spec.keepAlive.timeout: {_gateway_duration(max_safe_s)}")
    return f"set {plane}'s upstream idle timeout to at most {format_seconds(max_safe_s)}"
