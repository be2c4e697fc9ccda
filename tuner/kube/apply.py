"""`tuner apply`: write ConfigMaps with the official `kubernetes` client.

Design decision: create-or-replace with optimistic concurrency, not a blind overwrite. The
ConfigMap is read, our keys are merged into its data (the ingress-nginx controller's
ConfigMap holds dozens of other settings that must survive), and it is replaced carrying
the resourceVersion that was read; a 409 (someone else wrote in between) re-reads and
retries. Every object is validated (tuner.kube.objects) before the first write, and every
`ApiException` is translated at one boundary (`translate_errors`) into a `KubeError` that names
the verb, the resource and the namespace.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import ConfigError, KubeError, KubeUnreachable

MAX_CONFLICT_RETRIES = 5
#: (connect, read) seconds for every API request: the client waits forever by default, and
#: an API server dropping packets (a control plane upgrade) must end in a retry, not a hang
REQUEST_TIMEOUT = (5, 30)
#: answers that mean "not now" (overloaded, upgrading, behind a load balancer): retried
UNAVAILABLE = (429, 500, 502, 503, 504)


@dataclass(frozen=True)
class ApplyResult:
    namespace: str
    name: str
    #: "created", "updated", "unchanged", or with --dry-run "would create" / "would update"
    action: str
    diff: str


def connect(*, kubeconfig: str | None, context: str | None) -> Any:
    """A CoreV1Api from a kubeconfig (KUBECONFIG / --kubeconfig / --context) or, with no
    kubeconfig at all, the in-cluster service account."""
    import yaml
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    if kubeconfig is not None:
        check_kubeconfig(Path(kubeconfig))
    try:
        config.load_kube_config(config_file=kubeconfig, context=context)
    except (ConfigException, OSError, yaml.YAMLError) as exc:
        if kubeconfig or context:
            raise KubeError(f"cannot load kubeconfig {kubeconfig or '(default)'}"
                            f"{f' context {context}' if context else ''}: {exc}") from exc
        try:
            config.load_incluster_config()
        except ConfigException as in_cluster:
            raise KubeError("no kubeconfig found (set KUBECONFIG or --kubeconfig) and not "
                            f"running in a cluster: {in_cluster}") from in_cluster
    configuration = client.Configuration.get_default_copy()
    configuration.retries = 1  # fail fast on a refused connection; the message says where
    return client.CoreV1Api(client.ApiClient(configuration)), configuration.host, context


def check_kubeconfig(path: Path) -> None:
    """A kubeconfig the user names must be a YAML mapping: the client's loader meets
    anything else with a TypeError or a YAML traceback."""
    import yaml

    try:
        with path.open("rb") as stream:
            data = yaml.safe_load(stream)
    except FileNotFoundError:
        raise ConfigError(f"--kubeconfig {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"--kubeconfig {path} cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--kubeconfig {path} is not valid YAML: "
                          f"{' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--kubeconfig {path} is not a kubeconfig (a YAML mapping with "
                          f"clusters, users and contexts); it holds a {type(data).__name__}")


@contextmanager
def translate_errors(verb: str, namespace: str, name: str, host: str, context: str | None, *,
               resource: str = "configmaps", kind: str = "ConfigMap") -> Iterator[None]:
    """The one place where client exceptions become `KubeError`s."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as exc:
        message = _server_message(exc)
        if exc.status == 403:
            raise KubeError(
                f"forbidden: may not {verb} {resource} in namespace {namespace!r} "
                f"({kind} {name}); grant the tuner's account a Role with verb {verb} on "
                f"resource {resource} in {namespace!r} (manifests/base/rbac.yaml lists all "
                f"it needs). Server said: {message}") from exc
        if exc.status in UNAVAILABLE:
            raise KubeUnreachable(f"the API server could not {verb} {kind} {namespace}/{name} "
                                  f"now ({exc.status}): {message}") from exc
        if exc.status == 422:
            raise KubeError(f"the API server rejected {kind} {namespace}/{name}: {message}"
                            ) from exc
        if exc.status == 404:
            raise KubeError(f"{kind} {namespace}/{name} does not exist (404): {message}"
                            ) from exc
        raise KubeError(f"{verb} {kind} {namespace}/{name} failed ({exc.status}): "
                        f"{message}") from exc
    except HTTPError as exc:
        raise KubeUnreachable(f"cannot reach the Kubernetes API server at {host}"
                        f"{f' (context {context})' if context else ''}: {exc}; check the "
                        "kubeconfig and that the cluster is up") from exc


