"""`tuner sidecar --configmap` against the real API server, authenticated as the sidecar's
ServiceAccount (or, to show RBAC denying it, the Job's), with real nginx beside it where
the reload matters, and API outages from a fault proxy in front of the real server: a watch
cut in the middle of its stream, and a stall (packets dropped) the client must time out of.

Left to the stand-in (tests/test_sidecar_watch.py): a watch answered 410 Gone. The real
server's watch cache keeps every recent event for minutes, so a resourceVersion the
sidecar saw cannot be made "too old" within a test's seconds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tuner.kube.client import connect
from tuner.lab.process import ManagedProcess, http_get, pick_free_port

from .conftest import FIRST_TUNING, TUNER, start_pod
from .fault_proxy import FaultProxy
from .real_cluster import KubeNamespace, RealCluster, kube_namespace
from .test_sidecar_watch import WATCH_LATENCY_S, wait_status

NAME = "tuner-tuning"


@contextmanager
def namespace(kube: RealCluster, tmp_path: Path, *, through_proxy: bool = False
              ) -> Iterator[tuple[KubeNamespace, Any, FaultProxy]]:
    """A namespace with the tuning ConfigMap; the accounts' kubeconfigs go through a fault
    proxy when `through_proxy`."""
    api = urlsplit(kube.server)
    proxy = FaultProxy(api.hostname or "127.0.0.1", api.port or 443)
    try:
        with kube_namespace(kube, tmp_path, server=proxy.url if through_proxy else None) as ns:
            admin, _, _ = connect(kubeconfig=str(kube.kubeconfig), context=None)
            admin.create_namespaced_config_map(ns.name, {
                "metadata": {"name": NAME}, "data": dict(FIRST_TUNING)})
            yield ns, admin, proxy
    finally:
        proxy.close()


def _args(ns: KubeNamespace, kubeconfig: Path, watch_timeout: str = "5s") -> list[str]:
    return ["--configmap", f"{ns.name}/{NAME}", "--kubeconfig", str(kubeconfig),
            "--watch-timeout", watch_timeout]


def test_a_change_reaches_nginx_in_under_a_second_as_the_sidecars_account(
        kube: RealCluster, tmp_path: Path) -> None:
    with namespace(kube, tmp_path) as (ns, admin, _), \
            start_pod(tmp_path, _args(ns, ns.sidecar_kubeconfig)) as pod:
        status = pod.wait_generation("1")
        assert status["error"] is None
        admin.patch_namespaced_config_map(NAME, ns.name, {"data": {"keep-alive": "1500ms",
                                                                   "generation": "2"}})
        changed_at = time.monotonic()
        status = wait_status(f"{pod.sidecar_url}/status", lambda s: s["generation"] == "2",
                             timeout_s=WATCH_LATENCY_S, what="generation 2")
        latency_s = time.monotonic() - changed_at
        assert latency_s < WATCH_LATENCY_S and status["error"] is None
        assert "keepalive_timeout 1500ms;" in (pod.render_dir / "client-keepalive.conf"
                                               ).read_text()
        # the real server's validation is not the sidecar's: a typo is stored, never applied
        admin.patch_namespaced_config_map(NAME, ns.name, {"data": {
            "upstream-keepalive-timeout": "forever", "generation": "3"}})
        status = wait_status(f"{pod.sidecar_url}/status", lambda s: bool(s["error"]),
                             timeout_s=WATCH_LATENCY_S, what="the invalid tuning's error")
        assert status["generation"] == "2"
        assert "upstream-keepalive-timeout: 'forever' is not a duration" in status["error"]


@contextmanager
def bare_sidecar(tmp_path: Path, args: list[str]) -> Iterator[str]:
    """A watching sidecar with no nginx beside it (its reloads fail; the tuning still counts
    as applied); yields its /status URL."""
    (tmp_path / "render").mkdir()
    port = pick_free_port()
    sidecar = ManagedProcess(
        [*TUNER, "sidecar", *args, "--render-dir", str(tmp_path / "render"),
         "--nginx-pid", str(tmp_path / "nginx.pid"), "--error-log", str(tmp_path / "error.log"),
         "--listen", f"127.0.0.1:{port}", "--poll", "100ms", "--allow-unauthenticated"],
        name="sidecar", log_dir=tmp_path)
    sidecar.start()
    try:
        sidecar.wait_ready(lambda: http_get(port, "/status") is not None, timeout_s=20,
                           what="serve /status")
        yield f"http://127.0.0.1:{port}/status"
    finally:
        sidecar.stop()


def test_the_jobs_account_may_get_but_not_watch_until_a_role_grants_it(
        kube: RealCluster, tmp_path: Path) -> None:
    """Run with the wrong account (the Job's): the real authorizer allows its get and
    refuses its watch; the sidecar says so and keeps the tuning it got. A Role granting
    watch, applied with kubectl, fixes it without a restart."""
    with namespace(kube, tmp_path) as (ns, admin, _), \
            bare_sidecar(tmp_path, _args(ns, ns.tuner_kubeconfig, "2s")) as url:
        status = wait_status(url, lambda s: "may not watch" in str(s["error"]), timeout_s=10,
                             what="the forbidden watch")
        assert status["generation"] == "1"  # the get was allowed
        assert f"may not watch configmaps in namespace '{ns.name}'" in status["error"]
        assert 'cannot watch resource "configmaps"' in status["error"]
        ns.apply([
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": "watch-tuning"},
             "rules": [{"apiGroups": [""], "resources": ["configmaps"],
                        "resourceNames": [NAME], "verbs": ["watch"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": "watch-tuning"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                         "name": "watch-tuning"},
             "subjects": [{"kind": "ServiceAccount", "name": "tuner"}]}])
        admin.patch_namespaced_config_map(NAME, ns.name, {"data": {"generation": "2"}})
        # the back-off is at most a few seconds by now: the next retry gets through
        status = wait_status(url, lambda s: s["generation"] == "2", timeout_s=15,
                             what="generation 2 once watch was granted")
        assert "may not" not in str(status["error"])


def test_a_watch_cut_mid_stream_is_resumed_and_still_sees_changes(
        kube: RealCluster, tmp_path: Path) -> None:
    with namespace(kube, tmp_path, through_proxy=True) as (ns, admin, proxy), \
            bare_sidecar(tmp_path, _args(ns, ns.sidecar_kubeconfig, "30s")) as url:
        wait_status(url, lambda s: s["generation"] == "1", timeout_s=10, what="generation 1")
        time.sleep(0.5)  # its watch is open now, with 30 s to run
        assert proxy.cut() >= 1
        admin.patch_namespaced_config_map(NAME, ns.name, {"data": {"generation": "2"}})
        status = wait_status(url, lambda s: s["generation"] == "2", timeout_s=5,
                             what="generation 2 after the cut")
        assert status["generation"] == "2"


def test_a_stalled_api_server_is_timed_out_and_the_tuning_kept(
        kube: RealCluster, tmp_path: Path) -> None:
    """Packets dropped, both ways, on the open watch and on new connections: the client's
    read timeout (the watch's own 1 s plus 10 s) must end the wait, not hang the sidecar."""
    with namespace(kube, tmp_path, through_proxy=True) as (ns, admin, proxy), \
            bare_sidecar(tmp_path, _args(ns, ns.sidecar_kubeconfig, "1s")) as url:
        wait_status(url, lambda s: s["generation"] == "1", timeout_s=10, what="generation 1")
        proxy.stall()
        stalled_at = time.monotonic()
        status = wait_status(url, lambda s: "cannot reach" in str(s["error"]), timeout_s=25,
                             what="the stalled API server")
        # the open 1 s watch ends on the read timeout, 1 s + READ_MARGIN_S (10 s)
        assert time.monotonic() - stalled_at > 5
        assert status["generation"] == "1"
        assert "cannot reach the Kubernetes API server" in status["error"]
        proxy.restore()
        proxy.cut()  # what stalled is dead by now on a real network
        admin.patch_namespaced_config_map(NAME, ns.name, {"data": {"generation": "2"}})
        wait_status(url, lambda s: s["generation"] == "2", timeout_s=40,
                    what="generation 2 after the stall")
