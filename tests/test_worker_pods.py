"""Locust workers beyond one machine (issue 12, item 5): the master measures each worker's
clock and speaks to it in its own (tuner.load.clocks), and `kubernetes.workers: N` runs the
workers as the pods of a Job the runner creates and removes (tuner.kube.workers).

Against the real lab (nginx in front of Node) with workers that are processes of their own,
one of them with a clock 20 ms behind; and against the real API server, as the Job's
ServiceAccount, with the real Job controller making the worker pods (no kubelet in this
tier: the node agent runs each pod's command as a local process, as a kubelet would run its
container)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tuner.errors import ConfigError
from tuner.kube.apply import connect
from tuner.kube.client import call_once
from tuner.kube.target import ClusterTarget, parse_cluster_target
from tuner.kube.workers import (
    WORKER_JOB,
    WORKER_LABELS,
    RunnerPod,
    WorkerJob,
    require_runner_pod,
    runner_image,
    worker_job,
)
from tuner.lab import Lab, get_upstream
from tuner.lab.process import ManagedProcess
from tuner.load.clocks import ClockSync
from tuner.load.local_workers import LocalWorkers
from tuner.load.locust_runner import LocustPlan, run_locust, worker_argv

from .conftest import wait_for
from .real_cluster import KubeNamespace, NodeAgent, RealCluster, kube_namespace, render
from .test_kube_real import WORKER_MAY
from .test_kube_real_loop import _used

TARGET = ClusterTarget(namespace="tuner-demo", service_url="http://demo-app/",
                       deployment="demo-app", workers=2)
RUNNER = RunnerPod(name="tuner-experiment-abcde", uid="1234", ip="10.244.0.7",
                   namespace="tuner-demo")


# -- the clocks (pure) ------------------------------------------------------------------------

def test_clock_sync_keeps_the_ping_with_the_shortest_round_trip() -> None:
    clocks = ClockSync()
    # the worker's clock is 20 ms behind; the first ping queued 40 ms on the way back
    clocks.record("w", sent_s=100.000, worker_s=99.985, received_s=100.050)
    clocks.record("w", sent_s=101.000, worker_s=100.9805, received_s=101.001)
    assert clocks.offset_s("w") == pytest.approx(-0.020, abs=0.0005)
    assert clocks.summary()["w"]["rtt_ms"] == pytest.approx(1.0)
    clocks.record("w", sent_s=102.0, worker_s=0.0, received_s=101.9)  # clock went back
    assert clocks.offset_s("w") == pytest.approx(-0.020, abs=0.0005)
    assert clocks.offset_s("never pinged") == 0.0  # as on one machine
    assert clocks.to_worker(200.0, "w") == pytest.approx(199.980, abs=0.0005)


def test_a_workers_report_moves_into_the_masters_clock() -> None:
    clocks = ClockSync()
    clocks.record("w", sent_s=10.0, worker_s=9.98, received_s=10.0)
    report = {"index": 3, "first_answer": 50.0, "groups": {"0": [49.9, 49.91]},
              "counts": {"2.0": {"2xx": 5}}, "idle_ms": {"2000": 5}}
    moved = clocks.report_to_master("w", report)
    assert moved["first_answer"] == pytest.approx(50.02)
    assert moved["groups"]["0"] == pytest.approx([49.92, 49.93])
    assert moved["counts"] == report["counts"] and moved["idle_ms"] == report["idle_ms"]
    assert report["first_answer"] == 50.0  # the original is left as it was


# -- the worker Job and its settings (pure) ---------------------------------------------------

def test_the_worker_job_is_locked_down_limited_owned_and_bounded() -> None:
    job = worker_job(argv=["python", "-m", "locust", "--worker"], target=TARGET,
                     runner=RUNNER, image="tuner:0.1.0", deadline_s=190)
    assert job["metadata"]["name"] == WORKER_JOB
    assert job["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": RUNNER.name, "uid": RUNNER.uid}]
    spec = job["spec"]
    assert spec["parallelism"] == spec["completions"] == 2 and spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] == 190
    pod = spec["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["command"][:3] == ["python", "-m", "locust"]
    assert container["resources"]["limits"] == {"cpu": "1", "memory": "512Mi"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # across namespaces an owner reference is invalid: none, the deadline still ends it
    elsewhere = RunnerPod(RUNNER.name, RUNNER.uid, RUNNER.ip, namespace="tuner")
    assert worker_job(argv=["x"], target=TARGET, runner=elsewhere, image="i",
                      deadline_s=10)["metadata"]["ownerReferences"] == []


def test_the_runners_network_policy_admits_the_worker_pods_and_nothing_else() -> None:
    (policy,) = [d for d in render() if d["kind"] == "NetworkPolicy"
                 and d["metadata"]["name"] == "tuner-experiment"]
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    assert set(source) == {"podSelector"}  # no namespaceSelector, no ipBlock
    assert source["podSelector"]["matchLabels"].items() <= WORKER_LABELS.items()
    assert rule["ports"] == [{"port": TARGET.worker_master_port, "protocol": "TCP"}]
    (job,) = [d for d in render() if d["kind"] == "Job"]
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert {e["name"] for e in container["env"]} == {
        "TUNER_POD_NAME", "TUNER_POD_UID", "TUNER_POD_IP", "TUNER_POD_NAMESPACE"}


def test_worker_pods_need_the_runner_in_a_pod() -> None:
    assert require_runner_pod(ClusterTarget("n", "http://x/", "d"), {}) is None  # no workers
    with pytest.raises(ConfigError, match=r"not in a pod \(no TUNER_POD_IP\).*workers to 0"):
        require_runner_pod(TARGET, {})
    with pytest.raises(ConfigError, match="TUNER_POD_UID, TUNER_POD_NAMESPACE not set"):
        require_runner_pod(TARGET, {"TUNER_POD_NAME": "p", "TUNER_POD_IP": "10.0.0.1"})
    assert require_runner_pod(TARGET, {"TUNER_POD_NAME": "p", "TUNER_POD_UID": "u",
                                       "TUNER_POD_IP": "10.0.0.1",
                                       "TUNER_POD_NAMESPACE": "n"}) == RunnerPod(
        "p", "u", "10.0.0.1", "n")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("workers", -1, r"kubernetes.workers: -1 must be a whole number of worker pods, 0 to 50"),
    ("workers", True, r"kubernetes.workers: True must be"),
    ("worker_cpu", "lots", r"kubernetes.worker_cpu: 'lots' is not a Kubernetes quantity"),
    ("worker_memory", "1 GB", r"not a Kubernetes quantity \(e.g. 512Mi\)"),
    ("worker_master_port", 70000, r"kubernetes.worker_master_port: 70000 must be a port"),
])
def test_bad_worker_settings_are_named(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_cluster_target({"namespace": "n", "service_url": "http://x/",
                              "deployment": "d", key: value})
    assert parse_cluster_target({"namespace": "n", "service_url": "http://x/",
                                 "deployment": "d", "workers": 3, "worker_cpu": 2})[
        "worker_cpu"] == "2"


# -- the lab: workers with clocks of their own ------------------------------------------------

@pytest.mark.race
def test_the_master_measures_a_worker_clock_20ms_behind_and_counts_every_answer(
        tmp_path: Path) -> None:
    with Lab(proxy="nginx", upstream=get_upstream("node"), proxy_idle_s=3,
             upstream_idle_s=1) as lab:
        assert lab.proxy is not None
        plan = LocustPlan(host_url=lab.proxy.url, gaps_s=[1.992, 1.996, 2.0], burst_size=30,
                          remote_workers=2, max_seconds=20)
        results = run_locust(plan, workdir=lab.workdir,
                             launcher=LocalWorkers([0, 20], workdir=tmp_path))
    assert results["n_processes"] == 2, results
    offsets = sorted(c["offset_ms"] for c in results["clocks"].values())
    # measured over loopback: within a millisecond or two of the truth
    assert offsets[0] == pytest.approx(-20, abs=2) and offsets[1] == pytest.approx(0, abs=2)
    assert all(c["rtt_ms"] < 20 for c in results["clocks"].values()), results["clocks"]
    assert results["n_bursts"] >= 2
    assert results["n_requests"] == 30 * results["n_bursts"], results
    # in the master's clock, each burst's requests over both workers were written together
    assert sorted(results["burst_spread_ms"])[len(results["burst_spread_ms"]) // 2] < 15


# -- the real API server: the Job of worker pods ----------------------------------------------

def _runner_pod(ns: KubeNamespace) -> RunnerPod:
    """A pod standing for the runner's (never scheduled: its image and uid are what the
    worker Job takes from it)."""
    ns.apply([{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "tuner-runner"},
               "spec": {"containers": [{"name": "tuner", "image": "tuner:0.1.0"}]}}])
    admin = connect(kubeconfig=str(ns.cluster.kubeconfig), context=None).core
    uid = admin.read_namespaced_pod("tuner-runner", ns.name).metadata.uid
    return RunnerPod(name="tuner-runner", uid=uid, ip="127.0.0.1", namespace=ns.name)


@pytest.mark.race
def test_worker_pods_of_a_real_job_carry_the_load_and_go_away(kube: RealCluster,
                                                               tmp_path: Path) -> None:
    with kube_namespace(kube, tmp_path) as ns:
        runner = _runner_pod(ns)
        connection = connect(kubeconfig=str(ns.tuner_kubeconfig), context=None)
        admin = connect(kubeconfig=str(kube.kubeconfig), context=None).core
        batch = client.BatchV1Api(admin.api_client)
        image = runner_image(connection.core, runner, host=connection.host, context=None,
                             call=call_once)
        assert image == "tuner:0.1.0"
        target = ClusterTarget(namespace=ns.name, service_url="http://x/", deployment="d",
                               workers=2)
        started: list[ManagedProcess] = []

        def kubelet(pod: Any) -> None:  # runs the pod's container command, as a node would
            (container,) = pod.spec.containers
            process = ManagedProcess(container.command, name=pod.metadata.name,
                                     log_dir=tmp_path)
            process.start()
            started.append(process)

        selector = ",".join(f"{k}={v}" for k, v in WORKER_LABELS.items())
        try:
            with Lab(proxy="nginx", upstream=get_upstream("node"), proxy_idle_s=3,
                     upstream_idle_s=1) as lab, NodeAgent(admin, ns.name, selector,
                                                          on_start=kubelet):
                assert lab.proxy is not None
                plan = LocustPlan(host_url=lab.proxy.url, gaps_s=[1.992, 1.996, 2.0],
                                  burst_size=30, remote_workers=2, max_seconds=20,
                                  master_bind_host=runner.ip)
                launcher = WorkerJob(connection, target, runner, image=image,
                                     deadline_s=200, call=call_once, poll_s=0.2)
                results = run_locust(plan, workdir=lab.workdir, launcher=launcher,
                                     master_host=runner.ip)
            assert results["n_processes"] == 2, results
            assert len(results["clocks"]) == 2, results
            assert results["n_requests"] == 30 * results["n_bursts"] > 0, results
            # both ran as pods of the Job the runner made
            assert len(started) == 2, [p.name for p in started]
            assert all(p.name.startswith(f"{WORKER_JOB}-") for p in started)
        finally:
            for process in started:
                process.stop()
        # the load's end deleted the Job; the garbage collector takes its pods
        wait_for(lambda: not batch.list_namespaced_job(ns.name).items, timeout_s=60,
                 interval_s=0.2, what="worker Job gone")
        wait_for(lambda: not admin.list_namespaced_pod(ns.name, label_selector=selector).items,
                 timeout_s=60, interval_s=0.2, what="worker pods gone")

        # a runner cut short leaves its Job: the next start replaces it; deleting the
        # runner's pod (its owner) removes it too
        stale = WorkerJob(connection, target, runner, image=image, deadline_s=60,
                          call=call_once, poll_s=0.2)
        stale.start(worker_argv(plan, master_host="127.0.0.1", master_port=9))
        wait_for(lambda: len(stale.pods()) == 2, timeout_s=60, interval_s=0.2,
                 what="stale worker pods")
        assert "Pending" in stale.describe()  # no node agent now: never scheduled
        first_uid = batch.read_namespaced_job(WORKER_JOB, ns.name).metadata.uid
        stale.start(worker_argv(plan, master_host="127.0.0.1", master_port=9))
        assert batch.read_namespaced_job(WORKER_JOB, ns.name).metadata.uid != first_uid
        admin.delete_namespaced_pod("tuner-runner", ns.name, grace_period_seconds=0)
        wait_for(lambda: not batch.list_namespaced_job(ns.name).items, timeout_s=60,
                 interval_s=0.2, what="worker Job collected with its owner")
        # as the audit log saw it: the worker Job's verbs, all allowed
        used, codes = _used(kube, ns.user("tuner"))
        assert 403 not in codes and used >= WORKER_MAY, sorted(used)


def test_worker_pods_are_refused_before_the_cluster_is_touched(tmp_path: Path,
                                                               monkeypatch: Any) -> None:
    from tuner.experiment.cluster_runner import run_cluster_experiment
    from tuner.experiment.spec import parse_spec

    for key in ("TUNER_POD_NAME", "TUNER_POD_UID", "TUNER_POD_IP", "TUNER_POD_NAMESPACE"):
        monkeypatch.delenv(key, raising=False)
    section = {"namespace": "n", "service_url": "http://x/", "deployment": "d", "workers": 2}
    nowhere = str(tmp_path / "no-kubeconfig")  # never read: the refusal comes first
    with pytest.raises(ConfigError, match="not in a pod"):
        run_cluster_experiment(parse_spec({"kubernetes": section}), kubeconfig=nowhere,
                               context=None, say=lambda _line: None)
    with pytest.raises(ConfigError, match=r"workers: 1 .* kubernetes.workers: 2 .*choose one"):
        run_cluster_experiment(parse_spec({"workers": 1, "kubernetes": section}),
                               kubeconfig=nowhere, context=None, say=lambda _line: None)
