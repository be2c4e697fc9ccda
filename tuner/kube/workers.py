"""Locust workers as pods of their own (`kubernetes.workers: N`): load beyond one pod.

The runner (the Job's pod) runs Locust's master, which conducts every burst as on one
machine; for each trial it creates a Job `tuner-workers` of N worker pods, each running
`locust --worker` with the trial's load options and connecting back to the master at the
runner pod's IP. Their clocks are measured and their bursts moved into the master's clock
(tuner.load.clocks): on other nodes they read other clocks.

Design decisions:
- A Job, not bare pods: the runner's Role then grants create on jobs and get/delete on the
  one Job named `tuner-workers` only; it never may delete a pod (the app's pods share the
  namespace). Deleting the Job takes its pods with it (the garbage collector).
- Cleanup in three layers: the runner deletes the Job when the trial's load ends (also on
  Ctrl-C or an error); the Job has an ownerReference to the runner's pod, so deleting that
  pod removes it; and `activeDeadlineSeconds` ends its pods even if both fail (a runner
  killed while its pod object stays, as a failed Job pod does). A stale Job from a run cut
  short is deleted before the next trial creates its own.
- The worker pods are locked down as the runner is (non-root, read-only root filesystem, no
  capabilities, no ServiceAccount token: they need no API), with CPU and memory limits, and
  spread over nodes where the scheduler can.
- The runner's own pod is known from the downward API (TUNER_POD_NAME, TUNER_POD_UID,
  TUNER_POD_IP, TUNER_POD_NAMESPACE; manifests/base/job.yaml); outside a pod there is no
  address the worker pods could reach, and workers are refused before the first trial.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tuner.errors import ConfigError, KubeNotFound, KubeWaitTimeout, TunerError
from tuner.kube.client import REQUEST_TIMEOUT, Call, api_errors, call_once
from tuner.kube.rollout import list_pods
from tuner.kube.target import ClusterTarget

WORKER_JOB = "tuner-workers"
#: part-of as the manifests' commonLabels give it: the runner's NetworkPolicy (kustomize
#: adds the label to its selectors too) admits pods with both
WORKER_LABELS = {"app.kubernetes.io/name": "tuner-worker", "app.kubernetes.io/part-of": "tuner",
                 "app.kubernetes.io/managed-by": "tuner"}
#: a stale worker Job must be gone (its pods may still terminate) before a new one is made
DELETE_WAIT_S = 60.0
_ENV = ("TUNER_POD_NAME", "TUNER_POD_UID", "TUNER_POD_IP", "TUNER_POD_NAMESPACE")


@dataclass(frozen=True)
class RunnerPod:
    """The pod the runner runs in, as the downward API describes it."""

    name: str
    uid: str
    ip: str
    namespace: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> RunnerPod | None:
        """The runner's pod, or None outside one (no TUNER_POD_* variables at all)."""
        values = [environ.get(key, "").strip() for key in _ENV]
        if not any(values):
            return None
        missing = [key for key, value in zip(_ENV, values, strict=True) if not value]
        if missing:
            raise ConfigError(f"kubernetes.workers: {', '.join(missing)} not set; the Job's "
                              "pod passes them from the downward API (manifests/base/job.yaml,"
                              " env), and the worker pods need all four to find the runner")
        return cls(*values)


def require_runner_pod(target: ClusterTarget, environ: Mapping[str, str]) -> RunnerPod | None:
    """The runner's pod when the spec asks for worker pods (None when it does not);
    a ConfigError, before any trial, when they could not reach it."""
    if not target.workers:
        return None
    runner = RunnerPod.from_env(environ)
    if runner is None:
        raise ConfigError(
            f"kubernetes.workers: {target.workers} worker pods connect back to the runner's "
            "Locust master at its pod IP, and this runner is not in a pod (no TUNER_POD_IP): "
            "run it as the Job of manifests/base, or set kubernetes.workers to 0 (workers: N "
            "forks the workers beside the runner instead)")
    return runner


def worker_job(*, argv: list[str], target: ClusterTarget, runner: RunnerPod, image: str,
               deadline_s: float) -> dict[str, Any]:
    """The Job of `target.workers` worker pods, each running `argv` (pure)."""
    owner = ([{"apiVersion": "v1", "kind": "Pod", "name": runner.name, "uid": runner.uid}]
             if runner.namespace == target.namespace else [])  # never across namespaces
    container = {
        "name": "locust-worker", "image": image, "command": argv,
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        # requests below the limits: a burst is a short spike of CPU, and a pod throttled
        # within its 100 ms CFS period would write its burst late (its spread shows it)
        "resources": {"requests": {"cpu": "250m", "memory": "128Mi"},
                      "limits": {"cpu": target.worker_cpu, "memory": target.worker_memory}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": WORKER_JOB, "namespace": target.namespace,
                     "labels": dict(WORKER_LABELS), "ownerReferences": owner},
        "spec": {
            "parallelism": target.workers, "completions": target.workers,
            "backoffLimit": 0,  # a worker that fails fails the trial's load, not retried
            "activeDeadlineSeconds": max(60, round(deadline_s)),
            "ttlSecondsAfterFinished": 300,
            "template": {
                "metadata": {"labels": dict(WORKER_LABELS)},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": 5,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001,
                                        "runAsGroup": 10001,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "affinity": {"podAntiAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [{
                            "weight": 100, "podAffinityTerm": {
                                "topologyKey": "kubernetes.io/hostname",
                                "labelSelector": {"matchLabels": dict(WORKER_LABELS)}}}]}},
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {}}]}}}}


