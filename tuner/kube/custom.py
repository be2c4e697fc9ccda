"""Write a custom object (an Istio DestinationRule, an Envoy Gateway BackendTrafficPolicy) the
way `tuner apply` writes ConfigMaps: read, then create, or merge-patch carrying the
resourceVersion read; a 409 reads again. A JSON merge patch keeps every field of the
existing object we do not set (its other traffic policies, its other timeouts).

Errors come from tuner.kube.client's one translation (`api_errors`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tuner.errors import KubeConflict, KubeError, KubeNotFound
from tuner.kube.client import MAX_CONFLICT_RETRIES, REQUEST_TIMEOUT, Connection, api_errors

#: kind -> (group, version, plural) of the objects tuner writes
RESOURCES = {
    "DestinationRule": ("networking.istio.io", "v1", "destinationrules"),
    "BackendTrafficPolicy": ("gateway.envoyproxy.io", "v1alpha1", "backendtrafficpolicies"),
}


def merged(before: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """What a JSON merge patch (RFC 7386) makes of `before` (pure): maps merge, anything
    else (lists included) replaces, None removes."""
    result = dict(before)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def read_custom(connection: Connection, obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """The object as the cluster has it, or None if it does not exist."""
    from kubernetes import client

    group, version, plural = RESOURCES[obj["kind"]]
    namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    api = client.CustomObjectsApi(connection.core.api_client)
    try:
        with api_errors("get", namespace, name, connection.host, connection.context,
                        resource=plural, kind=obj["kind"]):
            found = api.get_namespaced_custom_object(
                group, version, namespace, plural, name, _request_timeout=REQUEST_TIMEOUT)
            result: dict[str, Any] = found  # type: ignore[assignment]
            return result
    except KubeNotFound as exc:
        if "the server could not find the requested resource" in str(exc).lower() or \
                "page not found" in str(exc).lower():
            raise KubeNotFound(f"the cluster does not serve {plural}.{group}: is "
                               f"{'Istio' if group.endswith('istio.io') else 'Envoy Gateway'} "
                               f"installed (its CRDs)? {exc}") from exc
        return None


def write_custom(connection: Connection, obj: Mapping[str, Any], *, dry_run: bool
                 ) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Create `obj` or merge it into the existing one. Returns the action ("created",
    "updated", "unchanged", or with `dry_run` "would create" / "would update") and the
    object's spec before and after."""
    from kubernetes import client

    group, version, plural = RESOURCES[obj["kind"]]
    namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    api = client.CustomObjectsApi(connection.core.api_client)
    for _attempt in range(MAX_CONFLICT_RETRIES):
        current = read_custom(connection, obj)
        if current is None:
            if dry_run:
                return "would create", {}, dict(obj["spec"])
            try:
                with api_errors("create", namespace, name, connection.host,
                                connection.context, resource=plural, kind=obj["kind"]):
                    api.create_namespaced_custom_object(group, version, namespace, plural,
                                                        dict(obj),
                                                        _request_timeout=REQUEST_TIMEOUT)
            except KubeConflict:
                continue  # created by someone else meanwhile: read it and merge
            return "created", {}, dict(obj["spec"])
        before = current.get("spec", {})
        after = merged(before, obj["spec"])
        metadata = current.get("metadata", {})
        want_meta = {k: {**metadata.get(k, {}), **obj["metadata"].get(k, {})}
                     for k in ("labels", "annotations")}
        if after == before and all(want_meta[k] == metadata.get(k, {}) for k in want_meta):
            return "unchanged", before, after
        if dry_run:
            return "would update", before, after
        patch = {"metadata": {"resourceVersion": metadata.get("resourceVersion"),
                              **{k: obj["metadata"][k] for k in want_meta
                                 if k in obj["metadata"]}},
                 "spec": obj["spec"]}
        try:
            with api_errors("patch", namespace, name, connection.host, connection.context,
                            resource=plural, kind=obj["kind"]):
                api.patch_namespaced_custom_object(
                    group, version, namespace, plural, name, patch,
                    _content_type="application/merge-patch+json",
                    _request_timeout=REQUEST_TIMEOUT)
        except KubeConflict:
            continue
        return "updated", before, after
    raise KubeError(f"{obj['kind']} {namespace}/{name} kept changing under us: "
                    f"{MAX_CONFLICT_RETRIES} conflicts (409) in a row; is another tool "
                    "writing it (a GitOps controller reverting it)? Stop that, then run again")
