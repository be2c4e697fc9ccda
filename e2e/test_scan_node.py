"""`tuner scan` on a real node (tier 4, scripts/node.py): the demo (nginx + Node + sidecar,
two pods) and a second app (Node, keepAliveTimeout 1000 ms) run as
containers under the kubelet, the EndpointSlice controller lists their pod IPs on the CNI
bridge, and the scan, as the CronJob's ServiceAccount with manifests/scan/base's Role,
finds both through their Ingresses and probes the pod IPs in one idle period.

The ingress-nginx data plane itself does not run (the scan reads its ConfigMap, it never
asks the controller); its ConfigMap says 2 s, so the second app is exposed and the demo,
whose pods answer through nginx keeping idle client connections 600 s, is safe.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tuner.analysis.closes import SWEEP_WAIT_S

from .test_node import ROOT, Node, node  # noqa: F401  (the node fixture)

NS = "tuner-demo"
SHORT_APP = ("const s = require('http').createServer((q, r) => r.end('ok'));"
             "s.keepAliveTimeout = 1000; s.listen(3000);")


def ingress(name: str, service: str) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"ingressClassName": "nginx", "rules": [{"host": f"{name}.example", "http": {
                "paths": [{"path": "/", "pathType": "Prefix", "backend": {
                    "service": {"name": service, "port": {"name": "http"}}}}]}}]}}


def short_app() -> list[dict[str, Any]]:
    labels = {"app.kubernetes.io/name": "short"}
    restricted = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                  "capabilities": {"drop": ["ALL"]}}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "short", "namespace": NS},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
             "metadata": {"labels": labels},
             "spec": {"securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
                      "containers": [{"name": "app", "image": "node:20-slim",
                                      "command": ["node", "-e", SHORT_APP],
                                      "ports": [{"name": "http", "containerPort": 3000}],
                                      "readinessProbe": {"tcpSocket": {"port": 3000}},
                                      "securityContext": restricted}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "short", "namespace": NS},
         "spec": {"selector": labels, "ports": [{"name": "http", "port": 80,
                                                  "targetPort": 3000}]}}]


def ingress_nginx(idle_s: int) -> list[dict[str, Any]]:
    """The controller's class and ConfigMap as its Helm chart names them, and a Role letting
    the scan's account read that one ConfigMap."""
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ingress-nginx"}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
         "metadata": {"name": "nginx"}, "spec": {"controller": "k8s.io/ingress-nginx"}},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "ingress-nginx-controller", "namespace": "ingress-nginx"},
         "data": {"upstream-keepalive-timeout": str(idle_s)}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "tuner-scan-reads-config", "namespace": "ingress-nginx"},
         "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"],
                    "resourceNames": ["ingress-nginx-controller"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "tuner-scan-reads-config", "namespace": "ingress-nginx"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                     "name": "tuner-scan-reads-config"},
         "subjects": [{"kind": "ServiceAccount", "name": "tuner-scan", "namespace": NS}]}]


def scan_kubeconfig(node: Node, path: Path) -> Path:  # noqa: F811
    """The admin kubeconfig with the scan account's bound token instead of the admin's."""
    token = node.kubectl("-n", NS, "create", "token", "tuner-scan", "--duration", "1h"
                         ).stdout.strip()
    config = yaml.safe_load(node.kubeconfig.read_text())
    for user in config["users"]:
        user["user"] = {"token": token}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.timeout(900)
def test_scan_finds_and_judges_the_demo_and_a_second_app_on_a_real_node(
        node: Node, tmp_path: Path) -> None:  # noqa: F811 (the fixture)
    demo = [d for d in yaml.safe_load_all(node.kubectl(
        "kustomize", str(ROOT / "manifests" / "overlays" / "demo")).stdout)
        if d and d["kind"] not in ("Job", "PersistentVolumeClaim")]
    scan_rbac = [{**d, "metadata": {**d["metadata"], "namespace": NS}}
                 for d in yaml.safe_load_all(node.kubectl(
                     "kustomize", str(ROOT / "manifests" / "scan" / "base")).stdout)
                 if d and d["kind"] != "CronJob"]
    node.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(demo))
    node.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(
        [*scan_rbac, *short_app(), *ingress_nginx(2), ingress("demo", "demo-app"),
         ingress("short", "short")]))
    for deployment in ("demo-app", "short"):
        done = node.kubectl("-n", NS, "rollout", "status", f"deployment/{deployment}",
                            "--timeout=240s", check=False)
        if done.returncode != 0:
            pods = node.kubectl("-n", NS, "get", "pods", "-o", "wide", check=False).stdout
            events = node.kubectl("-n", NS, "get", "events", "--sort-by=.lastTimestamp",
                                  check=False).stdout
            pytest.fail(f"deployment {deployment} not rolled out: {done.stderr}\n{pods}\n"
                        f"{events[-4000:]}")
    kubeconfig = scan_kubeconfig(node, tmp_path / "scan.kubeconfig")
    tuner = str(ROOT / ".venv" / "bin" / "tuner")

    started = time.monotonic()
    done = node.run(tuner, "scan", "--kubeconfig", str(kubeconfig), "-n", NS, "--json",
                    check=False, timeout_s=120)
    wall_s = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    table = node.run(tuner, "scan", "--kubeconfig", str(kubeconfig), "-n", NS, check=False,
                     timeout_s=120)
    print(f"\n{table.stdout}\nscan: {wall_s:.1f} s wall with the CLI's start, "
          f"{document['elapsed_s']} s in the scan")

    found = {f["service"]: f for f in document["findings"]}
    assert set(found) == {f"{NS}/demo-app", f"{NS}/short"}, document
    demo_app, short = found[f"{NS}/demo-app"], found[f"{NS}/short"]
    for finding in (demo_app, short):
        assert finding["data_plane"] == "ingress-nginx" and finding["proxy_idle_s"] == 2
        assert finding["idle_source"] == ("ConfigMap ingress-nginx/ingress-nginx-controller "
                                          "key upstream-keepalive-timeout")
        assert finding["address"].startswith("10.244.0."), finding  # a real pod IP
    # the image's Node is Debian's 18.20: it closes at keepAliveTimeout itself (1.0 s here);
    # Node 20 adds a 1 s buffer (2.0 s). Either is exposed behind 2 s: the probe measures
    assert short["verdict"] == "unsafe" and 0.8 <= short["upstream_close_s"] <= 2.6, short
    # the scan watches 3 s (enough to call a pod still open safe behind 2 s) plus time for a
    # sweep that is due: the demo app kept its connections open all that time
    assert demo_app["verdict"] == "safe" and demo_app["upstream_close_s"] is None, demo_app
    assert demo_app["n_same_owner"] == 2  # the demo's two pods, one ReplicaSet
    assert document["limit_s"] == 3 + SWEEP_WAIT_S
    assert document["elapsed_s"] < 3 + SWEEP_WAIT_S + 5, document["elapsed_s"]
    assert table.returncode == 0 and "EXPOSED" in table.stdout
