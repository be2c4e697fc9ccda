"""The one door to the Kubernetes API: connecting, translating the client's exceptions into
typed `KubeError`s, and the one ConfigMap write loop.

Design decision: `ApiException` (and urllib3's errors) are caught in exactly one place,
`api_errors`, and re-raised `from` the original as the error tree of tuner.errors
(KubeNotFound, KubeConflict, KubeForbidden, KubeInvalid, KubeExpired, KubeUnreachable), each
message naming the verb, the object and what to do. Callers branch on those types, never on
a status code. Every request carries REQUEST_TIMEOUT.

ConfigMap writes (`write_configmap`) read the object, then create it or merge-patch it
carrying the resourceVersion that was read; a 409 (someone else wrote in between, or
created it first) re-reads and retries, so no concurrent change is overwritten unseen, and
keys we do not write survive (the ingress-nginx controller's ConfigMap holds dozens).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from tuner.errors import (
    ConfigError,
    KubeConflict,
    KubeError,
    KubeExpired,
    KubeForbidden,
    KubeInvalid,
    KubeNotFound,
    KubeUnreachable,
)

T = TypeVar("T")

MAX_CONFLICT_RETRIES = 5
#: (connect, read) seconds for every API request: the client waits forever by default, and
#: an API server dropping packets (a control plane upgrade) must end in a retry, not a hang
REQUEST_TIMEOUT = (5, 30)
#: answers that mean "not now" (overloaded, upgrading, behind a load balancer): retried
UNAVAILABLE = (429, 500, 502, 503, 504)


class Connection(NamedTuple):
    """A CoreV1Api with where it points (for messages)."""

    core: Any
    host: str
    context: str | None


def connect(*, kubeconfig: str | None, context: str | None) -> Connection:
    """A connection from a kubeconfig (KUBECONFIG / --kubeconfig / --context) or, with no
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
    return Connection(client.CoreV1Api(client.ApiClient(configuration)), configuration.host,
                      context)


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
def api_errors(verb: str, namespace: str, name: str, host: str, context: str | None, *,
               resource: str = "configmaps", kind: str = "ConfigMap") -> Iterator[None]:
    """The one place where client exceptions become `KubeError`s."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    what = f"{kind} {namespace}/{name}"
    try:
        yield
    except ApiException as exc:
        message = _server_message(exc)
        if exc.status == 403:
            raise KubeForbidden(
                f"forbidden: may not {verb} {resource} in namespace {namespace!r} "
                f"({kind} {name}); grant the tuner's account a Role with verb {verb} on "
                f"resource {resource} in {namespace!r} (manifests/base/rbac.yaml lists all "
                f"it needs). Server said: {message}") from exc
        if exc.status in UNAVAILABLE:
            raise KubeUnreachable(f"the API server could not {verb} {what} now "
                                  f"({exc.status}): {message}") from exc
        if exc.status == 404:
            raise KubeNotFound(f"{what} does not exist (404): {message}") from exc
        if exc.status == 409:
            raise KubeConflict(f"{what} changed since it was read (409): {message}") from exc
        if exc.status == 410:
            raise KubeExpired(f"{verb} {what}: the server no longer keeps that "
                              f"resourceVersion (410): {message}") from exc
        if exc.status == 422:
            raise KubeInvalid(f"the API server rejected {what}: {message}") from exc
        raise KubeError(f"{verb} {what} failed ({exc.status}): {message}") from exc
    except HTTPError as exc:
        raise KubeUnreachable(f"cannot reach the Kubernetes API server at {host}"
                              f"{f' (context {context})' if context else ''}: {exc}; check "
                              "the kubeconfig and that the cluster is up") from exc


def _server_message(exc: Any) -> str:
    try:
        return str(json.loads(exc.body).get("message", exc.body))
    except (TypeError, ValueError):
        return str(exc.body or exc.reason)


#: how a request is made: with retries while the API server does not answer
#: (tuner.kube.cluster.Cluster.call), or once (call_once)
Call = Callable[[str, Callable[[], Any]], Any]


def call_once(_what: str, action: Callable[[], T]) -> T:
    """A `Call` that makes the request once, without retries."""
    return action()


def read_configmap(connection: Connection, namespace: str, name: str, *,
                   call: Call = call_once) -> Any | None:
    """The ConfigMap, or None if it does not exist. `call` wraps the request (a caller that
    waits out an unreachable API server passes its retry loop)."""
    api, host, context = connection

    def read() -> Any:
        with api_errors("get", namespace, name, host, context):
            return api.read_namespaced_config_map(name, namespace,
                                                  _request_timeout=REQUEST_TIMEOUT)
    try:
        return call(f"get ConfigMap {name}", read)
    except KubeNotFound:
        return None


def write_configmap(connection: Connection, namespace: str, name: str, *,
                    data: Mapping[str, str | None], create: bool,
                    annotations: Mapping[str, str] | None = None,
                    labels: Mapping[str, str] | None = None,
                    call: Call = call_once,
                    on_conflict: Callable[[str], None] | None = None) -> str:
    """Set (None: remove) `data` keys of a ConfigMap and merge `annotations` and `labels`
    into its metadata; create it when missing if `create`. Returns "created", "updated" or
    "unchanged". The one write loop: read, then create or merge-patch with the
    resourceVersion read; a 409 reads again, up to MAX_CONFLICT_RETRIES times."""
    api, host, context = connection
    for _attempt in range(MAX_CONFLICT_RETRIES):
        current = read_configmap(connection, namespace, name, call=call)
        if current is None:
            if not create:
                raise KubeNotFound(f"ConfigMap {namespace}/{name} does not exist (404); "
                                   "create it first")
            body = {"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": name, "namespace": namespace,
                                 "labels": dict(labels or {}),
                                 "annotations": dict(annotations or {})},
                    "data": {k: v for k, v in data.items() if v is not None}}

            def create_it(body: dict[str, Any] = body) -> None:
                with api_errors("create", namespace, name, host, context):
                    api.create_namespaced_config_map(namespace, body,
                                                     _request_timeout=REQUEST_TIMEOUT)
            try:
                call(f"create ConfigMap {name}", create_it)
            except KubeConflict:
                continue  # created by someone else meanwhile: read it and patch
            return "created"
        before = dict(current.data or {})
        after = {k: v for k, v in {**before, **data}.items() if v is not None}
        old_annotations = dict(current.metadata.annotations or {})
        old_labels = dict(current.metadata.labels or {})
        if (after == before and {**old_annotations, **(annotations or {})} == old_annotations
                and {**old_labels, **(labels or {})} == old_labels):
            return "unchanged"
        metadata: dict[str, Any] = {"resourceVersion": current.metadata.resource_version}
        if annotations:
            metadata["annotations"] = dict(annotations)
        if labels:
            metadata["labels"] = dict(labels)
        patch = {"metadata": metadata, "data": dict(data)}

        def patch_it(patch: dict[str, Any] = patch) -> None:
            with api_errors("patch", namespace, name, host, context):
                api.patch_namespaced_config_map(name, namespace, patch,
                                                _content_type="application/merge-patch+json",
                                                _request_timeout=REQUEST_TIMEOUT)
        try:
            call(f"patch ConfigMap {name}", patch_it)
        except KubeConflict:
            if on_conflict is not None:
                on_conflict(f"ConfigMap {name} changed under us (409): read again, retrying")
            continue
        return "updated"
    raise KubeError(f"ConfigMap {namespace}/{name} kept changing under us: "
                    f"{MAX_CONFLICT_RETRIES} conflicts (409) in a row; is another tool writing "
                    "it (a GitOps controller reverting it)? Stop that, then run again")
