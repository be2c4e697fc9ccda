"""`tuner sidecar --configmap NAMESPACE/NAME`: a real sidecar process watching the tuning
ConfigMap through the in-repo API server, changed through the real `kubernetes` client;
with a real nginx where the reload matters."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client

from tuner.kube.client import connect
from tuner.lab.process import ManagedProcess, http_get, pick_free_port
from tuner.probe import parse_target, probe

from .conftest import FIRST_TUNING, TUNER, start_pod, wait_for
from .kube_api import KubeState, kube_api

NAMESPACE, NAME = "shop", "tuner-tuning"
#: the kubelet's sync period plus its cache TTL delay a mounted ConfigMap by 60-90 s; the
#: watch must beat that by far (measured here: about 0.1 s, the sidecar polling every 100 ms)
WATCH_LATENCY_S = 1.0


def _configmap(data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "data": data,
            "metadata": {"name": NAME, "namespace": NAMESPACE}}


@contextmanager
def cluster(tmp_path: Path, *, data: dict[str, str] | None = FIRST_TUNING
            ) -> Iterator[tuple[KubeState, Path, client.CoreV1Api]]:
    """The API test server with namespace `shop` (and the tuning ConfigMap, unless None)."""
    with kube_api(tmp_path) as (state, kubeconfig):
        state.namespaces.add(NAMESPACE)
        api, _, _ = connect(kubeconfig=str(kubeconfig), context=None)
        if data is not None:
            api.create_namespaced_config_map(NAMESPACE, _configmap(data))
        yield state, kubeconfig, api


def _watch_args(kubeconfig: Path, watch_timeout: str = "5s") -> list[str]:
    return ["--configmap", f"{NAMESPACE}/{NAME}", "--kubeconfig", str(kubeconfig),
            "--watch-timeout", watch_timeout]


@contextmanager
def bare_sidecar(tmp_path: Path, kubeconfig: Path, *, watch_timeout: str = "5s"
                 ) -> Iterator[str]:
    """A watching sidecar with no nginx beside it (its reloads fail; the tuning still
    counts as applied); yields its /status URL."""
    (tmp_path / "render").mkdir()
    port = pick_free_port()
    sidecar = ManagedProcess(
        [*TUNER, "sidecar", *_watch_args(kubeconfig, watch_timeout),
         "--render-dir", str(tmp_path / "render"), "--nginx-pid", str(tmp_path / "nginx.pid"),
         "--error-log", str(tmp_path / "error.log"), "--listen", f"127.0.0.1:{port}",
         "--poll", "100ms", "--allow-unauthenticated"], name="sidecar", log_dir=tmp_path)
    sidecar.start()
    try:
        sidecar.wait_ready(lambda: http_get(port, "/status") is not None, timeout_s=20,
                           what="serve /status")
        yield f"http://127.0.0.1:{port}/status"
    finally:
        sidecar.stop()


def wait_status(url: str, is_reached: Callable[[dict[str, Any]], bool], *, timeout_s: float,
                what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status: dict[str, Any] = httpx.get(url).json()
        if is_reached(status):
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"the sidecar's /status never showed {what} within {timeout_s:g}s: "
                        f"{status}")
        time.sleep(0.05)


def _watches(state: KubeState) -> list[str]:
    with state.lock:
        return [path for verb, path in state.requests if verb == "watch"]


def _n_requests(state: KubeState, verb: str) -> int:
    with state.lock:
        return sum(1 for seen, _ in state.requests if seen == verb)


def test_a_configmap_change_reaches_nginx_in_under_a_second(tmp_path: Path) -> None:
    with cluster(tmp_path) as (_, kubeconfig, api), \
            start_pod(tmp_path, _watch_args(kubeconfig)) as pod:
        status = pod.wait_generation("1")
        assert status["error"] is None and status["reloads"] == 1
        rendered = (pod.render_dir / "client-keepalive.conf").read_text()
        assert "keepalive_timeout 600s;" in rendered

        api.patch_namespaced_config_map(NAME, NAMESPACE,
                                        {"data": {"keep-alive": "1500ms", "generation": "2"}})
        changed_at = time.monotonic()
        status = wait_status(f"{pod.sidecar_url}/status", lambda s: s["generation"] == "2",
                             timeout_s=WATCH_LATENCY_S, what="generation 2")
        latency_s = time.monotonic() - changed_at
        assert latency_s < WATCH_LATENCY_S
        assert status["error"] is None and status["reloads"] == 2
        assert "keepalive_timeout 1500ms;" in (pod.render_dir / "client-keepalive.conf"
                                               ).read_text()
        pod.wait_workers(status)  # the old worker is gone: it kept the old keep-alive
        measured = probe(parse_target(f"{pod.nginx_url}/"), n_samples=2, max_idle_s=10)
        assert measured.idle_close_s is not None and 1.4 < measured.idle_close_s < 1.9

        # the same validation as a mounted ConfigMap: a typo is never applied
        typo = _configmap({**FIRST_TUNING, "upstream-keepalive-timeout": "forever",
                           "generation": "3"})
        typo["metadata"]["resourceVersion"] = api.read_namespaced_config_map(
            NAME, NAMESPACE).metadata.resource_version
        api.replace_namespaced_config_map(NAME, NAMESPACE, typo)
        status = wait_status(f"{pod.sidecar_url}/status", lambda s: bool(s["error"]),
                             timeout_s=WATCH_LATENCY_S, what="the invalid tuning's error")
        assert status["generation"] == "2" and status["reloads"] == 2
        assert "upstream-keepalive-timeout: 'forever' is not a duration" in status["error"]
        assert "tuner_tuning_error 1" in httpx.get(f"{pod.sidecar_url}/metrics").text


@pytest.mark.parametrize(("verb", "generation"), [("get", None), ("watch", "1")])
def test_forbidden_shows_the_verb_and_namespace_until_rbac_is_fixed(
        tmp_path: Path, verb: str, generation: str | None) -> None:
    with cluster(tmp_path) as (state, kubeconfig, api):
        state.deny.add((verb, NAMESPACE))
        with bare_sidecar(tmp_path, kubeconfig) as url:
            status = wait_status(url, lambda s: "may not" in str(s["error"]), timeout_s=5,
                                 what=f"the forbidden {verb}")
            assert f"may not {verb} configmaps in namespace '{NAMESPACE}'" in status["error"]
            assert f"ConfigMap {NAMESPACE}/{NAME}" in status["error"]
            # two more tries (the back-off is 0.5 s, then 1 s) leave the last good tuning
            n_tries = _n_requests(state, verb)
            wait_for(lambda: _n_requests(state, verb) >= n_tries + 2, timeout_s=10,
                     what=f"two more tries of the forbidden {verb}")
            status = httpx.get(url).json()
            assert status["generation"] == generation
            assert f"may not {verb} configmaps" in status["error"]
            metrics = httpx.get(url.replace("/status", "/metrics")).text
            assert "tuner_tuning_error 1" in metrics

            with state.lock:
                state.deny.discard((verb, NAMESPACE))
            api.patch_namespaced_config_map(NAME, NAMESPACE, {"data": {"generation": "2"}})
            # the back-off has reached 2-4 s by now: the next retry gets through. With the
            # watch denied, that retry's get applies generation 2 a moment before the watch
            # it then opens clears the error (a fresh-clone run saw the moment between)
            wait_status(url, lambda s: s["generation"] == "2"
                        and "may not" not in str(s["error"]), timeout_s=8,
                        what="generation 2 and no RBAC error once allowed")


def test_a_configmap_missing_at_start_is_applied_once_created(tmp_path: Path) -> None:
    with cluster(tmp_path, data=None) as (_, kubeconfig, api), \
            bare_sidecar(tmp_path, kubeconfig) as url:
        status = wait_status(url, lambda s: "does not exist" in str(s["error"]), timeout_s=5,
                             what="the missing ConfigMap")
        assert status["generation"] is None and f"{NAMESPACE}/{NAME}" in status["error"]

        api.create_namespaced_config_map(NAMESPACE, _configmap(FIRST_TUNING))
        created_at = time.monotonic()
        status = wait_status(url, lambda s: s["generation"] == "1", timeout_s=WATCH_LATENCY_S,
                             what="generation 1 once created")
        assert time.monotonic() - created_at < WATCH_LATENCY_S
        assert "does not exist" not in str(status["error"])

        api.delete_namespaced_config_map(NAME, NAMESPACE)
        status = wait_status(url, lambda s: "was deleted" in str(s["error"]), timeout_s=5,
                             what="the deletion")
        assert status["generation"] == "1"  # the last tuning stays in force

        api.create_namespaced_config_map(NAMESPACE, _configmap({**FIRST_TUNING,
                                                                "generation": "2"}))
        status = wait_status(url, lambda s: s["generation"] == "2", timeout_s=WATCH_LATENCY_S,
                             what="generation 2 once re-created")
        assert "was deleted" not in str(status["error"])


def test_a_watch_that_times_out_is_resumed_and_still_sees_changes(tmp_path: Path) -> None:
    with cluster(tmp_path) as (state, kubeconfig, api), \
            bare_sidecar(tmp_path, kubeconfig, watch_timeout="1s") as url:
        wait_status(url, lambda s: s["generation"] == "1", timeout_s=5, what="generation 1")
        wait_for(lambda: len(_watches(state)) >= 3, timeout_s=10,
                 what="third watch (two ended on their 1 s timeout)")
        watches = _watches(state)
        assert len(watches) >= 3, watches
        assert all("timeoutSeconds=1" in path for path in watches)
        # the first starts from the current state, the re-watches from where it stopped
        assert "resourceVersion" not in watches[0]
        assert all("resourceVersion=" in path for path in watches[1:]), watches

        api.patch_namespaced_config_map(NAME, NAMESPACE, {"data": {"generation": "2"}})
        wait_status(url, lambda s: s["generation"] == "2", timeout_s=WATCH_LATENCY_S,
                    what="generation 2 after re-watches")


def test_410_gone_gets_again_and_watches_from_the_current_state(tmp_path: Path) -> None:
    with cluster(tmp_path) as (state, kubeconfig, api), \
            bare_sidecar(tmp_path, kubeconfig, watch_timeout="1s") as url:
        wait_status(url, lambda s: s["generation"] == "1", timeout_s=5, what="generation 1")
        with state.lock:  # etcd compacted: the sidecar's place is older than the window
            state.compacted_version = state.version + 1
            n_before = len(state.requests)
        wait_for(lambda: any(verb == "get" for verb, _ in state.requests[n_before:]),
                 timeout_s=3, what="a get after the 410")
        # another object changes: from now on, the newest resourceVersion is in the window
        api.create_namespaced_config_map(NAMESPACE, {"metadata": {"name": "other"}})
        errors = set()
        n_watches = len(_watches(state))

        def two_more_watches() -> bool:  # 1 s each, resumed where the one before ended
            errors.add(str(httpx.get(url).json()["error"]))
            return len(_watches(state)) >= n_watches + 2
        wait_for(two_more_watches, timeout_s=10, what="two more watches", interval_s=0.1)
        with state.lock:
            after = state.requests[n_before:]
        gets = [i for i, (verb, path) in enumerate(after)
                if verb == "get" and path.endswith(f"/configmaps/{NAME}")]
        assert len(gets) == 1, f"not one get after the 410: {after}"
        watches = [path for verb, path in after[gets[0]:] if verb == "watch"]
        assert "resourceVersion" not in watches[0]  # from the current state: no 410 loop
        assert all("resourceVersion=" in path for path in watches[1:]), watches
        assert not [error for error in errors if "too old" in error or "(410)" in error]

        api.patch_namespaced_config_map(NAME, NAMESPACE, {"data": {"generation": "2"}})
        status = wait_status(url, lambda s: s["generation"] == "2", timeout_s=WATCH_LATENCY_S,
                             what="generation 2 after the 410")
        assert status["error"] is None or "could not signal nginx" in status["error"]


def test_an_unreachable_api_server_keeps_the_last_tuning(tmp_path: Path) -> None:
    with ExitStack() as sidecar:
        with cluster(tmp_path) as (_, kubeconfig, api):
            url = sidecar.enter_context(bare_sidecar(tmp_path, kubeconfig))
            wait_status(url, lambda s: s["generation"] == "1", timeout_s=5,
                        what="generation 1")
            api.patch_namespaced_config_map(NAME, NAMESPACE, {"data": {"generation": "2"}})
            wait_status(url, lambda s: s["generation"] == "2", timeout_s=WATCH_LATENCY_S,
                        what="generation 2")
        # the API server is gone: its open watch ends, the next request is refused
        status = wait_status(url, lambda s: "cannot reach" in str(s["error"]), timeout_s=5,
                             what="the unreachable API server")
        assert status["generation"] == "2"
        assert "cannot reach the Kubernetes API server at http://127.0.0.1:" in status["error"]
        assert f"ConfigMap {NAMESPACE}/{NAME}" in status["error"]
        assert "retrying in" in status["error"]


@pytest.mark.parametrize(("args", "message"), [
    ([], "give exactly one tuning source: --tuning-dir DIR"),
    (["--tuning-dir", ".", "--configmap", "shop/tuner-tuning"], "--configmap NAMESPACE/NAME"),
    (["--configmap", "tuner-tuning"], "--configmap 'tuner-tuning' is not NAMESPACE/NAME"),
    (["--configmap", "shop/Tuner"], "--configmap name 'Tuner' is not a valid Kubernetes name"),
    (["--tuning-dir", ".", "--kubeconfig", "k"], "--kubeconfig, --context and --watch-timeout "
                                                 "go with --configmap"),
    (["--configmap", "shop/t", "--watch-timeout", "500ms"], "--watch-timeout 0.5s is too short"),
])
def test_the_tuning_source_is_exactly_one_and_valid(tmp_path: Path, args: list[str],
                                                     message: str) -> None:
    result = subprocess.run([*TUNER, "sidecar", *args, "--render-dir", str(tmp_path),
                             "--nginx-pid", "x", "--error-log", "y"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
