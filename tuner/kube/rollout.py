"""Cluster steps of a trial, each bounded in time: restart a Deployment the way
`kubectl rollout restart` does and wait for the rollout; wait until every sidecar reports a
tuning generation. Building blocks of `tuner experiment --target kubernetes` (not yet
wired to a command).

Design decision: a rollout is complete by the same test `kubectl rollout status` applies:
the controller has observed the newest generation, and every replica is updated and
available with no old replica left. A wait that runs out raises `KubeError` with the
counts, so the trial is marked failed with the reason instead of hanging.
"""

from __future__ import annotations

import datetime
import json
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tuner.errors import KubeWaitTimeout
from tuner.kube.client import REQUEST_TIMEOUT, api_errors

RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"


@dataclass(frozen=True)
class RolloutState:
    generation: int
    observed_generation: int
    replicas: int
    updated: int
    available: int
    total: int

    @property
    def is_complete(self) -> bool:
        return (self.observed_generation >= self.generation and self.updated == self.replicas
                and self.available == self.replicas and self.total == self.replicas)

    def describe(self) -> str:
        return (f"updated {self.updated}/{self.replicas}, available {self.available}/"
                f"{self.replicas}, total {self.total}, observed generation "
                f"{self.observed_generation}/{self.generation}")


def rollout_state(deployment: Any) -> RolloutState:
    status = deployment.status
    return RolloutState(
        generation=deployment.metadata.generation or 0,
        observed_generation=(status.observed_generation or 0) if status else 0,
        replicas=deployment.spec.replicas if deployment.spec.replicas is not None else 1,
        updated=(status.updated_replicas or 0) if status else 0,
        available=(status.available_replicas or 0) if status else 0,
        total=(status.replicas or 0) if status else 0)


def restart_deployment(apps_api: Any, namespace: str, name: str, *, host: str,
                       context: str | None) -> None:
    """Patch the pod template's restartedAt annotation, as `kubectl rollout restart`."""
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    body = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: now}}}}}
    with api_errors("patch", namespace, name, host, context, resource="deployments",
                    kind="Deployment"):
        apps_api.patch_namespaced_deployment(name, namespace, body,
                                             _content_type="application/merge-patch+json",
                                             _request_timeout=REQUEST_TIMEOUT)


def wait_rollout(apps_api: Any, namespace: str, name: str, *, timeout_s: float, host: str,
                 context: str | None, poll_s: float = 1.0,
                 guard: Callable[[str, Callable[[], Any]], Any] = lambda _what, read: read()
                 ) -> RolloutState:
    """Wait until the Deployment's rollout is complete, or raise KubeWaitTimeout at the
    timeout. `guard` wraps each read (the runner retries one that got no answer)."""
    deadline = time.monotonic() + timeout_s

    def read() -> Any:
        with api_errors("get", namespace, name, host, context, resource="deployments",
                              kind="Deployment"):
            return apps_api.read_namespaced_deployment(name, namespace,
                                                       _request_timeout=REQUEST_TIMEOUT)
    while True:
        state = rollout_state(guard(f"rollout status of {name}", read))
        if state.is_complete:
            return state
        if time.monotonic() > deadline:
            raise KubeWaitTimeout(f"the rollout of Deployment {namespace}/{name} did not complete "
                            f"within {timeout_s:g}s ({state.describe()}); see `kubectl -n "
                            f"{namespace} rollout status deploy/{name}`")
        time.sleep(poll_s)


def list_pods(core_api: Any, namespace: str, selector: str, *, host: str,
              context: str | None) -> list[Any]:
    """The pods that `selector` picks."""
    with api_errors("list", namespace, selector, host, context, resource="pods", kind="Pods"):
        pods: list[Any] = core_api.list_namespaced_pod(
            namespace, label_selector=selector, _request_timeout=REQUEST_TIMEOUT).items
    return pods


def sidecar_urls(pods: list[Any], port: int) -> list[str]:
    """The sidecar base URLs of the running pods (pure). Pods on their way out, with a
    deletionTimestamp, are left out: they no longer get the Service's load."""
    return [f"http://{_host(pod.status.pod_ip)}:{port}" for pod in pods
            if pod.status is not None and pod.status.phase == "Running" and pod.status.pod_ip
            and pod.metadata.deletion_timestamp is None]


def pod_fingerprint(pods: list[Any]) -> frozenset[tuple[str, str, int]]:
    """(name, uid, container restarts) of each pod (pure): a trial whose pods changed
    during its load (a new replica, a restarted nginx) lost counts it cannot recover.
    Pods on their way out are left out, as in `sidecar_urls`: on a real cluster the old
    pods of a completed rollout still terminate for up to their grace period, and their
    going is no change to the pods under load."""
    return frozenset(
        (pod.metadata.name, pod.metadata.uid or "",
         sum(c.restart_count or 0 for c in (pod.status.container_statuses or []))
         if pod.status else 0)
        for pod in pods if pod.metadata.deletion_timestamp is None)


def _host(ip: str) -> str:
    """An IP for a URL: IPv6 pod IPs (IPv6 and dual-stack clusters) need brackets."""
    return f"[{ip}]" if ":" in ip else ip


def wait_sidecars(urls: list[str], generation: str, *, timeout_s: float,
                  poll_s: float = 0.5) -> None:
    """Wait until every sidecar reports `generation` as applied, or raise KubeWaitTimeout
    (also at once when there is no sidecar at all: the trial cannot run)."""
    if not urls:
        raise KubeWaitTimeout("no running pod matched the sidecar selector: is the target "
                        "Deployment up, and does its label match?")
    deadline = time.monotonic() + timeout_s
    while True:
        behind = {}
        for url in urls:
            try:
                with urllib.request.urlopen(f"{url}/status", timeout=5) as answer:
                    status = json.load(answer)
            except (OSError, ValueError) as exc:
                behind[url] = f"unreachable ({exc})"
                continue
            if status.get("generation") != generation:
                behind[url] = (f"at generation {status.get('generation')!r}"
                               + (f", error: {status['error']}" if status.get("error") else ""))
            elif status.get("in_force") is False:  # rendered, but nginx was not reloaded
                behind[url] = f"rendered {generation!r} but nginx has not taken it: " \
                              f"{status.get('error')}"
        if not behind:
            return
        if time.monotonic() > deadline:
            raise KubeWaitTimeout(f"{len(behind)} of {len(urls)} sidecars did not apply generation "
                            f"{generation!r} within {timeout_s:g}s: "
                            + "; ".join(f"{u} {why}" for u, why in behind.items()))
        time.sleep(poll_s)
