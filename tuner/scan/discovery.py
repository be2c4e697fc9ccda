"""From routes to the pods behind them (pure: API objects in, targets out).

Objects are the API server's JSON (dicts), as `listing.py` reads them: no client models, so
these functions test without a cluster and read the same fields the documentation names.

Design decision: a route's backend is followed the way the data plane follows it (Service
port -> the EndpointSlice port of the same name -> each ready endpoint's address), and pods
are grouped by their controller (a ReplicaSet, StatefulSet, ...): pods of one owner run the
same app with the same settings, so one of each answers for all unless `all_pods` is set.
A rollout's two ReplicaSets are two owners, so both versions are probed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Obj = Mapping[str, Any]

INGRESS_CLASS_ANNOTATION = "kubernetes.io/ingress.class"
DEFAULT_CLASS_ANNOTATION = "ingressclass.kubernetes.io/is-default-class"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


@dataclass
class Snapshot:
    """Everything the scan read, by kind; `unreadable` says which kinds could not be read
    and why (a 403 names the verb and resource; a 404 means the API is not installed)."""

    ingresses: list[Obj] = field(default_factory=list)
    ingress_classes: list[Obj] = field(default_factory=list)
    httproutes: list[Obj] = field(default_factory=list)
    gateways: list[Obj] = field(default_factory=list)
    gateway_classes: list[Obj] = field(default_factory=list)
    services: list[Obj] = field(default_factory=list)
    endpoint_slices: list[Obj] = field(default_factory=list)
    pods: list[Obj] = field(default_factory=list)
    destination_rules: list[Obj] = field(default_factory=list)
    backend_traffic_policies: list[Obj] = field(default_factory=list)
    upstream_settings_policies: list[Obj] = field(default_factory=list)
    #: the ingress-nginx controller's ConfigMap, None if missing or unreadable
    ingress_nginx_configmap: Obj | None = None
    ingress_nginx_configmap_ref: str = "ingress-nginx/ingress-nginx-controller"
    unreadable: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Route:
    """One way traffic reaches a Service: an Ingress rule path or an HTTPRoute rule."""

    kind: str  # "Ingress" or "HTTPRoute"
    namespace: str
    name: str
    #: the Ingress class, or the Gateways (ns/name) the HTTPRoute attaches to
    class_name: str
    parents: tuple[str, ...]
    host: str
    path: str
    service_namespace: str
    service: str
    #: the Service port as the route names it: a number, or a port name
    service_port: int | str | None
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        where = f"{self.host or '*'}{self.path}"
        return f"{self.kind} {self.namespace}/{self.name} ({where})"


@dataclass(frozen=True)
class PodTarget:
    """One pod to probe for one route."""

    route: Route
    pod: str  # "" when the endpoint names no pod
    owner: str  # "ReplicaSet/web-7d9f" or "" (no controller)
    address: str
    port: int
    #: pods of the same owner and route left out (they run the same app)
    n_same_owner: int = 1
    #: the Service port's appProtocol ("kubernetes.io/h2c", ...), "" if unset
    app_protocol: str = ""


@dataclass(frozen=True)
class Gap:
    """A route whose backend could not be followed to a pod, and why."""

    route: Route
    reason: str


def name_of(obj: Obj) -> str:
    return str(obj.get("metadata", {}).get("name", ""))


def namespace_of(obj: Obj) -> str:
    return str(obj.get("metadata", {}).get("namespace", ""))


def _annotations(obj: Obj) -> dict[str, str]:
    return dict(obj.get("metadata", {}).get("annotations") or {})


def default_ingress_class(ingress_classes: Sequence[Obj]) -> str:
    for cls in ingress_classes:
        if _annotations(cls).get(DEFAULT_CLASS_ANNOTATION) == "true":
            return name_of(cls)
    return ""


def routes_from_ingresses(ingresses: Sequence[Obj], *, default_class: str = "") -> list[Route]:
    """Every (rule, path) backend of every Ingress, and the default backend."""
    routes: list[Route] = []
    for ing in ingresses:
        spec = ing.get("spec") or {}
        annotations = _annotations(ing)
        class_name = (spec.get("ingressClassName") or annotations.get(INGRESS_CLASS_ANNOTATION)
                      or default_class)
        ns, name = namespace_of(ing), name_of(ing)

        def add(backend: Obj | None, host: str, path: str, *, ns: str = ns, name: str = name,
                class_name: str = class_name, annotations: dict[str, str] = annotations
                ) -> None:
            service = (backend or {}).get("service")
            if not service:
                return  # a resource backend (e.g. a bucket): no Service to probe
            port = service.get("port") or {}
            routes.append(Route(
                kind="Ingress", namespace=ns, name=name, class_name=class_name, parents=(),
                host=host, path=path, service_namespace=ns, service=service["name"],
                service_port=port.get("number") or port.get("name"), annotations=annotations))

        if spec.get("defaultBackend"):
            add(spec["defaultBackend"], "", "/")
        for rule in spec.get("rules") or []:
            for http_path in (rule.get("http") or {}).get("paths") or []:
                add(http_path.get("backend"), rule.get("host", ""), http_path.get("path", "/"))
    return routes


def routes_from_httproutes(httproutes: Sequence[Obj], gateways: Sequence[Obj]) -> list[Route]:
    """Every Service backendRef of every HTTPRoute rule; the class is the parent Gateways'
    gatewayClassName (a parent Gateway that could not be read contributes '?')."""
    classes = {(namespace_of(gw), name_of(gw)): str((gw.get("spec") or {})
                                                    .get("gatewayClassName", ""))
               for gw in gateways}
    routes: list[Route] = []
    for hr in httproutes:
        spec = hr.get("spec") or {}
        ns, name = namespace_of(hr), name_of(hr)
        parents = []
        for ref in spec.get("parentRefs") or []:
            if ref.get("kind", "Gateway") == "Gateway":
                parents.append((ref.get("namespace") or ns, ref["name"]))
        class_names = sorted({classes.get(parent, "?") for parent in parents}) or ["?"]
        host = (spec.get("hostnames") or [""])[0]
        for rule in spec.get("rules") or []:
            path = "/"
            for match in rule.get("matches") or []:
                value = (match.get("path") or {}).get("value")
                if value:
                    path = value
                    break
            for ref in rule.get("backendRefs") or []:
                if ref.get("kind", "Service") != "Service" or ref.get("group", "") != "":
                    continue
                routes.append(Route(
                    kind="HTTPRoute", namespace=ns, name=name,
                    class_name=",".join(class_names),
                    parents=tuple(f"{pns}/{pname}" for pns, pname in parents), host=host,
                    path=path, service_namespace=ref.get("namespace") or ns,
                    service=ref["name"], service_port=ref.get("port"),
                    annotations=_annotations(hr)))
    return routes


def _service_port(service: Obj, wanted: int | str | None) -> Obj | None:
    """The Service port a route names by number or name; None if the Service has no such
    port (a route naming none picks the only one)."""
    ports = (service.get("spec") or {}).get("ports") or []
    for port in ports:
        if (wanted is None and len(ports) == 1) or wanted in (port.get("port"),
                                                               port.get("name")):
            return dict(port)
    return None


def pod_targets(routes: Sequence[Route], snapshot: Snapshot, *, all_pods: bool = False
                ) -> tuple[list[PodTarget], list[Gap]]:
    """The pods to probe for each route, and the routes that lead to none (with why)."""
    services = {(namespace_of(s), name_of(s)): s for s in snapshot.services}
    pods = {(namespace_of(p), name_of(p)): p for p in snapshot.pods}
    slices: dict[tuple[str, str], list[Obj]] = {}
    for eps in snapshot.endpoint_slices:
        labels = eps.get("metadata", {}).get("labels") or {}
        if SERVICE_NAME_LABEL in labels:
            slices.setdefault((namespace_of(eps), labels[SERVICE_NAME_LABEL]), []).append(eps)
    targets: list[PodTarget] = []
    gaps: list[Gap] = []
    for route in routes:
        key = (route.service_namespace, route.service)
        service = services.get(key)
        if service is None:
            gaps.append(Gap(route, f"Service {key[0]}/{key[1]} not found"))
            continue
        service_port = _service_port(service, route.service_port)
        if service_port is None:
            gaps.append(Gap(route, f"Service {key[0]}/{key[1]} has no port "
                                   f"{route.service_port!r}"))
            continue
        found = _endpoints(slices.get(key, []), str(service_port.get("name", "")),
                           route.service_namespace, pods)
        if not found:
            gaps.append(Gap(route, f"Service {key[0]}/{key[1]} has no ready endpoint on port "
                                   f"{route.service_port!r}"))
            continue
        by_owner: dict[str, list[tuple[str, str, int]]] = {}
        for pod_name, owner, address, port in found:
            group = f"{owner}|{pod_name}|{address}" if all_pods or not owner else owner
            by_owner.setdefault(group, []).append((pod_name, address, port))
        for group, members in sorted(by_owner.items()):
            pod_name, address, port = sorted(members)[0]
            targets.append(PodTarget(route=route, pod=pod_name,
                                     owner=group.split("|", 1)[0], address=address,
                                     port=port, n_same_owner=len(members),
                                     app_protocol=str(service_port.get("appProtocol", ""))))
    return targets, gaps


def _endpoints(slices: Sequence[Obj], port_name: str, namespace: str,
               pods: Mapping[tuple[str, str], Obj]) -> list[tuple[str, str, str, int]]:
    """(pod, owner, address, port) of every ready endpoint serving `port_name`."""
    found = []
    for eps in slices:
        if eps.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
            continue  # FQDN endpoints: nothing to probe by address
        port = next((p.get("port") for p in eps.get("ports") or []
                     if (p.get("name") or "") == port_name), None)
        if port is None:
            continue
        for endpoint in eps.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue  # the data plane sends it nothing either
            ref = endpoint.get("targetRef") or {}
            pod_name = ref.get("name", "") if ref.get("kind") == "Pod" else ""
            owner = _controller(pods.get((ref.get("namespace") or namespace, pod_name)))
            for address in (endpoint.get("addresses") or [])[:1]:
                found.append((pod_name, owner, str(address), int(port)))
    return found


def _controller(pod: Obj | None) -> str:
    if pod is None:
        return ""
    for ref in pod.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return f"{ref.get('kind')}/{ref.get('name')}"
    return ""
