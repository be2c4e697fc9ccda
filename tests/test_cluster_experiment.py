"""`tuner experiment --target kubernetes` end to end, as the CLI, against a simulated
cluster: the in-repo API server (driven by the real client) stands in for Kubernetes, and
one "pod" of real processes on 127.0.0.1 stands in for the demo Deployment's pod: Node
(the app), nginx in front of it, and `tuner sidecar` watching the tuning ConfigMap through
the API server. A restart of the Deployment restarts Node with the app key of the tuning
ConfigMap, as a new pod reading it from its environment would.

The proxy and the app are real, so the verdicts are real: nginx at 1s in front of Node
closing at 2 s is safe, at 3s it races."""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuner.lab.process import http_get

from .conftest import Pod, start_pod, wait_for
from .kube_api import KubeState, kube_api

TUNER = [sys.executable, "-m", "tuner.cli"]
NS = "tuner-demo"
# upstream-keepalive-connections renders nginx's `keepalive N;`: without it nginx keeps no
# idle upstream connection at all, and there is no race to find
BASELINE = {"upstream-keepalive-timeout": "60", "upstream-keepalive-connections": "128",
            "app-keep-alive-timeout-ms": "5000", "generation": "0"}
APP_KEY = "app-keep-alive-timeout-ms"
#: the Job's projected token for the sidecars (audience tuner-sidecar), as a file
JOB_TOKEN = "job-token-for-the-sidecars"


@contextlib.contextmanager
def demo_pod(tmp_path: Path, state: KubeState, kubeconfig: Path) -> Iterator[Pod]:
    """The demo Deployment's pod, as processes; restarts of its Deployment restart the
    app with the tuning ConfigMap's app key, as a new pod reads it from its environment."""
    state.namespaces.add(NS)
    state.configmaps[(NS, "tuner-tuning")] = {
        "apiVersion": "v1", "kind": "ConfigMap", "data": dict(BASELINE),
        "metadata": {"name": "tuner-tuning", "namespace": NS,
                     "resourceVersion": state.next_version()}}
    state.add_deployment(NS, "demo-app", replicas=1)
    # the sidecar asks the API server whose token the Job sends (TokenReview), as in the
    # demo Deployment; the Job reads it from kubernetes.sidecar_token_file
    state.tokens[JOB_TOKEN] = (f"system:serviceaccount:{NS}:tuner", ["tuner-sidecar"])
    (tmp_path / "sidecar-token").write_text(JOB_TOKEN + "\n")
    # The restart runs on this thread, not the API server's request thread: the lab's
    # processes die with the thread that started them (PR_SET_PDEATHSIG), and a request
    # thread ends with its request.
    restarts: queue.Queue[tuple[float, threading.Event] | None] = queue.Queue()

    def restart_app(namespace: str, name: str) -> None:
        assert (namespace, name) == (NS, "demo-app")
        done = threading.Event()
        restarts.put((int(state.configmaps[(NS, "tuner-tuning")]["data"][APP_KEY]) / 1000,
                      done))
        assert done.wait(timeout=30), "the app did not restart"

    with start_pod(tmp_path, ["--configmap", f"{NS}/tuner-tuning", "--kubeconfig",
                              str(kubeconfig)], first_tuning=BASELINE,
                   app_idle_s=int(BASELINE[APP_KEY]) / 1000,
                   caller_args=["--caller-service-account", f"{NS}/tuner"]) as pod:
        def restarter() -> None:
            while (item := restarts.get()) is not None:
                pod.app.set_idle(item[0])
                item[1].set()
        thread = threading.Thread(target=restarter)
        thread.start()
        state.on_restart = restart_app
        state.pods = [{"metadata": {"name": "demo-app-0", "namespace": NS},
                       "status": {"phase": "Running", "podIP": "127.0.0.1"}}]
        try:
            yield pod
        finally:
            restarts.put(None)
            thread.join(timeout=30)


def _spec(tmp_path: Path, pod: Pod) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps({
        "proxy": "nginx", "upstream": "node", "proxy_idle": ["1s", "3s"],
        "upstream_idle": ["1s"], "max_seconds": 30, "unsafe_after": 3, "safe_after": 160,
        "seed": 3,
        "kubernetes": {"namespace": NS, "service_url": f"{pod.nginx_url}/",
                       "deployment": "demo-app", "sidecar_port": pod.sidecar_port,
                       "rollout_timeout": "10s", "sidecar_timeout": "10s",
                       "api_retry_limit": "20s",
                       "sidecar_token_file": str(tmp_path / "sidecar-token")}}))
    return path


def _argv(tmp_path: Path, kubeconfig: Path, spec: Path) -> list[str]:
    return [*TUNER, "experiment", str(spec), "--target", "kubernetes", "--kubeconfig",
            str(kubeconfig), "--db", str(tmp_path / "results.db"), "--json"]


def _when(condition: object, *, then: object, timeout_s: float = 120) -> threading.Thread:
    """Run `then` once `condition` holds (polled), in the background."""
    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():  # type: ignore[operator]
                then()  # type: ignore[operator]
                return
            time.sleep(0.05)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _ledger(state: KubeState) -> dict[str, str]:
    with state.lock:
        found = state.configmaps.get((NS, "tuner-ledger"))
        return dict(found["data"]) if found else {}


