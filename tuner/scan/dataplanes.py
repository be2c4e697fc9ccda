"""Which data plane serves a route, how long it keeps idle upstream connections, and where
that value came from (pure).

Design decision: every value carries its source in words a platform team can check
("ConfigMap ingress-nginx/ingress-nginx-controller key upstream-keepalive-timeout",
"default 1h: no BackendTrafficPolicy targets HTTPRoute shop/web"), and a value the scan
could not read is never silently a default: the source says it was assumed and why.

Defaults (docs/keepalive.md, /work/shared/KEEPALIVE.md): ingress-nginx 60 s (its ConfigMap
`upstream-keepalive-timeout`; no per-Ingress annotation sets it, ingress-nginx#11472), Istio
1 h (DestinationRule connectionPool.http.idleTimeout), Envoy Gateway 1 h
(BackendTrafficPolicy timeout.http.connectionIdleTimeout), NGINX Gateway Fabric 60 s
(UpstreamSettingsPolicy keepAlive.timeout).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tuner.durations import parse_duration
from tuner.errors import ConfigError
from tuner.scan.discovery import Obj, Route, Snapshot, name_of, namespace_of

INGRESS_NGINX = "ingress-nginx"
ISTIO = "istio"
ENVOY_GATEWAY = "envoy-gateway"
NGINX_GATEWAY_FABRIC = "nginx-gateway-fabric"
UNKNOWN = "unknown"

#: controller names as IngressClass.spec.controller / GatewayClass.spec.controllerName say
CONTROLLERS = {
    "k8s.io/ingress-nginx": INGRESS_NGINX,
    "istio.io/ingress-controller": ISTIO,
    "istio.io/gateway-controller": ISTIO,
    "gateway.envoyproxy.io/gatewayclass-controller": ENVOY_GATEWAY,
    "gateway.nginx.org/nginx-gateway-controller": NGINX_GATEWAY_FABRIC,
}
#: when the class object cannot be read (cluster-scoped: namespaced Roles cannot), the
#: class names each project's install uses by default
CLASS_NAME_GUESSES = {
    "Ingress": {"nginx": INGRESS_NGINX, "istio": ISTIO},
    "HTTPRoute": {"eg": ENVOY_GATEWAY, "envoy-gateway": ENVOY_GATEWAY, "istio": ISTIO,
                  "nginx": NGINX_GATEWAY_FABRIC},
}
DEFAULT_IDLE_S = {INGRESS_NGINX: 60.0, ISTIO: 3600.0, ENVOY_GATEWAY: 3600.0,
                  NGINX_GATEWAY_FABRIC: 60.0}
INGRESS_NGINX_KEY = "upstream-keepalive-timeout"


@dataclass(frozen=True)
class IdleSetting:
    """A route's data plane and its upstream idle timeout (None: unknown)."""

    data_plane: str
    proxy_idle_s: float | None
    source: str
    #: False when the data plane keeps no idle upstream connections at all
    pools: bool = True
    #: the object a fix goes into, when the data plane has one place for it
    config_ref: str = ""


def data_plane_of(route: Route, snapshot: Snapshot) -> tuple[str, str]:
    """(data plane, how it was identified)."""
    if route.kind == "Ingress":
        classes = {name_of(c): str((c.get("spec") or {}).get("controller", ""))
                   for c in snapshot.ingress_classes}
        what = "IngressClass"
        unreadable = snapshot.unreadable.get("ingressclasses")
    else:
        classes = {name_of(c): str((c.get("spec") or {}).get("controllerName", ""))
                   for c in snapshot.gateway_classes}
        what = "GatewayClass"
        unreadable = snapshot.unreadable.get("gatewayclasses")
    name = route.class_name.split(",")[0]
    if not name or name == "?":
        missing = "no class" if not name else "parent Gateway not readable or missing"
        return UNKNOWN, f"{route.kind} {route.namespace}/{route.name}: {missing}"
    controller = classes.get(name)
    if controller is not None:
        plane = CONTROLLERS.get(controller, UNKNOWN)
        return plane, f"{what} {name} (controller {controller})"
    guess = CLASS_NAME_GUESSES[route.kind].get(name)
    why = f"{what} {name} not readable ({unreadable})" if unreadable else \
        f"{what} {name} not found"
    if guess is None:
        return UNKNOWN, why
    return guess, f"assumed from the class name: {why}"


