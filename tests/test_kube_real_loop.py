"""`tuner experiment --target kubernetes` end to end against the real control plane: the
runner as the CLI with the Job's ServiceAccount token (through a fault proxy that makes an
API outage mid-run), the demo Deployment from manifests/overlays/demo restarted by the real
Deployment controller, and one "pod" of real processes on 127.0.0.1 (Node, nginx, and
`tuner sidecar` watching the tuning ConfigMap with the sidecar's ServiceAccount token).

What is not real here: no kubelet runs the pods. The node agent (tests/real_cluster.py)
writes their status, and restarts the local Node with the tuning ConfigMap's app key when a
new pod appears, as the new pod would read it from its environment. Afterwards the
apiserver's audit log says which verbs each account used: a verb a Role grants that nothing
used fails the test, as does a 403."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tuner.kube.apply import connect
from tuner.lab.process import http_get

from .conftest import Pod, start_pod
from .fault_proxy import FaultProxy
from .real_cluster import KubeNamespace, NodeAgent, RealCluster, kube_namespace, render
from .test_kube_real import RUNNER_MAY, SELECTOR, SIDECAR_MAY, WORKER_MAY

TUNER = [sys.executable, "-m", "tuner.cli"]
BASELINE = {"upstream-keepalive-timeout": "60", "upstream-keepalive-connections": "128",
            "app-keep-alive-timeout-ms": "5000", "generation": "0"}
APP_KEY = "app-keep-alive-timeout-ms"


@contextmanager
def demo(kube: RealCluster, tmp_path: Path
         ) -> Iterator[tuple[KubeNamespace, Pod, FaultProxy, Any]]:
    api = urlsplit(kube.server)
    proxy = FaultProxy(api.hostname or "127.0.0.1", api.port or 443)
    try:
        with kube_namespace(kube, tmp_path, server=proxy.url) as ns:
            admin, _, _ = connect(kubeconfig=str(kube.kubeconfig), context=None)
            (deployment,) = [d for d in render() if d["kind"] == "Deployment"]
            deployment["spec"]["replicas"] = 1
            ns.apply([{"apiVersion": "v1", "kind": "ConfigMap", "data": dict(BASELINE),
                       "metadata": {"name": "tuner-tuning"}},
                      # an earlier run's recommendation, with a key of someone else's
                      {"apiVersion": "v1", "kind": "ConfigMap",
                       "data": {"proxy-idle-timeout-seconds": "55", "someone-elses": "keep"},
                       "metadata": {"name": "tuner-keepalive"}},
                      deployment])
            sidecar_args = ["--configmap", f"{ns.name}/tuner-tuning", "--kubeconfig",
                            str(ns.sidecar_kubeconfig)]
            # the sidecar answers /probe and /status?since only to the Job's account, which
            # the real API server's TokenReview names: bound as the demo overlay binds it
            binding = f"tuner-sidecar-tokenreview-{ns.name}"
            kube.kubectl("create", "clusterrolebinding", binding,
                         "--clusterrole", "tuner-sidecar-tokenreview",
                         "--serviceaccount", f"{ns.name}:tuner-sidecar")
            with start_pod(tmp_path, sidecar_args, first_tuning=BASELINE,
                           app_idle_s=int(BASELINE[APP_KEY]) / 1000,
                           caller_args=("--caller-service-account", f"{ns.name}/tuner")
                           ) as pod:
                def start_app(_pod: Any) -> None:
                    data = admin.read_namespaced_config_map("tuner-tuning", ns.name).data
                    wanted_s = int(data[APP_KEY]) / 1000
                    if pod.app.idle_s != wanted_s:
                        pod.app.set_idle(wanted_s)
                try:
                    with NodeAgent(admin, ns.name, SELECTOR, on_start=start_app):
                        yield ns, pod, proxy, admin
                finally:
                    kube.kubectl("delete", "clusterrolebinding", binding, check=False)
    finally:
        proxy.close()


def _spec(tmp_path: Path, ns: KubeNamespace, pod: Pod) -> Path:
    # the Job's token for the sidecars, with their audience, as the Job's projected volume
    # holds it (manifests/base/job.yaml)
    token = tmp_path / "sidecar-token"
    token.write_text(ns.cluster.kubectl("-n", ns.name, "create", "token", "tuner",
                                        "--audience", "tuner-sidecar").stdout.strip())
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps({
        "proxy": "nginx", "upstream": "node", "proxy_idle": ["1s", "3s"],
        "upstream_idle": ["1s"], "max_seconds": 30, "unsafe_after": 3, "safe_after": 160,
        "seed": 3,
        # as the demo's spec: the app's recommended setting is written back where it reads it
        "write_back": {"app": {"namespace": ns.name, "name": "tuner-tuning", "key": APP_KEY,
                               "unit": "ms"}},
        "kubernetes": {"namespace": ns.name, "service_url": f"{pod.nginx_url}/",
                       "deployment": "demo-app", "sidecar_port": pod.sidecar_port,
                       "rollout_timeout": "60s", "sidecar_timeout": "10s",
                       "api_retry_limit": "20s", "sidecar_token_file": str(token)}}))
    return path


def wait_until(is_true: Any, *, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not is_true():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _ledger(admin: Any, namespace: str) -> dict[str, str]:
    from kubernetes.client.exceptions import ApiException

    try:
        return dict(admin.read_namespaced_config_map("tuner-ledger", namespace).data or {})
    except ApiException as exc:
        if exc.status == 404:
            return {}
        raise


def _used(kube: RealCluster, user: str) -> tuple[set[tuple[str, str, str]], list[int]]:
    """(verb, resource, name) of every request `user` made (no name for create and list),
    and the status codes the server answered."""
    used, codes = set(), []
    for event in kube.audit(user):
        ref = event.get("objectRef", {})
        resource = ref.get("resource", "") + (f".{ref['apiGroup']}" if ref.get("apiGroup")
                                              else "")
        name = "" if event["verb"] in ("create", "list") else ref.get("name", "")
        used.add((event["verb"], resource, name))
        codes.append(event.get("responseStatus", {}).get("code", 0))
    return used, codes


@pytest.mark.race
@pytest.mark.slow
def test_the_cluster_loop_on_a_real_api_server_through_an_outage(
        kube: RealCluster, tmp_path: Path) -> None:
    with demo(kube, tmp_path) as (ns, pod, proxy, admin):
        # the Job's own token, but for the API's audience, not the sidecars': refused by the
        # real TokenReview, and the answer names the audience
        api_token = ns.cluster.kubectl("-n", ns.name, "create", "token", "tuner"
                                       ).stdout.strip()
        refused = httpx.get(f"{pod.sidecar_url}/probe",
                            headers={"Authorization": f"Bearer {api_token}"}, timeout=30)
        assert refused.status_code == 401 and "tuner-sidecar" in refused.text, refused.text

        def outage() -> None:  # 3 s of resets, and until the runner has met 3 of them
            deadline = time.monotonic() + 120
            while "trial-000" not in _ledger(admin, ns.name):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)
            proxy.reset()
            ends = time.monotonic() + 3
            while (time.monotonic() < ends or proxy.reset_connections < 3) \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            proxy.restore()
        thread = threading.Thread(target=outage, daemon=True)
        thread.start()
        started = time.monotonic()
        done = subprocess.run(
            [*TUNER, "experiment", str(_spec(tmp_path, ns, pod)), "--target", "kubernetes",
             "--kubeconfig", str(ns.tuner_kubeconfig), "--db", str(tmp_path / "results.db"),
             "--json"], capture_output=True, text=True, timeout=300)
        wall_s = time.monotonic() - started
        thread.join(timeout=5)
        assert done.returncode == 0, done.stderr
        assert proxy.reset_connections >= 3
        assert "the API server does not answer" in done.stderr  # the outage was met
        document = json.loads(done.stdout)
        by_proxy = {t["proxy_idle_s"]: t for t in document["trials"] if not t["control"]}
        safe, unsafe = by_proxy[1.0], by_proxy[3.0]
        # the positive control ran first, with the proxy set well above the measured close
        [control] = [t for t in document["trials"] if t["control"]]
        assert control["n_race"] >= 1 and control["proxy_idle_s"] >= 3.0, control
        # the app's setting reached Node through a real rollout: it closes 1 s after 1000 ms
        assert 1.9 < safe["upstream_close_s"] < 2.3 and safe["upstream_advertised_s"] == 1.0
        assert safe["verdict"] == "safe" and safe["n_failed"] == 0
        # unsafe by the mechanism (nginx keeps connections past the close) whatever the
        # count (measured here once: unsafe with 2 x 502); each 502 is one race line
        assert unsafe["verdict"] == "unsafe", unsafe
        assert unsafe["n_proxy_log_races"] == unsafe["n_502"]
        # the baseline is back, but for the app's key, where the recommendation was written
        # back: in the ConfigMap, in the app (restarted onto it), in nginx via the sidecar
        tuning = admin.read_namespaced_config_map("tuner-tuning", ns.name).data
        written_ms = int(tuning.pop(APP_KEY))
        assert tuning == {k: v for k, v in BASELINE.items() if k != APP_KEY}
        assert [w["name"] for w in document["written"]] == ["tuner-keepalive", "tuner-tuning"]
        assert wait_until(lambda: pod.app.idle_s == written_ms / 1000, timeout_s=60)
        answer = http_get(pod.sidecar_port, "/status")
        assert answer is not None and json.loads(answer[1])["generation"] == "0"
        ledger = _ledger(admin, ns.name)
        assert ledger["state"] == "finished"
        recommendation = admin.read_namespaced_config_map("tuner-keepalive", ns.name).data
        assert 0.9 <= float(recommendation["proxy-idle-timeout-seconds"]) <= 1.0
        assert recommendation["someone-elses"] == "keep"  # merged, not overwritten
        print(f"\nreal API server: {len(document['trials'])} trials in {wall_s:.1f} s, "
              f"verdicts {[t['verdict'] for t in document['trials']]}, "
              f"{proxy.reset_connections} connections reset in the outage")

        # RBAC, as the audit log saw it: everything allowed, and every grant used but the
        # worker Job's (this run has no worker pods: tests/test_worker_pods.py uses those)
        used, codes = _used(kube, ns.user("tuner"))
        assert 403 not in codes, sorted(used)
        may = RUNNER_MAY - WORKER_MAY
        assert used == may, (f"used, not granted: {sorted(used - may)}; "
                             f"granted, never used: {sorted(may - used)}")
        sidecar_used, sidecar_codes = _used(kube, ns.user("tuner-sidecar"))
        assert 403 not in sidecar_codes
        # its watch, and the TokenReviews that let only the Job's token read its counters
        assert sidecar_used == SIDECAR_MAY | {("create", "tokenreviews.authentication.k8s.io",
                                               "")}
