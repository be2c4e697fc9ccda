"""Read what the scan needs from the API server into one `Snapshot` (I/O).

Design decision: objects are read as the server's JSON through one generic GET (paged,
bounded by the client module's REQUEST_TIMEOUT, errors translated by its `api_errors`), so
CRDs (Gateway API, Istio, Envoy Gateway, NGINX Gateway Fabric) and built-in kinds are read the
same way and the pure layers see the documented field names.

What the scan cannot do without (Services, EndpointSlices, Pods, and the route kinds it
was asked for) is an error naming the verb and resource when forbidden. What only refines
the answer (classes, policies, the ingress-nginx ConfigMap) is recorded in
`Snapshot.unreadable`, and each value that falls back to a default says so.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import KubeForbidden, KubeNotFound
from tuner.kube.client import REQUEST_TIMEOUT, Connection, api_errors
from tuner.scan.discovery import Obj, Snapshot

#: objects per page: a large cluster's pods arrive in bounded requests
PAGE_SIZE = 500
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
RBAC_HINT = "manifests/scan/base/rbac.yaml lists everything the scan reads"


@dataclass(frozen=True)
class Resource:
    group: str  # "" for the core API
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    def path(self, namespace: str | None) -> str:
        root = f"/api/{self.version}" if not self.group else \
            f"/apis/{self.group}/{self.version}"
        if namespace is None or not self.namespaced:
            return f"{root}/{self.plural}"
        return f"{root}/namespaces/{namespace}/{self.plural}"


INGRESSES = Resource("networking.k8s.io", "v1", "ingresses", "Ingress")
INGRESS_CLASSES = Resource("networking.k8s.io", "v1", "ingressclasses", "IngressClass",
                           namespaced=False)
HTTPROUTES = Resource("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute")
GATEWAYS = Resource("gateway.networking.k8s.io", "v1", "gateways", "Gateway")
GATEWAY_CLASSES = Resource("gateway.networking.k8s.io", "v1", "gatewayclasses",
                           "GatewayClass", namespaced=False)
SERVICES = Resource("", "v1", "services", "Service")
ENDPOINT_SLICES = Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice")
PODS = Resource("", "v1", "pods", "Pod")
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")
DESTINATION_RULES = Resource("networking.istio.io", "v1", "destinationrules",
                             "DestinationRule")
BACKEND_TRAFFIC_POLICIES = Resource("gateway.envoyproxy.io", "v1alpha1",
                                    "backendtrafficpolicies", "BackendTrafficPolicy")
UPSTREAM_SETTINGS_POLICIES = Resource("gateway.nginx.org", "v1alpha1",
                                      "upstreamsettingspolicies", "UpstreamSettingsPolicy")
#: Istio's root namespace: mesh-wide DestinationRules live there
ISTIO_ROOT_NAMESPACE = "istio-system"


def _get(connection: Connection, path: str, query: list[tuple[str, str]], *, verb: str,
         namespace: str, name: str, resource: Resource) -> Any:
    from kubernetes.client.exceptions import ApiException

    api_client = connection.core.api_client
    with api_errors(verb, namespace, name, connection.host, connection.context,
                    resource=resource.plural, kind=resource.kind):
        params = api_client.param_serialize(
            "GET", path, query_params=query, header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"])
        response = api_client.call_api(*params, _request_timeout=REQUEST_TIMEOUT)
        response.read()
        if not 200 <= response.status < 300:
            raise ApiException(http_resp=response)
        return json.loads(response.data)


def list_objects(connection: Connection, resource: Resource, namespace: str | None
                 ) -> list[Obj]:
    """Every object of `resource` in `namespace` (None: all namespaces), page by page.
    KubeForbidden names the verb and resource; KubeNotFound means the API is not served."""
    where = namespace if namespace is not None and resource.namespaced else "*"
    items: list[Obj] = []
    token = ""
    while True:
        query = [("limit", str(PAGE_SIZE))] + ([("continue", token)] if token else [])
        try:
            page = _get(connection, resource.path(namespace), query, verb="list",
                        namespace=where, name="*", resource=resource)
        except KubeForbidden as exc:
            scope = "cluster-wide" if where == "*" else f"in namespace {where!r}"
            raise KubeForbidden(
                f"forbidden: may not list {resource.plural} ({resource.group or 'core'}"
                f"/{resource.version}) {scope}; grant the scan's account verb list on "
                f"resource {resource.plural} there ({RBAC_HINT}), or scan fewer namespaces "
                f"with -n") from exc
        items.extend(page.get("items") or [])
        token = (page.get("metadata") or {}).get("continue") or ""
        if not token:
            return items


def get_object(connection: Connection, resource: Resource, namespace: str, name: str
               ) -> Obj:
    try:
        obj: Obj = _get(connection, f"{resource.path(namespace)}/{name}", [], verb="get",
                        namespace=namespace, name=name, resource=resource)
    except KubeForbidden as exc:
        raise KubeForbidden(f"forbidden: may not get {resource.plural} {namespace}/{name}; "
                            f"{RBAC_HINT}") from exc
    return obj


def current_namespace(kubeconfig: str | None, context: str | None) -> str:
    """The kubeconfig context's namespace, or the pod's own in a cluster, or "default"."""
    if IN_CLUSTER_NAMESPACE.exists() and kubeconfig is None:
        return IN_CLUSTER_NAMESPACE.read_text().strip()
    import yaml
    from kubernetes.config.config_exception import ConfigException
    from kubernetes.config.kube_config import list_kube_config_contexts

    try:
        contexts, active = list_kube_config_contexts(  # type: ignore[no-untyped-call]
            config_file=kubeconfig)
    except (ConfigException, OSError, yaml.YAMLError):
        return "default"  # connect() has already said what is wrong with the kubeconfig
    chosen = active
    if context is not None:
        chosen = next((c for c in contexts if c.get("name") == context), active)
    return str((chosen or {}).get("context", {}).get("namespace") or "default")


def _each(connection: Connection, resource: Resource, namespaces: Sequence[str] | None
          ) -> Iterator[Obj]:
    for namespace in namespaces if namespaces is not None else [None]:
        yield from list_objects(connection, resource, namespace)


def read_snapshot(connection: Connection, *, namespaces: Sequence[str] | None,
                  ingress_nginx_configmap: str) -> Snapshot:
    """Everything the scan uses, in `namespaces` (None: cluster-wide)."""
    snap = Snapshot(ingress_nginx_configmap_ref=ingress_nginx_configmap)

    def optional(key: str, resource: Resource, spaces: Sequence[str] | None) -> list[Obj]:
        try:
            return list(_each(connection, resource, spaces))
        except KubeNotFound:
            snap.unreadable[key] = f"{resource.group}/{resource.version} is not served"
        except KubeForbidden:
            snap.unreadable[key] = f"forbidden: list {resource.plural}"
        return []

    snap.ingresses = list(_each(connection, INGRESSES, namespaces))
    snap.httproutes = optional("httproutes", HTTPROUTES, namespaces)
    snap.ingress_classes = optional("ingressclasses", INGRESS_CLASSES, None)
    snap.gateway_classes = optional("gatewayclasses", GATEWAY_CLASSES, None)
    snap.gateways = _tolerant(connection, snap, "gateways", GATEWAYS,
                              _parent_namespaces(snap, namespaces))
    needed = _backend_namespaces(snap, namespaces)
    snap.services = list(_each(connection, SERVICES, needed))
    snap.endpoint_slices = list(_each(connection, ENDPOINT_SLICES, needed))
    snap.pods = list(_each(connection, PODS, needed))
    rule_spaces = None if needed is None else sorted({*needed, ISTIO_ROOT_NAMESPACE})
    snap.destination_rules = _tolerant(connection, snap, "destinationrules",
                                       DESTINATION_RULES, rule_spaces)
    snap.backend_traffic_policies = optional("backendtrafficpolicies",
                                             BACKEND_TRAFFIC_POLICIES, namespaces)
    snap.upstream_settings_policies = optional("upstreamsettingspolicies",
                                               UPSTREAM_SETTINGS_POLICIES, needed)
    cm_ns, _, cm_name = ingress_nginx_configmap.partition("/")
    if snap.ingresses:  # only ingress-nginx reads it; no Ingress, no need
        try:
            snap.ingress_nginx_configmap = get_object(connection, CONFIGMAPS, cm_ns, cm_name)
        except KubeNotFound:
            snap.unreadable["ingress-nginx-configmap"] = \
                f"ConfigMap {ingress_nginx_configmap} not found"
        except KubeForbidden:
            snap.unreadable["ingress-nginx-configmap"] = \
                f"forbidden: get configmaps {ingress_nginx_configmap}"
    return snap


def _tolerant(connection: Connection, snap: Snapshot, key: str, resource: Resource,
              namespaces: Sequence[str] | None) -> list[Obj]:
    """Like `optional`, per namespace: the mesh root namespace may be unreadable while the
    app's own namespace is not."""
    found: list[Obj] = []
    for namespace in namespaces if namespaces is not None else [None]:
        try:
            found.extend(list_objects(connection, resource, namespace))
        except KubeNotFound:
            snap.unreadable[key] = f"{resource.group}/{resource.version} is not served"
            return found
        except KubeForbidden:
            snap.unreadable.setdefault(key, f"forbidden: list {resource.plural} in "
                                            f"{namespace or 'all namespaces'}")
    return found


def _parent_namespaces(snap: Snapshot, namespaces: Sequence[str] | None
                       ) -> list[str] | None:
    """The namespaces named plus those the HTTPRoutes' parent Gateways live in."""
    if namespaces is None:
        return None
    spaces = set(namespaces)
    for route in snap.httproutes:
        for ref in (route.get("spec") or {}).get("parentRefs") or []:
            if ref.get("namespace"):
                spaces.add(str(ref["namespace"]))
    return sorted(spaces)


def _backend_namespaces(snap: Snapshot, namespaces: Sequence[str] | None
                        ) -> list[str] | None:
    """The namespaces the scan named plus those its routes' backendRefs point into."""
    if namespaces is None:
        return None
    spaces = set(namespaces)
    for route in snap.httproutes:
        for rule in (route.get("spec") or {}).get("rules") or []:
            for ref in rule.get("backendRefs") or []:
                if ref.get("namespace"):
                    spaces.add(str(ref["namespace"]))
    return sorted(spaces)