def idle_setting(route: Route, snapshot: Snapshot, *,
                 proxy_idle_s: Mapping[str, float] | None = None) -> IdleSetting:
    """The data plane's upstream idle timeout for `route`. `proxy_idle_s` maps a class name
    (or "" for every class) to a value the user gave with --proxy-idle, which wins."""
    plane, identified = data_plane_of(route, snapshot)
    given = proxy_idle_s or {}
    for key in (route.class_name, ""):
        if key in given:
            return IdleSetting(plane if plane != UNKNOWN else f"class {route.class_name}",
                               given[key], f"--proxy-idle (data plane: {identified})")
    if plane == INGRESS_NGINX:
        return _ingress_nginx(snapshot)
    if plane == ISTIO:
        return _istio(route, snapshot)
    if plane == ENVOY_GATEWAY:
        return _envoy_gateway(route, snapshot)
    if plane == NGINX_GATEWAY_FABRIC:
        return _nginx_gateway_fabric(route, snapshot)
    return IdleSetting(f"class {route.class_name or '(none)'}", None,
                       f"unknown: give --proxy-idle ({identified})")


def _duration(value: object, where: str) -> float:
    try:
        return parse_duration(str(value), what=where)
    except ConfigError:
        raise ConfigError(f"{where}: {value!r} is not a duration the scan can read; "
                          "fix the object or give --proxy-idle") from None


def _ingress_nginx(snapshot: Snapshot) -> IdleSetting:
    setting = _ingress_nginx_setting(snapshot)
    return IdleSetting(setting.data_plane, setting.proxy_idle_s, setting.source,
                       setting.pools, config_ref=snapshot.ingress_nginx_configmap_ref)


def _ingress_nginx_setting(snapshot: Snapshot) -> IdleSetting:
    ref = snapshot.ingress_nginx_configmap_ref
    default_s = DEFAULT_IDLE_S[INGRESS_NGINX]
    cm = snapshot.ingress_nginx_configmap
    if cm is None:
        why = snapshot.unreadable.get("ingress-nginx-configmap", f"ConfigMap {ref} not found")
        return IdleSetting(INGRESS_NGINX, default_s,
                           f"default 60s assumed: {why}; name it with "
                           "--ingress-nginx-configmap NAMESPACE/NAME")
    data = cm.get("data") or {}
    if str(data.get("upstream-keepalive-connections", "")).strip() == "0":
        return IdleSetting(INGRESS_NGINX, default_s,
                           f"ConfigMap {ref} upstream-keepalive-connections=0: no idle pool",
                           pools=False)
    if INGRESS_NGINX_KEY not in data:
        return IdleSetting(INGRESS_NGINX, default_s,
                           f"default 60s: ConfigMap {ref} does not set {INGRESS_NGINX_KEY}")
    value = str(data[INGRESS_NGINX_KEY]).strip()
    where = f"ConfigMap {ref} key {INGRESS_NGINX_KEY}"
    return IdleSetting(INGRESS_NGINX, _duration(value, where), where)


def _fqdn(host: str, namespace: str) -> str:
    """A DestinationRule host as the mesh reads it: short names are relative to the rule's
    namespace."""
    if "." not in host:
        return f"{host}.{namespace}.svc.cluster.local"
    if host.count(".") == 1:
        return f"{host}.svc.cluster.local"
    return host


def _istio(route: Route, snapshot: Snapshot) -> IdleSetting:
    host = f"{route.service}.{route.service_namespace}.svc.cluster.local"
    best: tuple[int, Obj] | None = None
    for rule in snapshot.destination_rules:
        rule_host = _fqdn(str((rule.get("spec") or {}).get("host", "")), namespace_of(rule))
        if rule_host == host:
            rank = 0
        elif rule_host.startswith("*") and host.endswith(rule_host[1:]):
            rank = 1
        else:
            continue
        # the Service's own namespace before the mesh root namespace, as Istio looks them up
        rank = rank * 2 + (0 if namespace_of(rule) == route.service_namespace else 1)
        if best is None or rank < best[0]:
            best = (rank, rule)
    unread = snapshot.unreadable.get("destinationrules")
    if best is None:
        why = f"DestinationRules not readable ({unread})" if unread else \
            f"no DestinationRule for {host}"
        return IdleSetting(ISTIO, DEFAULT_IDLE_S[ISTIO], f"default 1h: {why}")
    rule = best[1]
    policy = (rule.get("spec") or {}).get("trafficPolicy") or {}
    where = f"DestinationRule {namespace_of(rule)}/{name_of(rule)}"
    for level in policy.get("portLevelSettings") or []:
        if (level.get("port") or {}).get("number") == route.service_port:
            value = (((level.get("connectionPool") or {}).get("http") or {})
                     .get("idleTimeout"))
            if value:
                return IdleSetting(ISTIO, _duration(value, f"{where} port {route.service_port}"
                                                           " idleTimeout"),
                                   f"{where} portLevelSettings "
                                   f"{route.service_port} connectionPool.http.idleTimeout")
    value = ((policy.get("connectionPool") or {}).get("http") or {}).get("idleTimeout")
    if value:
        return IdleSetting(ISTIO, _duration(value, f"{where} idleTimeout"),
                           f"{where} trafficPolicy.connectionPool.http.idleTimeout")
    return IdleSetting(ISTIO, DEFAULT_IDLE_S[ISTIO],
                       f"default 1h: {where} sets no connectionPool.http.idleTimeout")


