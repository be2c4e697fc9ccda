"""The Envoy family's idle knob as Kubernetes objects, built as plain values (pure).

- Istio: a DestinationRule for the host the user names,
  `spec.trafficPolicy.connectionPool.http.idleTimeout` (Istio's default: 1 h);
- Envoy Gateway: a BackendTrafficPolicy with its `targetRefs`,
  `spec.timeout.http.connectionIdleTimeout` (default: 1 h).

Both are the proxy's idle timeout toward the app, so they carry the recommendation's proxy
idle timeout, rounded *down* to whole milliseconds (shorter is the safe side), in the Go
duration syntax both accept ("1500ms", "30s", "1h"; Envoy Gateway's schema allows no
fraction). `tuner apply` merges them into an existing object (a JSON merge patch: the
object's other fields stay; a list it sets, `targetRefs`, replaces the one there).
The CRDs in manifests/crds/ are our own minimal schemas of exactly these fields, for a test
API server; the real CRDs come with Istio and Envoy Gateway.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tuner.errors import ConfigError
from tuner.kube.objects import check_name

GATEWAY_OUTPUTS = ("destinationrule", "backendtrafficpolicy")
#: what a BackendTrafficPolicy may target (Envoy Gateway v1.x)
TARGET_KINDS = {"Gateway": "gateway.networking.k8s.io", "HTTPRoute": "gateway.networking.k8s.io",
                "GRPCRoute": "gateway.networking.k8s.io"}
#: Gateway API Duration (GEP-2257), which Envoy Gateway's CRD enforces
GATEWAY_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_HOST = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class TargetRef:
    kind: str
    name: str

    def as_dict(self) -> dict[str, str]:
        return {"group": TARGET_KINDS[self.kind], "kind": self.kind, "name": self.name}


def parse_target_ref(text: str) -> TargetRef:
    """"HTTPRoute/checkout" -> TargetRef; the error names the value and the kinds."""
    kind, _, name = text.partition("/")
    if kind not in TARGET_KINDS or not name:
        raise ConfigError(f"--target-ref {text!r} is not KIND/NAME with KIND one of "
                          f"{', '.join(TARGET_KINDS)}, e.g. HTTPRoute/checkout")
    check_name(f"--target-ref {text!r}: name", name)
    return TargetRef(kind, name)


def gateway_duration(seconds: float) -> str:
    """A proxy idle timeout as a Go / Gateway API duration, rounded down to whole ms."""
    ms = math.floor(round(seconds * 1000, 6))
    if ms < 1:
        raise ConfigError(f"the proxy idle timeout {seconds:g}s is below 1 ms, the least a "
                          "DestinationRule or BackendTrafficPolicy takes")
    for unit_ms, unit in ((3_600_000, "h"), (60_000, "m"), (1000, "s")):
        if ms % unit_ms == 0 and ms // unit_ms < 100_000:
            return f"{ms // unit_ms}{unit}"
    if ms >= 100_000:  # the 5-digit limit: split into seconds and milliseconds
        return f"{ms // 1000}s{ms % 1000}ms" if ms // 1000 < 100_000 else f"{ms // 60000}m"
    return f"{ms}ms"


def _metadata(name: str, namespace: str, annotations: Mapping[str, str]) -> dict[str, Any]:
    check_name("object name", name)
    check_name("namespace", namespace, max_length=63)
    metadata: dict[str, Any] = {"name": name, "namespace": namespace,
                                "labels": {"app.kubernetes.io/managed-by": "tuner"}}
    if annotations:
        metadata["annotations"] = dict(annotations)
    return metadata


def destination_rule(*, proxy_idle_s: float, name: str, namespace: str, host: str | None,
                     annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    """An Istio DestinationRule setting the sidecars' / gateways' idle timeout to `host`."""
    example = ("a DNS name such as checkout.shop.svc.cluster.local (or checkout, short for "
               "the namespace's Service)")
    if not host:
        raise ConfigError(f"-o destinationrule needs --host: a DestinationRule needs the app's "
                          f"host, {example}")
    if not _HOST.match(host) or len(host) > 253:
        raise ConfigError(f"--host {host!r}: a DestinationRule needs the app's host, {example}")
    return {
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": _metadata(name, namespace, annotations or {}),
        "spec": {"host": host, "trafficPolicy": {"connectionPool": {"http": {
            "idleTimeout": gateway_duration(proxy_idle_s)}}}},
    }


def backend_traffic_policy(*, proxy_idle_s: float, name: str, namespace: str,
                           target_refs: Sequence[TargetRef],
                           annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    """An Envoy Gateway BackendTrafficPolicy setting the idle timeout toward the backends of
    the routes (or Gateway) it targets."""
    if not target_refs:
        raise ConfigError("a BackendTrafficPolicy needs what it applies to: give --target-ref "
                          "KIND/NAME (e.g. HTTPRoute/checkout), once per route or Gateway")
    return {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "BackendTrafficPolicy",
        "metadata": _metadata(name, namespace, annotations or {}),
        "spec": {"targetRefs": [ref.as_dict() for ref in target_refs],
                 "timeout": {"http": {"connectionIdleTimeout": gateway_duration(proxy_idle_s)}}},
    }


def gateway_object(output: str, *, proxy_idle_s: float, name: str, namespace: str,
                   host: str | None, target_refs: Sequence[TargetRef],
                   annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The object of `-o destinationrule` or `-o backendtrafficpolicy`."""
    if output == "destinationrule":
        return destination_rule(proxy_idle_s=proxy_idle_s, name=name, namespace=namespace,
                                host=host, annotations=annotations)
    if output == "backendtrafficpolicy":
        return backend_traffic_policy(proxy_idle_s=proxy_idle_s, name=name,
                                      namespace=namespace, target_refs=target_refs,
                                      annotations=annotations)
    raise ConfigError(f"-o {output!r}: choose one of {', '.join(GATEWAY_OUTPUTS)}")
