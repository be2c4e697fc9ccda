"""Cluster steps of a trial against the in-repo API server, driven by the real client:
rollout restart and wait (including a rollout that never becomes ready), and waiting for
every sidecar to report a generation (real `tuner sidecar` processes on 127.0.0.1)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from kubernetes import client

from tuner.errors import KubeError
from tuner.kube.client import connect
from tuner.kube.rollout import (
    RESTARTED_AT,
    list_pods,
    restart_deployment,
    sidecar_urls,
    wait_rollout,
    wait_sidecars,
)
from tuner.lab.process import ManagedProcess, http_get, pick_free_port

from .kube_api import kube_api


def _apps(core_api: client.CoreV1Api) -> client.AppsV1Api:
    return client.AppsV1Api(core_api.api_client)


def test_restart_then_wait_for_the_rollout(tmp_path: Path) -> None:
    with kube_api(tmp_path) as (state, kubeconfig):
        state.namespaces.add("shop")
        state.add_deployment("shop", "demo-app")
        api, host, context = connect(kubeconfig=str(kubeconfig), context=None)
        restart_deployment(_apps(api), "shop", "demo-app", host=host, context=context)
        deployment = state.deployments[("shop", "demo-app")]
        assert RESTARTED_AT in deployment["spec"]["template"]["metadata"]["annotations"]
        assert deployment["metadata"]["generation"] == 2
        done = wait_rollout(_apps(api), "shop", "demo-app", timeout_s=5, host=host,
                            context=context, poll_s=0.1)
        assert done.is_complete and done.generation == 2


def test_a_rollout_that_never_becomes_ready_times_out_with_the_counts(tmp_path: Path) -> None:
    with kube_api(tmp_path) as (state, kubeconfig):
        state.namespaces.add("shop")
        state.add_deployment("shop", "demo-app", replicas=2)
        state.rollout = "never"
        api, host, context = connect(kubeconfig=str(kubeconfig), context=None)
        restart_deployment(_apps(api), "shop", "demo-app", host=host, context=context)
        started = time.monotonic()
        with pytest.raises(KubeError, match=r"did not complete within 1s \(updated 1/2, "
                                            r"available 1/2, total 3"):
            wait_rollout(_apps(api), "shop", "demo-app", timeout_s=1, host=host,
                         context=context, poll_s=0.1)
        assert time.monotonic() - started < 5


def test_restart_errors_name_the_deployment(tmp_path: Path) -> None:
    with kube_api(tmp_path) as (state, kubeconfig):
        state.namespaces.add("shop")
        api, host, context = connect(kubeconfig=str(kubeconfig), context=None)
        with pytest.raises(KubeError, match="Deployment shop/missing does not exist"):
            restart_deployment(_apps(api), "shop", "missing", host=host, context=context)
        state.add_deployment("shop", "demo-app")
        state.deny.add(("patch", "shop"))
        with pytest.raises(KubeError, match="may not patch deployments in namespace 'shop'"):
            restart_deployment(_apps(api), "shop", "demo-app", host=host, context=context)


def test_wait_for_every_sidecar_to_apply_a_generation(tmp_path: Path) -> None:
    ports, sidecars = [], []
    for i in range(2):
        pod = tmp_path / f"pod{i}"
        (pod / "tuning").mkdir(parents=True)
        (pod / "render").mkdir()
        (pod / "tuning" / "generation").write_text("1")
        port = pick_free_port()
        sidecar = ManagedProcess(
            [sys.executable, "-m", "tuner.cli", "sidecar", "--tuning-dir", str(pod / "tuning"),
             "--render-dir", str(pod / "render"), "--nginx-pid", str(pod / "nginx.pid"),
             "--error-log", str(pod / "error.log"), "--listen", f"127.0.0.1:{port}",
             "--poll", "100ms", "--allow-unauthenticated"], name="sidecar", log_dir=pod)
        sidecar.start()
        sidecars.append(sidecar)
        ports.append(port)
    # nginx's stand-in: a process that takes SIGHUP (this test is about the waiting, not
    # about nginx, which test_sidecar.py and the cluster tests run for real)
    stand_in = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal("
                                 "signal.SIGHUP, signal.SIG_IGN); time.sleep(120)"])
    try:
        for sidecar, port in zip(sidecars, ports, strict=True):
            sidecar.wait_ready(lambda p=port: http_get(p, "/status") is not None,
                               timeout_s=20, what="serve /status")
        all_urls = [f"http://127.0.0.1:{port}" for port in ports]
        # no nginx to reload yet: rendered, but not in force, so not applied
        with pytest.raises(KubeError, match=r"rendered '1' but nginx has not taken it: "
                                            r"could not signal nginx"):
            wait_sidecars(all_urls, "1", timeout_s=1)
        for i in range(2):
            (tmp_path / f"pod{i}" / "nginx.pid").write_text(str(stand_in.pid))
            (tmp_path / f"pod{i}" / "tuning" / "generation").write_text("1 ")  # a change
        with kube_api(tmp_path) as (state, kubeconfig):
            state.namespaces.add("shop")
            # the API server answers with pods on 127.0.0.1; one port per sidecar here
            state.pods = [{"metadata": {"name": f"demo-app-{i}", "namespace": "shop"},
                           "status": {"phase": "Running", "podIP": "127.0.0.1"}}
                          for i in range(2)]
            api, host, context = connect(kubeconfig=str(kubeconfig), context=None)
            urls = sidecar_urls(list_pods(api, "shop", "app=demo-app", host=host,
                                          context=context), ports[0])
            assert urls == [f"http://127.0.0.1:{ports[0]}"] * 2
        wait_sidecars(all_urls, "1", timeout_s=5)
        (tmp_path / "pod0" / "tuning" / "generation").write_text("2")
        with pytest.raises(KubeError, match=r"1 of 2 sidecars did not apply generation '2'"):
            wait_sidecars(all_urls, "2", timeout_s=1)
        (tmp_path / "pod1" / "tuning" / "generation").write_text("2")
        wait_sidecars(all_urls, "2", timeout_s=5)
    finally:
        stand_in.kill()
        stand_in.wait()
        for sidecar in sidecars:
            sidecar.stop()
    with pytest.raises(KubeError, match="no running pod matched"):
        wait_sidecars([], "1", timeout_s=1)


def test_a_sidecar_without_nginx_says_so(tmp_path: Path) -> None:
    (tmp_path / "tuning").mkdir()
    (tmp_path / "render").mkdir()
    (tmp_path / "tuning" / "generation").write_text("7")
    from tuner.sidecar import Sidecar, SidecarPaths

    sidecar = Sidecar(SidecarPaths(tuning_dir=tmp_path / "tuning",
                                   render_dir=tmp_path / "render",
                                   nginx_pid=tmp_path / "nginx.pid",
                                   error_log=tmp_path / "error.log"))
    sidecar.step()
    status = sidecar.state.status()
    assert status["generation"] == "7" and status["reloads"] == 0
    assert "could not signal nginx" in str(status["error"])


def test_an_unreadable_error_log_is_reported_not_raised(tmp_path: Path) -> None:
    # a directory where the log should be: open() fails with an OSError even as root
    (tmp_path / "tuning").mkdir()
    (tmp_path / "render").mkdir()
    (tmp_path / "error.log").mkdir()
    from tuner.sidecar import Sidecar, SidecarPaths

    sidecar = Sidecar(SidecarPaths(tuning_dir=tmp_path / "tuning",
                                   render_dir=tmp_path / "render",
                                   nginx_pid=tmp_path / "nginx.pid",
                                   error_log=tmp_path / "error.log"))
    sidecar.step()
    error = str(sidecar.state.status()["error"])
    assert f"cannot read nginx's error log {tmp_path / 'error.log'}" in error
    (tmp_path / "error.log").rmdir()
    (tmp_path / "error.log").write_text("")
    sidecar.step()  # readable again: the problem clears
    assert "error log" not in str(sidecar.state.status()["error"])