def _target_refs(policy: Obj) -> list[Obj]:
    spec = policy.get("spec") or {}
    refs = list(spec.get("targetRefs") or [])
    if spec.get("targetRef"):
        refs.append(spec["targetRef"])
    return refs


def _targets(policy: Obj, kind: str, name: str) -> bool:
    return any(ref.get("kind") == kind and ref.get("name") == name
               for ref in _target_refs(policy))


def _envoy_gateway(route: Route, snapshot: Snapshot) -> IdleSetting:
    def idle(policy: Obj) -> object:
        return ((((policy.get("spec") or {}).get("timeout") or {}).get("http") or {})
                .get("connectionIdleTimeout"))

    candidates: list[tuple[str, Sequence[Obj]]] = [
        (f"HTTPRoute {route.namespace}/{route.name}",
         [p for p in snapshot.backend_traffic_policies
          if namespace_of(p) == route.namespace and _targets(p, "HTTPRoute", route.name)])]
    for parent in route.parents:
        gw_ns, gw_name = parent.split("/", 1)
        candidates.append((f"Gateway {parent}", [
            p for p in snapshot.backend_traffic_policies
            if namespace_of(p) == gw_ns and _targets(p, "Gateway", gw_name)]))
    # the route's own policy is more specific than its Gateway's, as Envoy Gateway merges them
    for target, policies in candidates:
        for policy in sorted(policies, key=name_of):
            value = idle(policy)
            if value:
                where = f"BackendTrafficPolicy {namespace_of(policy)}/{name_of(policy)}"
                return IdleSetting(ENVOY_GATEWAY,
                                   _duration(value, f"{where} connectionIdleTimeout"),
                                   f"{where} (targets {target}) "
                                   "timeout.http.connectionIdleTimeout")
    unread = snapshot.unreadable.get("backendtrafficpolicies")
    why = f"BackendTrafficPolicies not readable ({unread})" if unread else \
        f"no BackendTrafficPolicy sets connectionIdleTimeout for HTTPRoute " \
        f"{route.namespace}/{route.name} or its Gateway"
    return IdleSetting(ENVOY_GATEWAY, DEFAULT_IDLE_S[ENVOY_GATEWAY], f"default 1h: {why}")


def _nginx_gateway_fabric(route: Route, snapshot: Snapshot) -> IdleSetting:
    for policy in sorted(snapshot.upstream_settings_policies, key=name_of):
        if namespace_of(policy) != route.service_namespace \
                or not _targets(policy, "Service", route.service):
            continue
        value = (((policy.get("spec") or {}).get("keepAlive") or {}).get("timeout"))
        if value:
            where = f"UpstreamSettingsPolicy {namespace_of(policy)}/{name_of(policy)}"
            return IdleSetting(NGINX_GATEWAY_FABRIC, _duration(value, f"{where} timeout"),
                               f"{where} keepAlive.timeout")
    unread = snapshot.unreadable.get("upstreamsettingspolicies")
    why = f"UpstreamSettingsPolicies not readable ({unread})" if unread else \
        f"no UpstreamSettingsPolicy sets keepAlive.timeout for Service " \
        f"{route.service_namespace}/{route.service}"
    return IdleSetting(NGINX_GATEWAY_FABRIC, DEFAULT_IDLE_S[NGINX_GATEWAY_FABRIC],
                       f"default 60s: {why}")
