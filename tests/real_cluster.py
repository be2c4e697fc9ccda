"""The real Kubernetes control plane the kube tests run against, and what they put around it.

`scripts/cluster.py` starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler
(v1.34.4, built from the official modules) on 127.0.0.1 with RBAC enforced. Around it:
- `KubeNamespace`: a namespace per test holding the ServiceAccounts and Roles of
  manifests/base, applied with kubectl, and kubeconfigs that authenticate as those accounts
  with tokens from the TokenRequest API, as the Job's and the sidecar's pods would;
- `NodeAgent`: what a node's kubelet would write about the Deployment's pods (Running,
  Ready, the pod IP 127.0.0.1 where the test's real processes listen). There is no node in
  tiers 1-2; the controller-manager's Deployment and ReplicaSet controllers are real, only
  the pod status they wait for is written by the test;
- `FaultProxy` (tests/fault_proxy.py): API outages between a client and the real server.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"


def cluster_module() -> ModuleType:
    """scripts/cluster.py, which `make cluster` runs as a program."""
    spec = importlib.util.spec_from_file_location("tuner_test_cluster",
                                                  ROOT / "scripts" / "cluster.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@dataclass
class RealCluster:
    dir: Path
    server: str
    kubeconfig: Path  # admin (system:masters)
    ca_file: Path
    bin_dir: Path
    _module: ModuleType

    def kubectl(self, *args: str, kubeconfig: Path | None = None, stdin: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(self.bin_dir / "kubectl"), "--kubeconfig", str(kubeconfig or self.kubeconfig),
             *args], input=stdin, capture_output=True, text=True, timeout=60, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({done.returncode}): "
                                 f"{done.stderr.strip()}")
        return done

    def token_kubeconfig(self, path: Path, *, namespace: str, account: str,
                         server: str | None = None) -> Path:
        """A kubeconfig authenticating as system:serviceaccount:NAMESPACE:ACCOUNT with a
        bound token (TokenRequest), against `server` (a fault proxy) or the apiserver."""
        token = self.kubectl("-n", namespace, "create", "token", account,
                             "--duration", "2h").stdout.strip()
        written: Path = self._module.write_kubeconfig(
            path, server=server or self.server, ca_file=self.ca_file,
            user=f"{namespace}-{account}", token=token)
        return written

    def audit(self, user: str) -> list[dict[str, Any]]:
        """Every request `user` made, as the apiserver's audit log recorded it."""
        events = []
        for line in (self.dir / "logs" / "audit.log").read_text().splitlines():
            event = json.loads(line)
            if event.get("user", {}).get("username") == user:
                events.append(event)
        return events


@contextmanager
def real_cluster(state: Path) -> Iterator[RealCluster]:
    module = cluster_module()
    info = module.up(state, die_with_parent=True)
    try:
        yield RealCluster(info.dir, info.server, info.kubeconfig, info.ca_file, info.bin_dir,
                          module)
    finally:
        module.down(state)


def render(overlay: str = "overlays/demo") -> list[dict[str, Any]]:
    done = subprocess.run(["kubectl", "kustomize", str(MANIFESTS / overlay)],
                          capture_output=True, text=True, check=True, timeout=60)
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@dataclass
class KubeNamespace:
    cluster: RealCluster
    name: str
    #: the Job's account (ServiceAccount `tuner`) and the sidecar's (`tuner-sidecar`)
    tuner_kubeconfig: Path
    sidecar_kubeconfig: Path

    def user(self, account: str) -> str:
        return f"system:serviceaccount:{self.name}:{account}"

    def apply(self, objects: list[dict[str, Any]]) -> None:
        """kubectl apply (as the admin) of `objects`, into this namespace."""
        for obj in objects:
            obj.setdefault("metadata", {})["namespace"] = self.name
        self.cluster.kubectl("-n", self.name, "apply", "-f", "-",
                             stdin="\n---\n".join(json.dumps(o) for o in objects))


@contextmanager
def kube_namespace(cluster: RealCluster, tmp_path: Path, *, prefix: str = "t",
                   server: str | None = None) -> Iterator[KubeNamespace]:
    """A fresh namespace with manifests/base's ServiceAccounts, Roles and RoleBindings
    applied with kubectl; deleted afterwards."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    try:
        cluster.kubectl("-n", name, "apply", "-f", str(MANIFESTS / "base" / "serviceaccounts.yaml"),
                        "-f", str(MANIFESTS / "base" / "rbac.yaml"))
        yield KubeNamespace(
            cluster, name,
            cluster.token_kubeconfig(tmp_path / f"{name}-tuner.kubeconfig", namespace=name,
                                     account="tuner", server=server),
            cluster.token_kubeconfig(tmp_path / f"{name}-sidecar.kubeconfig", namespace=name,
                                     account="tuner-sidecar", server=server))
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


class NodeAgent:
    """Writes what a node's kubelet would about the pods matching `selector`: once
    `on_start(pod)` has returned (the test starts or restarts its processes there), the pod
    is Running and Ready with pod IP `pod_ip` (127.0.0.1). With `ready=False` it never writes, as a
    node whose pods never become ready."""

    def __init__(self, core_api: Any, namespace: str, selector: str, *,
                 on_start: Callable[[Any], None] | None = None, ready: bool = True,
                 pod_ip: str = "127.0.0.1") -> None:
        self.core, self.namespace, self.selector = core_api, namespace, selector
        self.pod_ip = pod_ip
        self.on_start, self.ready = on_start, ready
        self.started: list[str] = []  # pod names, in the order they were made ready
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="node-agent", daemon=True)

    def __enter__(self) -> NodeAgent:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self.error is not None:
            raise AssertionError(f"the node agent failed: {self.error!r}") from self.error

    def _run(self) -> None:
        try:
            while not self._stop.wait(0.1):
                if self.ready:
                    self._sync()
        except BaseException as exc:  # reported by __exit__, on the test's thread
            self.error = exc

    def _sync(self) -> None:
        from kubernetes.client.exceptions import ApiException

        pods = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector,
                                             _request_timeout=(5, 30)).items
        for pod in pods:
            if pod.metadata.deletion_timestamp or pod.metadata.name in self.started:
                continue
            if self.on_start is not None:
                self.on_start(pod)
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            conditions = [{"type": kind, "status": "True", "lastTransitionTime": now}
                          for kind in ("Initialized", "ContainersReady", "Ready")]
            try:
                self.core.patch_namespaced_pod_status(
                    pod.metadata.name, self.namespace,
                    {"status": {"phase": "Running", "podIP": self.pod_ip,
                                "podIPs": [{"ip": self.pod_ip}], "startTime": now,
                                "conditions": conditions}},
                    _request_timeout=(5, 30))
            except ApiException as exc:
                if exc.status == 404:  # deleted meanwhile (a rollout replaced it)
                    continue
                raise
            self.started.append(pod.metadata.name)