def describe_pods(pods: list[Any]) -> str:
    """One line for the worker pods' states (pure), for an error message."""
    if not pods:
        return "no worker pod exists (see `kubectl describe job tuner-workers`)"
    parts = []
    for pod in pods:
        status = pod.status
        phase = (status.phase if status else None) or "Unknown"
        why = [c.message or c.reason for c in (status.conditions or [])
               if c.status != "True" and (c.message or c.reason)] if status else []
        for c in (status.container_statuses or []) if status else []:
            waiting = c.state.waiting if c.state else None
            if waiting is not None:
                why.append(f"{waiting.reason}: {waiting.message or ''}".strip(": "))
        parts.append(f"{pod.metadata.name} {phase}" + (f" ({'; '.join(why)})" if why else ""))
    return ", ".join(parts)


class WorkerJob:
    """Starts and removes one trial's worker pods (tuner.load.locust_runner.WorkerLauncher).
    `call` retries a request the API server did not answer (tuner.kube.cluster)."""

    def __init__(self, connection: Any, target: ClusterTarget, runner: RunnerPod, *,
                 image: str, deadline_s: float, call: Call, poll_s: float = 0.5) -> None:
        from kubernetes import client

        self.core, self.host, self.context = connection
        self.batch = client.BatchV1Api(self.core.api_client)
        self.target, self.runner, self.image = target, runner, image
        self.deadline_s, self.call, self.poll_s = deadline_s, call, poll_s

    def _errors(self, verb: str) -> Any:
        return api_errors(verb, self.target.namespace, WORKER_JOB, self.host, self.context,
                          resource="jobs", kind="Job")

    def start(self, argv: list[str]) -> None:
        self.remove(wait=True)  # a stale Job of a run cut short

        body: Any = worker_job(argv=argv, target=self.target, runner=self.runner,
                               image=self.image, deadline_s=self.deadline_s)

        def create() -> None:
            with self._errors("create"):
                self.batch.create_namespaced_job(self.target.namespace, body,
                                                 _request_timeout=REQUEST_TIMEOUT)
        self.call(f"create Job {WORKER_JOB}", create)

    def pods(self, call: Call | None = None) -> list[Any]:
        selector = ",".join(f"{k}={v}" for k, v in WORKER_LABELS.items())
        return list((call or self.call)("list the worker pods", lambda: list_pods(
            self.core, self.target.namespace, selector, host=self.host, context=self.context)))

    def describe(self) -> str:
        try:
            return describe_pods([p for p in self.pods(call=call_once)
                                  if p.metadata.deletion_timestamp is None])
        except TunerError as exc:  # for an error message only: never hide the real error
            return f"their state could not be read ({exc})"

    def stop(self) -> None:
        """One attempt, no retries: this runs with signals held on the way out (SIGTERM's
        grace period is short); if the API does not answer, the Job's owner reference and
        its deadline remove it, and the next trial's start deletes it first."""
        with contextlib.suppress(TunerError):
            self.remove(wait=False, call=call_once)

    def remove(self, *, wait: bool, call: Call | None = None) -> None:
        """Delete the worker Job and, through the garbage collector, its pods; with `wait`,
        until the Job is gone."""
        from kubernetes import client

        call = call or self.call

        def delete() -> None:
            with self._errors("delete"):
                self.batch.delete_namespaced_job(
                    WORKER_JOB, self.target.namespace, _request_timeout=REQUEST_TIMEOUT,
                    body=client.V1DeleteOptions(propagation_policy="Background"))
        try:
            call(f"delete Job {WORKER_JOB}", delete)
        except KubeNotFound:
            return
        if not wait:
            return
        deadline = time.monotonic() + DELETE_WAIT_S

        def read() -> None:
            with self._errors("get"):
                self.batch.read_namespaced_job(WORKER_JOB, self.target.namespace,
                                               _request_timeout=REQUEST_TIMEOUT)
        while True:
            try:
                call(f"get Job {WORKER_JOB}", read)
            except KubeNotFound:
                return
            if time.monotonic() > deadline:
                raise KubeWaitTimeout(f"Job {self.target.namespace}/{WORKER_JOB} of an earlier "
                                      f"trial was not gone {DELETE_WAIT_S:g}s after its delete")
            time.sleep(self.poll_s)


def runner_image(core: Any, runner: RunnerPod, *, host: str, context: str | None,
                 call: Call) -> str:
    """The image the runner's own pod runs (its container named tuner, else its first):
    the worker pods run the same tuner, Locust and locustfile."""
    def read() -> Any:
        with api_errors("list", runner.namespace, runner.name, host, context,
                        resource="pods", kind="Pod"):
            return core.list_namespaced_pod(runner.namespace,
                                            field_selector=f"metadata.name={runner.name}",
                                            _request_timeout=REQUEST_TIMEOUT).items
    pods = call(f"read the runner's pod {runner.name}", read)
    if not pods:
        raise ConfigError(f"kubernetes.workers: the runner's pod {runner.namespace}/"
                          f"{runner.name} (TUNER_POD_NAME) does not exist")
    containers = pods[0].spec.containers
    chosen = next((c for c in containers if c.name == "tuner"), containers[0])
    return str(chosen.image)
