"""`tuner apply`: write ConfigMaps with the official `kubernetes` client.

Design decision: merge, not overwrite. Our keys are merged into the ConfigMap's data (the
ingress-nginx controller's ConfigMap holds dozens of other settings that must survive)
through the one write loop of tuner.kube.client (read, then create or merge-patch carrying
the resourceVersion read; a 409 re-reads and retries). Every object is validated
(tuner.kube.objects) before the first write; a dry run reads and diffs, and writes nothing.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from tuner.errors import KubeError, KubeForbidden, KubeNotFound
from tuner.kube.client import (
    REQUEST_TIMEOUT,
    Connection,
    api_errors,
    connect,
    read_configmap,
    write_configmap,
)

__all__ = ["ApplyResult", "apply_configmaps", "connect"]


@dataclass(frozen=True)
class ApplyResult:
    namespace: str
    name: str
    #: "created", "updated", "unchanged", or with --dry-run "would create" / "would update"
    action: str
    diff: str
    kind: str = "ConfigMap"


def _diff(namespace: str, name: str, before: Mapping[str, str],
          after: Mapping[str, str]) -> str:
    lines_before = [f"{k}: {v}" for k, v in sorted(before.items())]
    lines_after = [f"{k}: {v}" for k, v in sorted(after.items())]
    return "\n".join(difflib.unified_diff(lines_before, lines_after,
                                          f"{namespace}/{name} (cluster)",
                                          f"{namespace}/{name} (tuner)", lineterm=""))


def apply_configmaps(connection: Connection, objects: list[dict[str, Any]], *,
                     dry_run: bool) -> list[ApplyResult]:
    """Create or update each object, merging ours into what exists: a ConfigMap's keys into
    its data, a DestinationRule's or BackendTrafficPolicy's fields into its spec."""
    return [_apply_one(connection, obj, dry_run=dry_run) if obj["kind"] == "ConfigMap"
            else _apply_custom(connection, obj, dry_run=dry_run) for obj in objects]


def _apply_custom(connection: Connection, obj: dict[str, Any], *, dry_run: bool
                  ) -> ApplyResult:
    from tuner.kube.custom import write_custom

    namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    action, before, after = write_custom(connection, obj, dry_run=dry_run)
    diff = "\n".join(difflib.unified_diff(
        yaml.safe_dump(before, sort_keys=True).splitlines() if before else [],
        yaml.safe_dump(after, sort_keys=True).splitlines(),
        f"{obj['kind']} {namespace}/{name} spec (cluster)",
        f"{obj['kind']} {namespace}/{name} spec (tuner)", lineterm=""))
    return ApplyResult(namespace, name, action, diff if action != "unchanged" else "",
                       kind=obj["kind"])


def _apply_one(connection: Connection, obj: dict[str, Any], *, dry_run: bool) -> ApplyResult:
    namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    current = read_configmap(connection, namespace, name)
    if current is None:
        _require_namespace(connection, namespace, name)
    before = dict(current.data or {}) if current is not None else {}
    diff = _diff(namespace, name, before, {**before, **obj["data"]})
    if dry_run:
        action = "would create" if current is None else (
            "would update" if diff else "unchanged")
        return ApplyResult(namespace, name, action, diff)
    action = write_configmap(connection, namespace, name, data=obj["data"], create=True,
                             annotations=obj["metadata"].get("annotations", {}),
                             labels=obj["metadata"].get("labels", {}))
    return ApplyResult(namespace, name, action, diff if action != "unchanged" else "")


def _require_namespace(connection: Connection, namespace: str, name: str) -> None:
    api, host, context = connection
    try:
        with api_errors("get", namespace, namespace, host, context, resource="namespaces",
                        kind="Namespace"):
            api.read_namespace(namespace, _request_timeout=REQUEST_TIMEOUT)
    except KubeNotFound as exc:
        raise KubeError(f"namespace {namespace!r} does not exist (needed for ConfigMap "
                        f"{name}); create it or choose another --namespace") from exc
    except KubeForbidden:
        return  # may not read namespaces: the create will tell
