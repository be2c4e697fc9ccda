"""The scan's pure layers: discovery, data-plane settings and their sources, findings and
fixes, and the three outputs. API objects are the JSON the documentation describes; probe
outcomes are plain values (the probing itself runs against real servers in
tests/test_scan_real.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest

from tuner.errors import ConfigError
from tuner.output.scan import ScanReport, as_json, as_prometheus, render_table
from tuner.scan import audit
from tuner.scan.dataplanes import IdleSetting, data_plane_of, idle_setting
from tuner.scan.discovery import (
    Snapshot,
    pod_targets,
    routes_from_httproutes,
    routes_from_ingresses,
)
from tuner.scan.outcome import MEASURED, ProbeOutcome
from tuner.scan.probing import probe_url


def meta(name: str, ns: str = "shop", **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": ns, **extra}


def ingress(name: str, svc: str, *, cls: str | None = "nginx", port: Any = None,
            annotations: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"rules": [{"host": "shop.example", "http": {"paths": [
        {"path": "/api", "pathType": "Prefix",
         "backend": {"service": {"name": svc, "port": port or {"number": 80}}}}]}}]}
    if cls:
        spec["ingressClassName"] = cls
    return {"metadata": meta(name, annotations=annotations or {}), "spec": spec}


def httproute(name: str, svc: str, gateway: str = "gw", gw_ns: str | None = None
              ) -> dict[str, Any]:
    parent = {"name": gateway, **({"namespace": gw_ns} if gw_ns else {})}
    return {"metadata": meta(name), "spec": {"parentRefs": [parent], "rules": [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
         "backendRefs": [{"name": svc, "port": 8080}]}]}}


def gateway(name: str, cls: str, ns: str = "shop") -> dict[str, Any]:
    return {"metadata": meta(name, ns), "spec": {"gatewayClassName": cls}}


def service(name: str, *, port: int = 80, port_name: str = "http",
            app_protocol: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": port_name, "port": port, "targetPort": 3000}
    if app_protocol:
        entry["appProtocol"] = app_protocol
    return {"metadata": meta(name), "spec": {"ports": [entry]}}


def pod(name: str, owner: str | None) -> dict[str, Any]:
    refs = [{"kind": "ReplicaSet", "name": owner, "controller": True}] if owner else []
    return {"metadata": meta(name, ownerReferences=refs)}


def endpoint_slice(svc: str, endpoints: list[tuple[str, str, bool]], *,
                   port_name: str = "http") -> dict[str, Any]:
    return {"metadata": meta(f"{svc}-x", labels={"kubernetes.io/service-name": svc}),
            "addressType": "IPv4", "ports": [{"name": port_name, "port": 3000}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": ready},
                           "targetRef": {"kind": "Pod", "name": pod_name}}
                          for pod_name, ip, ready in endpoints]}


def backend(svc: str, pods: list[tuple[str, str | None, str]], **port: Any) -> Snapshot:
    return Snapshot(services=[service(svc, **port)],
                    pods=[pod(name, owner) for name, owner, _ in pods],
                    endpoint_slices=[endpoint_slice(svc, [(n, ip, True) for n, _, ip in pods])])


def test_the_deciding_layers_do_no_io() -> None:
    """discovery, data planes, audit, outcome and the outputs import nothing that touches
    the world (the same list tests/test_layers.py holds analysis/ to)."""
    from .test_layers import IO_MODULES, TUNER, _imports

    for module in [*(TUNER / "scan" / f"{name}.py" for name in
                     ("discovery", "dataplanes", "audit", "outcome")),
                   TUNER / "output" / "scan.py"]:
        for name in _imports(module):
            assert not any(name == io or name.startswith(io + ".") for io in IO_MODULES), \
                f"{module.name} imports {name}"


# discovery

def test_one_pod_per_owner_unless_all_pods() -> None:
    snap = backend("web", [("web-a-1", "web-a", "10.0.0.1"), ("web-a-2", "web-a", "10.0.0.2"),
                           ("web-b-1", "web-b", "10.0.0.3"), ("bare", None, "10.0.0.4")])
    routes = routes_from_ingresses([ingress("web", "web")])
    targets, gaps = pod_targets(routes, snap)
    assert not gaps
    assert sorted((t.pod, t.owner, t.n_same_owner) for t in targets) == [
        ("bare", "", 1), ("web-a-1", "ReplicaSet/web-a", 2), ("web-b-1", "ReplicaSet/web-b", 1)]
    [web_a] = [t for t in targets if t.pod == "web-a-1"]
    assert web_a.address == "10.0.0.1" and web_a.port == 3000
    everyone, _ = pod_targets(routes, snap, all_pods=True)
    assert sorted(t.pod for t in everyone) == ["bare", "web-a-1", "web-a-2", "web-b-1"]


def test_not_ready_endpoints_and_wrong_ports_are_gaps_with_reasons() -> None:
    snap = Snapshot(services=[service("web")], pods=[pod("p", "rs")],
                    endpoint_slices=[endpoint_slice("web", [("p", "10.0.0.1", False)])])
    routes = routes_from_ingresses([ingress("a", "web"), ingress("b", "web",
                                                                 port={"name": "grpc"}),
                                    ingress("c", "missing")])
    targets, gaps = pod_targets(routes, snap)
    assert targets == []
    assert [g.reason for g in gaps] == [
        "Service shop/web has no ready endpoint on port 80",
        "Service shop/web has no port 'grpc'",
        "Service shop/missing not found"]


def test_httproute_backends_and_their_gateway_class() -> None:
    routes = routes_from_httproutes([httproute("api", "api", gw_ns="infra")],
                                    [gateway("gw", "eg", "infra")])
    [route] = routes
    assert (route.class_name, route.parents, route.path, route.service_port) == \
        ("eg", ("infra/gw",), "/v1", 8080)
    assert route.label == "HTTPRoute shop/api (*/v1)"
    [unread] = routes_from_httproutes([httproute("api", "api")], [])
    assert unread.class_name == "?"


def test_probe_urls_bracket_ipv6() -> None:
    assert probe_url("fd00::5", 3000, "/api") == "http://[fd00::5]:3000/api"
    assert probe_url("10.0.0.1", 80, "x", scheme="https") == "https://10.0.0.1:80/x"


# data planes and where their value came from

def route_of(obj: dict[str, Any], gateways: list[dict[str, Any]] | None = None) -> Any:
    if "rules" in obj["spec"] and "parentRefs" in obj["spec"]:
        return routes_from_httproutes([obj], gateways or [])[0]
    return routes_from_ingresses([obj])[0]


def test_ingress_nginx_configmap_value_default_and_unreadable() -> None:
    route = route_of(ingress("web", "web"))
    cm = {"metadata": meta("ingress-nginx-controller", "ingress-nginx"),
          "data": {"upstream-keepalive-timeout": "30"}}
    set_ = idle_setting(route, Snapshot(ingress_nginx_configmap=cm))
    assert (set_.data_plane, set_.proxy_idle_s, set_.source) == (
        "ingress-nginx", 30.0,
        "ConfigMap ingress-nginx/ingress-nginx-controller key upstream-keepalive-timeout")
    unset = idle_setting(route, Snapshot(ingress_nginx_configmap={"data": {}}))
    assert unset.proxy_idle_s == 60.0 and unset.source.startswith("default 60s: ConfigMap")
    forbidden = Snapshot(unreadable={"ingress-nginx-configmap": "forbidden: get configmaps x"})
    assert idle_setting(route, forbidden).source.startswith(
        "default 60s assumed: forbidden: get configmaps x")
    off = idle_setting(route, Snapshot(ingress_nginx_configmap={
        "data": {"upstream-keepalive-connections": "0"}}))
    assert off.pools is False
    with pytest.raises(ConfigError, match="upstream-keepalive-timeout: '1 minute'"):
        idle_setting(route, Snapshot(ingress_nginx_configmap={
            "data": {"upstream-keepalive-timeout": "1 minute"}}))


def test_class_identity_from_the_class_object_or_guessed_from_its_name() -> None:
    route = route_of(ingress("web", "web", cls="public"))
    classes = [{"metadata": {"name": "public"}, "spec": {"controller": "k8s.io/ingress-nginx"}}]
    assert data_plane_of(route, Snapshot(ingress_classes=classes)) == \
        ("ingress-nginx", "IngressClass public (controller k8s.io/ingress-nginx)")
    guessed = data_plane_of(route_of(ingress("w", "w")),
                            Snapshot(unreadable={"ingressclasses": "forbidden: list"}))
    assert guessed == ("ingress-nginx", "assumed from the class name: IngressClass nginx not "
                                        "readable (forbidden: list)")
    unknown = idle_setting(route_of(ingress("w", "w", cls="traefik")), Snapshot())
    assert unknown.proxy_idle_s is None and unknown.data_plane == "class traefik"
    assert unknown.source.startswith("unknown: give --proxy-idle")
    given = idle_setting(route_of(ingress("w", "w", cls="traefik")), Snapshot(),
                         proxy_idle_s={"traefik": 90.0})
    assert given.proxy_idle_s == 90.0 and given.source.startswith("--proxy-idle")


def test_istio_destination_rule_exact_wildcard_port_level_and_default() -> None:
    mesh = [{"metadata": {"name": "istio"}, "spec": {"controller": "istio.io/ingress-controller"}}]
    route = route_of(ingress("web", "web", cls="istio"))

    def rule(name: str, host: str, ns: str, idle: str, port_idle: str | None = None
             ) -> dict[str, Any]:
        policy: dict[str, Any] = {"connectionPool": {"http": {"idleTimeout": idle}}}
        if port_idle:
            policy["portLevelSettings"] = [{"port": {"number": 80}, "connectionPool": {
                "http": {"idleTimeout": port_idle}}}]
        return {"metadata": meta(name, ns), "spec": {"host": host, "trafficPolicy": policy}}

    none = idle_setting(route, Snapshot(ingress_classes=mesh))
    assert (none.proxy_idle_s, none.source) == (
        3600.0, "default 1h: no DestinationRule for web.shop.svc.cluster.local")
    wide = rule("all", "*.svc.cluster.local", "istio-system", "30s")
    short = rule("web", "web", "shop", "45s")
    assert idle_setting(route, Snapshot(ingress_classes=mesh, destination_rules=[wide])
                        ).proxy_idle_s == 30.0
    both = idle_setting(route, Snapshot(ingress_classes=mesh, destination_rules=[wide, short]))
    assert (both.proxy_idle_s, both.source) == (
        45.0, "DestinationRule shop/web trafficPolicy.connectionPool.http.idleTimeout")
    ported = rule("web", "web.shop", "other", "45s", port_idle="1.5s")
    assert idle_setting(route, Snapshot(ingress_classes=mesh, destination_rules=[ported])
                        ).proxy_idle_s == 1.5


def test_envoy_gateway_route_policy_beats_gateway_policy() -> None:
    classes = [{"metadata": {"name": "eg"},
                "spec": {"controllerName": "gateway.envoyproxy.io/gatewayclass-controller"}}]
    route = route_of(httproute("api", "api"), [gateway("gw", "eg")])

    def btp(name: str, kind: str, target: str, idle: str) -> dict[str, Any]:
        return {"metadata": meta(name), "spec": {
            "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": kind,
                            "name": target}],
            "timeout": {"http": {"connectionIdleTimeout": idle}}}}

    assert idle_setting(route, Snapshot(gateway_classes=classes)).proxy_idle_s == 3600.0
    on_gw = btp("gw-wide", "Gateway", "gw", "10m")
    on_route = btp("api", "HTTPRoute", "api", "50s")
    assert idle_setting(route, Snapshot(gateway_classes=classes,
                                        backend_traffic_policies=[on_gw])).proxy_idle_s == 600
    chosen = idle_setting(route, Snapshot(gateway_classes=classes,
                                          backend_traffic_policies=[on_gw, on_route]))
    assert chosen.proxy_idle_s == 50.0 and chosen.source.startswith(
        "BackendTrafficPolicy shop/api (targets HTTPRoute shop/api)")


def test_nginx_gateway_fabric_upstream_settings_policy() -> None:
    classes = [{"metadata": {"name": "nginx"},
                "spec": {"controllerName": "gateway.nginx.org/nginx-gateway-controller"}}]
    route = route_of(httproute("api", "api"), [gateway("gw", "nginx")])
    assert idle_setting(route, Snapshot(gateway_classes=classes)).source.startswith(
        "default 60s: no UpstreamSettingsPolicy")
    usp = {"metadata": meta("api"), "spec": {
        "targetRefs": [{"group": "core", "kind": "Service", "name": "api"}],
        "keepAlive": {"timeout": "20s"}}}
    got = idle_setting(route, Snapshot(gateway_classes=classes,
                                       upstream_settings_policies=[usp]))
    assert (got.proxy_idle_s, got.source) == (20.0, "UpstreamSettingsPolicy shop/api "
                                                    "keepAlive.timeout")


# findings and fixes

def measured(close_s: float | None, *, limit_s: float) -> ProbeOutcome:
    return ProbeOutcome(0, MEASURED, "", limit_s, close_s=close_s)


@pytest.mark.parametrize(("plane", "fix"), [
    ("ingress-nginx", 'ConfigMap ingress-nginx/c: upstream-keepalive-timeout: "4" '
                      "(global: every Ingress of this controller)"),
    ("istio", "DestinationRule (host web.shop.svc.cluster.local): "
              "spec.trafficPolicy.connectionPool.http.idleTimeout: 4.5s"),
    ("envoy-gateway", "BackendTrafficPolicy (targetRefs: HTTPRoute shop/web): "
                      "spec.timeout.http.connectionIdleTimeout: 4500ms"),
    ("nginx-gateway-fabric", "UpstreamSettingsPolicy (targetRefs: Service shop/web): "
                             "spec.keepAlive.timeout: 4500ms"),
])
def test_each_data_plane_is_fixed_in_its_own_syntax(plane: str, fix: str) -> None:
    route = route_of(ingress("web", "web"))
    [target], _ = pod_targets([route], backend("web", [("p", "rs", "10.0.0.1")]))
    setting = IdleSetting(plane, 60.0, "x", config_ref="ingress-nginx/c")
    plan = audit.plan(target, setting, max_idle_s=120)
    # just enough to call a pod still open safe behind 60 s (67 s), and time for a sweep
    assert plan.max_idle_s == 67 + audit.SWEEP_WAIT_S
    found = audit.finding(plan, measured(5.5, limit_s=77))
    assert found.verdict == "unsafe" and found.slack_s == pytest.approx(-54.5)
    assert found.fix_proxy == fix
    assert found.fix_app.startswith("make the app keep idle connections at least 67s")


def test_still_open_at_the_limit_is_safe_and_unknown_planes_only_measure() -> None:
    route = route_of(ingress("web", "web"))
    [target], _ = pod_targets([route], backend("web", [("p", "rs", "10.0.0.1")]))
    plan = audit.plan(target, IdleSetting("ingress-nginx", 60.0, "x"), max_idle_s=120)
    assert audit.finding(plan, measured(None, limit_s=77)).verdict == "safe"
    long_pool = audit.plan(target, IdleSetting("envoy-gateway", 3600.0, "x"), max_idle_s=120)
    assert long_pool.max_idle_s == 120
    assert audit.finding(long_pool, measured(None, limit_s=120)).verdict == "inconclusive"
    unknown = audit.plan(target, IdleSetting("class traefik", None, "unknown"), max_idle_s=30)
    found = audit.finding(unknown, measured(5.0, limit_s=30))
    assert found.verdict == "unknown" and "give --proxy-idle" in found.message


def test_http2_backends_are_listed_not_probed() -> None:
    route = route_of(ingress("web", "web"))
    [target], _ = pod_targets([route], backend("web", [("p", "rs", "10.0.0.1")],
                                                app_protocol="kubernetes.io/h2c"))
    plan = audit.plan(target, IdleSetting("ingress-nginx", 60.0, "x"), max_idle_s=120)
    assert plan.skip.startswith("HTTP/2 backend (appProtocol kubernetes.io/h2c)")
    assert audit.finding(plan, None).verdict == "unprobed"
    grpc = route_of(ingress("g", "web", annotations={
        "nginx.ingress.kubernetes.io/backend-protocol": "GRPC"}))
    [target], _ = pod_targets([grpc], backend("web", [("p", "rs", "10.0.0.1")]))
    assert audit.plan(target, IdleSetting("ingress-nginx", 60.0, "x"), max_idle_s=1).skip


# outputs

def report() -> ScanReport:
    route = route_of(ingress("web", "web"))
    [target], _ = pod_targets([route], backend("web", [("p\"1", "rs", "10.0.0.1")]))
    plan = audit.plan(target, IdleSetting("ingress-nginx", 60.0, "src", config_ref="a/b"),
                      max_idle_s=120)
    return ScanReport([audit.finding(plan, measured(5.0, limit_s=67))], ["shop"],
                      elapsed_s=67.4, limit_s=67, finished_at_unix_s=1795000000.5,
                      unreadable={"ingressclasses": "forbidden: list ingressclasses"})


def test_table_json_and_prometheus_say_the_same() -> None:
    text = render_table(report())
    assert re.search(r"Ingress shop/web \(shop.example/api\)\s+shop/web\s+p\"1\s+"
                     r"ingress-nginx\s+60s\s+5.0 s\s+-55.0 s\s+EXPOSED", text), text
    assert 'fix, data plane: ConfigMap a/b: upstream-keepalive-timeout: "4"' in text
    assert "not read: ingressclasses: forbidden: list ingressclasses" in text
    assert '"verdict": "unsafe"' in as_json(report())
    metrics = as_prometheus(report())
    assert ('tuner_scan_exposed{route_kind="Ingress",route_namespace="shop",route="web",'
            'namespace="shop",service="web",pod="p\\"1",data_plane="ingress-nginx"} 1.0'
            ) in metrics
    assert "tuner_scan_last_run_timestamp_seconds 1795000000.5" in metrics
    for line in metrics.splitlines():  # every sample line: name{labels} number
        assert line.startswith("#") or re.fullmatch(r"[a-z_]+(\{.*\})? -?[0-9.e+]+", line)


@pytest.mark.parametrize(("args", "named"), [
    (["--proxy-idle", "traefik=soon"], "--proxy-idle 'traefik=soon': 'soon'"),
    (["--ingress-nginx-configmap", "just-a-name"], "--ingress-nginx-configmap 'just-a-name'"),
    (["--push", "pushgateway:9091"], "--push 'pushgateway:9091'"),
    (["--samples", "0"], "--samples must be at least 1, got 0"),
    (["--concurrency", "0"], "--concurrency must be at least 1, got 0"),
])
def test_bad_options_are_named_before_any_cluster_is_touched(args: list[str], named: str
                                                             ) -> None:
    done = subprocess.run([sys.executable, "-m", "tuner.cli", "scan", "--kubeconfig",
                           "/nonexistent/kubeconfig", *args], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and named in done.stderr, done.stderr