@pytest.mark.race
@pytest.mark.slow
def test_the_cluster_loop_end_to_end_through_conflicts_and_an_api_outage(
        tmp_path: Path) -> None:
    with kube_api(tmp_path) as (state, kubeconfig), \
            demo_pod(tmp_path, state, kubeconfig) as pod:
        state.conflicts = 2  # someone else writes the tuning ConfigMap twice, first

        def outage() -> None:  # 3 s, and until the runner has met it
            state.down_connections = 3
            state.down_until = time.monotonic() + 3
        _when(lambda: "trial-000" in _ledger(state), then=outage)
        done = subprocess.run(_argv(tmp_path, kubeconfig, _spec(tmp_path, pod)),
                              capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr
        assert "the API server does not answer" in done.stderr  # the outage was met
        document = json.loads(done.stdout)
        by_proxy = {t["proxy_idle_s"]: t for t in document["trials"] if not t["control"]}
        safe, unsafe = by_proxy[1.0], by_proxy[3.0]
        # the positive control ran first, with the proxy set well above the measured close
        [control] = [t for t in document["trials"] if t["control"]]
        assert control["n_race"] >= 1 and control["proxy_idle_s"] >= 3.0, control
        # the app's setting reached Node by a restart: it closes 1 s after its 1000 ms
        assert 1.9 < safe["upstream_close_s"] < 2.3 and safe["upstream_advertised_s"] == 1.0
        assert safe["verdict"] == "safe" and safe["n_failed"] == 0
        assert unsafe["verdict"] == "unsafe" and unsafe["n_502"] >= 3
        # the sidecar's error-log counters came back: one line per 502 of a POST
        assert unsafe["n_proxy_log_races"] == unsafe["n_502"]
        experiment_id = document["experiment_id"]
        assert {t["generation"] for t in document["trials"]} == {
            f"{experiment_id}-000-0-control", f"{experiment_id}-001-0",
            f"{experiment_id}-002-0"}
        assert "changed under us (409)" in done.stderr or "changed under us (409)" in str(
            document)  # said on the progress stream
        # the baseline is back, in the ConfigMap, in the app, and in nginx via the sidecar
        assert state.configmaps[(NS, "tuner-tuning")]["data"] == BASELINE
        assert pod.app.idle_s == 5.0
        answer = http_get(pod.sidecar_port, "/status")
        assert answer is not None and answer[0] == 200
        status = json.loads(answer[1])
        assert status["generation"] == "0" and status["error"] is None
        ledger = _ledger(state)
        assert ledger["state"] == "finished"
        assert [json.loads(ledger[k])["verdict"] for k in ("trial-000", "trial-001",
                                                           "trial-002")].count("unsafe") == 2
        recommendation = state.configmaps[(NS, "tuner-keepalive")]
        # the measured close (about 2 s) less the 1 s margin, rounded down to the grid
        # of nginx's time syntax: 1s when Node closed at 2.000 s or later, 0.9s just before
        assert 0.9 <= float(recommendation["data"]["proxy-idle-timeout-seconds"]) <= 1.0
        assert [w["name"] for w in document["written"]] == ["tuner-keepalive"]


@pytest.mark.slow
def test_sigterm_restores_the_baseline_and_a_rerun_resumes(tmp_path: Path) -> None:
    with kube_api(tmp_path) as (state, kubeconfig), \
            demo_pod(tmp_path, state, kubeconfig) as pod:
        spec = _spec(tmp_path, pod)
        first = subprocess.Popen(_argv(tmp_path, kubeconfig, spec), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        wait_for(lambda: "trial-000" in _ledger(state), timeout_s=120,
                 what="first trial in the ledger")

        def tuning_generation() -> str:
            with state.lock:
                return str(state.configmaps[(NS, "tuner-tuning")]["data"].get("generation"))
        # into the second trial: its settings are in the ConfigMap
        wait_for(lambda: tuning_generation().endswith("-001-0"), timeout_s=60,
                 what="second trial's generation in the tuning ConfigMap")
        assert state.configmaps[(NS, "tuner-tuning")]["data"] != BASELINE
        first.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _out, err = first.communicate(timeout=60)
        assert first.returncode == 130, err
        assert time.monotonic() - started < 30  # within the Job's 60 s grace period
        assert "restored the baseline of ConfigMap tuner-tuning" in err
        assert state.configmaps[(NS, "tuner-tuning")]["data"] == BASELINE
        assert pod.app.idle_s == 5.0
        ledger = _ledger(state)
        assert ledger["state"] == "running" and "SIGTERM" in ledger["last-stop"]
        # the keys the tuner varies, as they were before it began
        assert json.loads(ledger["baseline"]) == {k: v for k, v in BASELINE.items()
                                                  if k != "upstream-keepalive-connections"}

        # as if the restore had failed: the ConfigMap still holds a trial's settings; the
        # re-run must restore what the ledger recorded, not take these as the baseline
        with state.lock:
            state.configmaps[(NS, "tuner-tuning")]["data"].update(
                {"upstream-keepalive-timeout": "3s", APP_KEY: "1000",
                 "generation": ledger["experiment-id"] + "-001-0"})
        # the Job runs again: same spec, same volume
        second = subprocess.run(_argv(tmp_path, kubeconfig, spec), capture_output=True,
                                text=True, timeout=240)
        assert second.returncode == 0, second.stderr
        assert "resuming experiment" in second.stderr
        with contextlib.closing(sqlite3.connect(tmp_path / "results.db")) as db:
            rows = db.execute("SELECT cell, repeat, attempt FROM trials").fetchall()
        # none repeated (the positive control, trial 0, included)
        assert sorted(rows) == [("1|1", 0, 0), ("3|1", 0, 0), ("control|1", 0, 0)]
        assert state.configmaps[(NS, "tuner-tuning")]["data"] == BASELINE
        assert _ledger(state)["state"] == "finished"