def _server_message(exc: Any) -> str:
    import json

    try:
        return str(json.loads(exc.body).get("message", exc.body))
    except (TypeError, ValueError):
        return str(exc.body or exc.reason)


def _diff(namespace: str, name: str, before: Mapping[str, str],
          after: Mapping[str, str]) -> str:
    lines_before = [f"{k}: {v}" for k, v in sorted(before.items())]
    lines_after = [f"{k}: {v}" for k, v in sorted(after.items())]
    return "\n".join(difflib.unified_diff(lines_before, lines_after,
                                          f"{namespace}/{name} (cluster)",
                                          f"{namespace}/{name} (tuner)", lineterm=""))


def apply_configmaps(connection: Any, objects: list[dict[str, Any]], *,
                     dry_run: bool) -> list[ApplyResult]:
    """Create or update each ConfigMap, merging our keys into existing data."""
    api, host, context = connection
    return [_apply_one(api, host, context, obj, dry_run=dry_run) for obj in objects]


def _apply_one(api: Any, host: str, context: str | None, obj: dict[str, Any], *,
               dry_run: bool) -> ApplyResult:
    from kubernetes.client.exceptions import ApiException

    namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    for _attempt in range(MAX_CONFLICT_RETRIES):
        with translate_errors("get", namespace, name, host, context):
            try:
                current = api.read_namespaced_config_map(name, namespace,
                                                         _request_timeout=REQUEST_TIMEOUT)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                current = None
        if current is None:
            _require_namespace(api, host, context, namespace, name)
            diff = _diff(namespace, name, {}, obj["data"])
            if dry_run:
                return ApplyResult(namespace, name, "would create", diff)
            with translate_errors("create", namespace, name, host, context):
                try:
                    api.create_namespaced_config_map(namespace, obj,
                                                     _request_timeout=REQUEST_TIMEOUT)
                except ApiException as exc:
                    if exc.status == 409:  # created by someone else meanwhile
                        continue
                    raise
            return ApplyResult(namespace, name, "created", diff)
        before = dict(current.data or {})
        after = {**before, **obj["data"]}
        diff = _diff(namespace, name, before, after)
        annotations = dict(current.metadata.annotations or {})
        annotations.update(obj["metadata"].get("annotations", {}))
        labels = dict(current.metadata.labels or {})
        labels.update(obj["metadata"].get("labels", {}))
        if after == before and annotations == (current.metadata.annotations or {}):
            return ApplyResult(namespace, name, "unchanged", "")
        if dry_run:
            return ApplyResult(namespace, name, "would update", diff)
        body = {"apiVersion": "v1", "kind": "ConfigMap", "data": after,
                "metadata": {"name": name, "namespace": namespace, "labels": labels,
                             "annotations": annotations,
                             "resourceVersion": current.metadata.resource_version}}
        with translate_errors("update", namespace, name, host, context):
            try:
                api.replace_namespaced_config_map(name, namespace, body,
                                                  _request_timeout=REQUEST_TIMEOUT)
            except ApiException as exc:
                if exc.status == 409:  # written by someone else since our read
                    continue
                raise
        return ApplyResult(namespace, name, "updated", diff)
    raise KubeError(f"ConfigMap {namespace}/{name} kept changing under us: "
                    f"{MAX_CONFLICT_RETRIES} conflicts (409) in a row; try again")


def _require_namespace(api: Any, host: str, context: str | None, namespace: str,
                       name: str) -> None:
    from kubernetes.client.exceptions import ApiException

    with translate_errors("get", namespace, name, host, context):
        try:
            api.read_namespace(namespace, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                raise KubeError(f"namespace {namespace!r} does not exist (needed for "
                                f"ConfigMap {name}); create it or choose another "
                                "--namespace") from exc
            if exc.status == 403:
                return  # may not read namespaces: the create will tell
            raise
