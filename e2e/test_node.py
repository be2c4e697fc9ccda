"""Tier 4: a real node. The control plane, containerd, the kubelet, the CNI bridge and
kube-proxy run on this machine inside a network namespace made here (scripts/node.py);
`kubectl apply -k manifests/overlays/demo` with the images built by podman; the Job runs
`tuner experiment --target kubernetes` to completion with the load through the Service
(kube-proxy's iptables rules); `kubectl delete pod` of the Job's pod mid-run restores the
baseline and the next pod resumes.

What differs from the demo as shipped, and why: no cluster DNS runs, so the spec's
service_url names the Service's ClusterIP instead of demo-app.tuner-demo.svc; there is no
storage provisioner, so a hostPath PersistentVolume is made for the results PVC; the grid is
cut to two trials (proxy idle 1s and 3s, the app at 2000 ms) to fit a test's time."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
NODE_IP = "10.245.0.1"


class Node:
    def __init__(self, netns: str, cluster_dir: Path, node_dir: Path) -> None:
        self.netns, self.cluster_dir, self.node_dir = netns, cluster_dir, node_dir
        self.kubeconfig = cluster_dir / "kubeconfig"

    def run(self, *argv: str, stdin: str | None = None, check: bool = True,
            timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["nsenter", f"--net=/run/netns/{self.netns}", *argv],
                              input=stdin, capture_output=True, text=True, check=False,
                              timeout=timeout_s)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv[:4])} failed ({done.returncode}): "
                                 f"{done.stderr.strip()[-3000:]}")
        return done

    def kubectl(self, *args: str, stdin: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        bin_dir = json.loads((self.cluster_dir / "cluster.json").read_text())["bin_dir"]
        return self.run(f"{bin_dir}/kubectl", "--kubeconfig", str(self.kubeconfig), *args,
                        stdin=stdin, check=check)

    def configmap(self, name: str) -> dict[str, str]:
        done = self.kubectl("-n", "tuner-demo", "get", "configmap", name, "-o", "json",
                            check=False)
        return dict(json.loads(done.stdout).get("data") or {}) if done.returncode == 0 else {}


@pytest.fixture
def node(tmp_path: Path, tuner_image: str) -> Iterator[Node]:
    netns = f"tuner-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    # the namespace's own loopback (down when made) and the address pods reach the API at
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "-n", netns, "addr", "add", f"{NODE_IP}/32", "dev", "lo"],
                   check=True)
    state = Path("/var/tmp") / netns  # hostPath volumes and containerd's root: not /tmp
    found = Node(netns, state / "cluster", state / "node")
    try:
        started = time.monotonic()
        found.run("python3", str(ROOT / "scripts" / "cluster.py"), "up", "--dir",
                  str(found.cluster_dir), "--advertise-address", NODE_IP)
        found.run("python3", str(ROOT / "scripts" / "node.py"), "up", "--dir",
                  str(found.node_dir), "--cluster-dir", str(found.cluster_dir))
        print(f"\ncontrol plane and node Ready in {time.monotonic() - started:.1f} s")
        yield found
    finally:
        # the kubelet stops the pods of a deleted namespace; then the node, the control
        # plane, and the namespaces go (each step said, so a leak shows where it began)
        steps = [found.kubectl("delete", "namespace", "tuner-demo", "--timeout=60s",
                               check=False),
                 found.run("python3", str(ROOT / "scripts" / "node.py"), "down", "--dir",
                           str(found.node_dir), "--cluster-dir", str(found.cluster_dir),
                           check=False),
                 found.run("python3", str(ROOT / "scripts" / "cluster.py"), "down",
                           "--dir", str(found.cluster_dir), check=False),
                 subprocess.run(["ip", "netns", "del", netns], check=False,
                                capture_output=True, text=True),
                 subprocess.run(["rm", "-rf", str(state)], check=False, capture_output=True,
                                text=True)]
        for step in steps:
            print(f"teardown: {' '.join(map(str, step.args))[-80:]} -> {step.returncode} "
                  f"{step.stderr.strip()[-300:]}")


def _deploy_demo(node: Node, **spec_changes: Any) -> dict[str, Any]:
    """The demo overlay on the node, its spec cut to two trials and changed by
    `spec_changes` (into its kubernetes: section for keys of that section); returns the
    Job, not yet applied."""
    rendered = node.kubectl("kustomize", str(ROOT / "manifests" / "overlays" / "demo")).stdout
    objects = [d for d in yaml.safe_load_all(rendered) if d]
    (job,) = [d for d in objects if d["kind"] == "Job"]
    results = node.node_dir / "results"
    results.mkdir(parents=True, exist_ok=True)
    subprocess.run(["chown", "10001:10001", str(results)], check=True)  # the Job's user
    volume = {"apiVersion": "v1", "kind": "PersistentVolume",
              "metadata": {"name": "tuner-results"},
              "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                       "hostPath": {"path": str(results), "type": "Directory"},
                       "claimRef": {"namespace": "tuner-demo", "name": "tuner-results"}}}
    node.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(
        [d for d in objects if d["kind"] != "Job"] + [volume]))
    node.kubectl("-n", "tuner-demo", "rollout", "status", "deployment/demo-app",
                 "--timeout=180s")
    cluster_ip = node.kubectl("-n", "tuner-demo", "get", "service", "demo-app", "-o",
                              "jsonpath={.spec.clusterIP}").stdout
    (spec_map,) = [d for d in objects if d["kind"] == "ConfigMap"
                   and d["metadata"]["name"] == "tuner-spec"]
    spec = yaml.safe_load(spec_map["data"]["spec.yaml"])
    spec.update(proxy_idle=["1s", "3s"], upstream_idle=["2s"], repeats=1, max_seconds=30,
                safe_after=160, unsafe_after=3)
    spec["kubernetes"]["service_url"] = f"http://{cluster_ip}/"
    for key, value in spec_changes.items():
        (spec["kubernetes"] if key.startswith("worker") else spec)[key] = value
    spec_map["data"]["spec.yaml"] = yaml.safe_dump(spec)
    node.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(spec_map))
    return dict(job)


def _job_done(node: Node) -> bool:
    status = json.loads(node.kubectl("-n", "tuner-demo", "get", "job", "tuner-experiment",
                                     "-o", "json").stdout)["status"]
    assert not status.get("failed", 0) > 1, status
    return bool(status.get("succeeded"))


@pytest.mark.timeout(1500)  # the cold image import and two trials, with a pod deleted
def test_the_job_runs_on_a_real_node_and_resumes_after_its_pod_is_deleted(
        node: Node, tmp_path: Path) -> None:
    job = _deploy_demo(node)
    started = time.monotonic()
    node.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(job))
    wait_for(lambda: "trial-000" in node.configmap("tuner-ledger"), timeout_s=300,
             interval_s=1, what="first trial in the ledger")
    first = node.kubectl("-n", "tuner-demo", "get", "pods", "-l", "job-name=tuner-experiment",
                         "-o", "jsonpath={.items[0].metadata.name}").stdout
    node.kubectl("-n", "tuner-demo", "delete", "pod", first, "--wait=true", "--timeout=90s")
    first_stop = node.configmap("tuner-ledger")
    assert first_stop["state"] == "running" and "SIGTERM" in first_stop["last-stop"]
    tuning = node.configmap("tuner-tuning")
    assert tuning["upstream-keepalive-timeout"] == "60"  # the baseline, restored

    wait_for(lambda: _job_done(node), timeout_s=600, interval_s=1, what="the Job complete")
    wall_s = time.monotonic() - started
    logs = node.kubectl("-n", "tuner-demo", "logs", "job/tuner-experiment").stdout
    assert "resuming experiment" in logs, logs
    ledger = node.configmap("tuner-ledger")
    assert ledger["state"] == "finished"
    # the positive control first (unsafe by design), then proxy idle 3s and 1s
    verdicts = {json.loads(v)["verdict"] for k, v in ledger.items() if k.startswith("trial-")}
    recommendation = node.configmap("tuner-keepalive")
    assert recommendation, "no recommendation ConfigMap"
    print(f"Job complete in {wall_s:.0f} s (one pod deleted mid-run); verdicts {verdicts}; "
          f"recommendation {recommendation}\n{logs}")
    assert verdicts == {"safe", "unsafe"}


@pytest.mark.timeout(1200)
def test_the_load_comes_from_worker_pods_on_a_real_node(node: Node) -> None:
    """`kubernetes.workers: 2`: each trial's load from a Job of two worker pods the runner
    creates, conducted by its Locust master over the pod network, removed after the load."""
    job = _deploy_demo(node, workers=2, worker_cpu="500m", worker_memory="256Mi")
    started = time.monotonic()
    node.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(job))
    seen_workers: set[str] = set()

    def done_and_watch() -> bool:  # the worker pods, as they come and go
        names = node.kubectl("-n", "tuner-demo", "get", "pods", "-l",
                             "app.kubernetes.io/name=tuner-worker", "-o",
                             "jsonpath={.items[*].metadata.name}").stdout.split()
        seen_workers.update(names)
        return _job_done(node)
    wait_for(done_and_watch, timeout_s=900, interval_s=1, what="the Job complete")
    wall_s = time.monotonic() - started
    logs = node.kubectl("-n", "tuner-demo", "logs", "job/tuner-experiment").stdout
    ledger = node.configmap("tuner-ledger")
    trials = [json.loads(v) for k, v in ledger.items() if k.startswith("trial-")]
    print(f"Job with 2 worker pods complete in {wall_s:.0f} s; {len(seen_workers)} worker "
          f"pods seen; trials {trials}\n{logs}")
    assert "the load comes from 2 worker pods" in logs, logs
    assert {t["verdict"] for t in trials} == {"safe", "unsafe"}, trials
    # every trial's bursts were reported by both worker pods, with their clocks measured
    assert all(t["n_load_processes"] == 2 for t in trials), trials
    assert len(seen_workers) >= 2, seen_workers
    # the last trial's worker Job was deleted when its load ended; its pods follow
    wait_for(lambda: not node.kubectl(
        "-n", "tuner-demo", "get", "pods", "-l", "app.kubernetes.io/name=tuner-worker",
        "-o", "name").stdout.strip(), timeout_s=60, interval_s=1, what="the worker pods gone")
    assert not node.kubectl("-n", "tuner-demo", "get", "jobs", "-o", "name").stdout.count(
        "tuner-workers")
