"""The cluster side of `tuner experiment --target kubernetes`: every API call and every
request to a sidecar one trial makes, each bounded in time.

Design decision: an API server that does not answer is waited for, with doubling pauses,
up to `api_retry_limit_s` (a managed control plane upgrade drops the API for a minute or
two; an experiment of an hour should survive it); a refusal (403, 404, 422) is not retried,
it names what was refused. ConfigMap writes are merge patches carrying the resourceVersion
that was read, so a concurrent writer makes a 409, which is re-read and retried, instead
of being overwritten unseen.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

from tuner.durations import format_seconds
from tuner.errors import KubeError, KubeNotFound, KubeUnreachable, KubeWaitTimeout, SidecarRefused
from tuner.kube.client import (
    REQUEST_TIMEOUT,
    Connection,
    api_errors,
    read_configmap,
    write_configmap,
)
from tuner.kube.rollout import list_pods, restart_deployment, wait_rollout, wait_sidecars
from tuner.kube.target import ClusterTarget

T = TypeVar("T")

#: the first pause after the API server did not answer; doubled up to MAX_BACKOFF_S
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 15.0


class Cluster:
    def __init__(self, connection: Any, target: ClusterTarget, *,
                 say: Callable[[str], None], poll_s: float = 1.0) -> None:
        from kubernetes import client

        self.connection = Connection(*connection)
        self.core, self.host, self.context = self.connection
        self.apps = client.AppsV1Api(self.core.api_client)
        self.target = target
        self.say = say
        self.poll_s = poll_s
        self.retry_limit_s = target.api_retry_limit_s
        #: time.monotonic() after which no failed call is retried (the restore after a
        #: SIGTERM must end within the grace period)
        self.hard_deadline: float | None = None

    # -- the API, with backoff while it does not answer --------------------------------------

    def call(self, what: str, action: Callable[[], T]) -> T:
        """Run `action`; while the API server does not answer, pause and retry with
        doubling pauses until `retry_limit_s` has passed, then give up with the cause."""
        deadline: float | None = None  # counted from the first failure
        pause_s = FIRST_BACKOFF_S
        while True:
            try:
                return action()
            except KubeUnreachable as exc:
                if deadline is None:
                    deadline = time.monotonic() + self.retry_limit_s
                if self.hard_deadline is not None:
                    deadline = min(deadline, self.hard_deadline)
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    raise KubeUnreachable(f"{exc} (gave up on {what} after "
                                          f"{format_seconds(round(self.retry_limit_s))} of "
                                          "retries: kubernetes.api_retry_limit)") from exc
                pause_s = min(pause_s, left_s)
                self.say(f"    the API server does not answer ({what}); retrying in "
                         f"{pause_s:.1f} s, for up to {left_s:.0f} s more")
                time.sleep(pause_s)
                pause_s = min(pause_s * 2, MAX_BACKOFF_S)

    def read_configmap(self, name: str, *, missing_ok: bool = False) -> Any:
        found = read_configmap(self.connection, self.target.namespace, name, call=self.call)
        if found is None and not missing_ok:
            raise KubeNotFound(f"ConfigMap {self.target.namespace}/{name} does not exist")
        return found

    def read_tuning(self) -> dict[str, str]:
        """The tuning ConfigMap's data; a missing one names itself and how to create it."""
        found = self.read_configmap(self.target.tuning_configmap, missing_ok=True)
        if found is None:
            raise KubeError(f"ConfigMap {self.target.namespace}/{self.target.tuning_configmap} "
                            "does not exist; the tuner varies the proxy's and the app's "
                            "settings through it: create it (manifests/overlays/demo/"
                            "configmaps.yaml has one) or set kubernetes.tuning_configmap")
        return dict(found.data or {})

    def check_deployment(self) -> None:
        name = self.target.deployment

        def read() -> None:
            with api_errors("get", self.target.namespace, name, self.host, self.context,
                            resource="deployments", kind="Deployment"):
                self.apps.read_namespaced_deployment(name, self.target.namespace,
                                                     _request_timeout=REQUEST_TIMEOUT)
        try:
            self.call(f"get Deployment {name}", read)
        except KubeNotFound:
            raise KubeError(f"Deployment {self.target.namespace}/{name} does not exist; set "
                            "kubernetes.deployment to the Deployment of the upstream app"
                            ) from None

    def patch_data(self, name: str, changes: Mapping[str, str | None], *,
                   create: bool = False) -> None:
        """Set (or with None remove) keys of a ConfigMap: a merge patch that carries the
        resourceVersion read, re-read and retried on a 409 (tuner.kube.client)."""
        write_configmap(self.connection, self.target.namespace, name, data=changes,
                        create=create, labels={"app.kubernetes.io/managed-by": "tuner"}
                        if create else None, call=self.call,
                        on_conflict=lambda line: self.say(f"    {line}"))

    # -- the upstream's Deployment ------------------------------------------------------------

    def restart(self) -> None:
        self.call(f"restart Deployment {self.target.deployment}", lambda: restart_deployment(
            self.apps, self.target.namespace, self.target.deployment, host=self.host,
            context=self.context))

    def wait_rollout(self, *, timeout_s: float | None = None) -> None:
        """Wait for the Deployment's rollout; KubeWaitTimeout when it does not complete."""
        wait_rollout(self.apps, self.target.namespace, self.target.deployment,
                     timeout_s=self.target.rollout_timeout_s if timeout_s is None else timeout_s,
                     host=self.host, context=self.context, poll_s=self.poll_s, guard=self.call)

    # -- the sidecars beside the proxy -------------------------------------------------------

    def list_pods(self) -> list[Any]:
        return self.call("list pods", lambda: list_pods(
            self.core, self.target.namespace, self.target.pod_selector, host=self.host,
            context=self.context))

    def sidecar_token(self) -> str | None:
        """The bearer token for the sidecars, read at each call (the kubelet rotates it):
        the target's token file, or where there is none the kubeconfig's bearer token."""
        try:
            return Path(self.target.sidecar_token_file).read_text().strip() or None
        except FileNotFoundError:
            pass
        configuration = self.core.api_client.configuration
        # the client's loaders name the key "BearerToken" (older ones "authorization"); the
        # call runs the in-cluster loader's refresh hook
        bearer = (configuration.get_api_key_with_prefix("BearerToken")
                  or configuration.get_api_key_with_prefix("authorization"))
        scheme, _, token = (bearer or "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def wait_generation(self, urls: list[str], generation: str) -> None:
        wait_sidecars(urls, generation, timeout_s=self.target.sidecar_timeout_s,
                      poll_s=min(self.poll_s, 0.5))


def sidecar_get(url: str, path: str, *, timeout_s: float = 10.0, token: str | None = None,
                **query: object) -> dict[str, Any]:
    """GET a sidecar's JSON endpoint, with `token` as the bearer token. KubeWaitTimeout if
    it cannot be read now (the trial that needed it fails, the experiment goes on);
    SidecarRefused if it refuses (4xx: set up wrong, every trial would fail the same way;
    401/403: the token is not one the sidecar accepts)."""
    full = f"{url}{path}" + (f"?{urlencode(query)}" if query else "")
    request = urllib.request.Request(
        full, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            document: dict[str, Any] = json.load(answer)
            return document
    except urllib.error.HTTPError as exc:
        try:
            why = json.load(exc).get("error", exc.reason)
        except ValueError:
            why = exc.reason
        message = f"the sidecar at {url} answered {path} with {exc.code}: {why}"
        if exc.code in (401, 403):
            message += (" (the Job sends its token from kubernetes.sidecar_token_file; the "
                        "sidecar's --caller-service-account must name the Job's "
                        "ServiceAccount, and both must agree on the audience)")
        if exc.code >= 500:  # it could not do it now (the app beside it is down): retry-able
            raise KubeWaitTimeout(message) from exc
        raise SidecarRefused(message) from exc
    except (OSError, ValueError) as exc:
        raise KubeWaitTimeout(f"could not read {full}: {exc}") from exc


def sum_signatures(statuses: list[dict[str, Any]]) -> Counter[str]:
    """The error-log signatures every sidecar counted since its mark."""
    total: Counter[str] = Counter()
    for status in statuses:
        total.update(status.get("signatures_since") or {})
    return total
