"""`tuner scan` against the real control plane (Kubernetes v1.34.4, tests/real_cluster.py),
run as the CronJob's ServiceAccount with manifests/scan's Role enforced by the real RBAC
authorizer.

Real: the API server, RBAC, the Deployment and ReplicaSet controllers (they make the pods and
their ownerReferences), our CRDs for Gateway API and Envoy Gateway (tests/data/crds), the
apps (Node with real keep-alive timeouts, a silent server, an HTTP/2-only server) and the
probes. Stand-ins, because tiers 1-2 have no node: the apps run as local processes in a
network namespace of the test's own (tests/netns.py: the API server rightly refuses
loopback addresses in EndpointSlices), the pods' status (Running, Ready, that namespace's
address as pod IP) is written by the test's NodeAgent, and the EndpointSlices are written by
the test from the real pods (the EndpointSlice controller skips pods no node runs). No data
plane runs: the scan only reads its configuration.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tuner.analysis.closes import SWEEP_WAIT_S
from tuner.kube.client import connect
from tuner.lab.process import ManagedProcess, is_listening, pick_free_port

from .netns import PodNetwork, can_create, pod_network
from .real_cluster import MANIFESTS, KubeNamespace, NodeAgent, RealCluster, kube_namespace

TUNER = [sys.executable, "-m", "tuner.cli"]
CRDS = Path(__file__).parent / "data" / "crds" / "scan-crds.yaml"
SERVERS = Path(__file__).parent / "scan_servers.py"
NODE_APP = Path(__file__).parents[1] / "tuner" / "lab" / "apps" / "node_server.js"
LABEL = "tuner-scan-test"
#: the data planes' idle timeout in these tests: apps closing at 2.5 s are exposed, at 4 s safe
PROXY_IDLE_S = 2


@pytest.fixture(scope="module")
def crds(kube: RealCluster) -> None:
    kube.kubectl("apply", "-f", str(CRDS))
    kube.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(CRDS))
    # cluster-scoped classes, as the data planes' installs create them
    kube.kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List",
                                                        "items": [
        {"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
         "metadata": {"name": "nginx"}, "spec": {"controller": "k8s.io/ingress-nginx"}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
         "metadata": {"name": "eg"},
         "spec": {"controllerName": "gateway.envoyproxy.io/gatewayclass-controller"}}]}))


@pytest.fixture
def ns(kube: RealCluster, crds: None, tmp_path: Path) -> Iterator[KubeNamespace]:
    with kube_namespace(kube, tmp_path, prefix="scan") as namespace:
        yield namespace


@pytest.fixture
def net() -> Iterator[PodNetwork]:
    if not can_create():
        pytest.skip("needs root to create a network namespace for the pods' addresses")
    with pod_network() as network:
        yield network


def start_in(net: PodNetwork, stack: ExitStack, tmp_path: Path, name: str, argv: list[str],
             port: int) -> None:
    """A real server process in the pods' network namespace, ready, stopped by `stack`."""
    process = ManagedProcess(net.exec_argv(argv), name=name, log_dir=tmp_path)
    process.start()
    stack.callback(process.stop)
    process.wait_ready(lambda: is_listening(port, host=net.pod_ip), timeout_s=15,
                       what=f"listen on {net.pod_ip}:{port}")


def scan_account(ns: KubeNamespace, tmp_path: Path, *, drop: str | None = None) -> Path:
    """Apply manifests/scan/base's ServiceAccount and Role (without the rule for `drop`, to
    test a missing grant) into the namespace; a kubeconfig with the account's token."""
    rendered = ns.cluster.kubectl("kustomize", str(MANIFESTS / "scan" / "base")).stdout
    import yaml

    objects = [doc for doc in yaml.safe_load_all(rendered)
               if doc and doc["kind"] in ("ServiceAccount", "Role", "RoleBinding")]
    for doc in objects:
        if doc["kind"] == "Role" and drop is not None:
            doc["rules"] = [r for r in doc["rules"] if drop not in r["resources"]]
    ns.apply(objects)
    return ns.cluster.token_kubeconfig(tmp_path / "scan.kubeconfig", namespace=ns.name,
                                       account="tuner-scan")


def deployment(name: str, port: int, replicas: int = 1) -> dict[str, Any]:
    labels = {LABEL: "app", "app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": {"containers": [
                         {"name": "app", "image": "node:20-slim",
                          "ports": [{"name": "http", "containerPort": port}]}]}}}}


def service(name: str, port: int, app_protocol: str | None = None) -> dict[str, Any]:
    svc_port: dict[str, Any] = {"name": "http", "port": 80, "targetPort": port}
    if app_protocol:
        svc_port["appProtocol"] = app_protocol
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": name}, "ports": [svc_port]}}


def ingress(name: str, backends: dict[str, str]) -> dict[str, Any]:
    """Ingress of class nginx: path -> Service (port http)."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": name},
            "spec": {"ingressClassName": "nginx", "rules": [{"host": f"{name}.example",
                     "http": {"paths": [
                         {"path": path, "pathType": "Prefix",
                          "backend": {"service": {"name": svc, "port": {"name": "http"}}}}
                         for path, svc in backends.items()]}}]}}


def ingress_nginx_configmap(ns: KubeNamespace, timeout_s: int) -> None:
    """The controller's ConfigMap (here in the test namespace, named with
    --ingress-nginx-configmap) and a Role letting the scan read just that one, as a user
    would grant in the controller's namespace."""
    ns.apply([
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "ingress-nginx-controller"},
         "data": {"upstream-keepalive-timeout": str(timeout_s)}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "read-ingress-nginx-configmap"},
         "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"],
                    "resourceNames": ["ingress-nginx-controller"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "read-ingress-nginx-configmap"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                     "name": "read-ingress-nginx-configmap"},
         "subjects": [{"kind": "ServiceAccount", "name": "tuner-scan",
                       "namespace": ns.name}]}])


def ready_pods(core: Any, ns: KubeNamespace, app: str, n: int, timeout_s: float = 60
               ) -> list[Any]:
    """Poll until `n` pods of `app` are Ready (written by the NodeAgent)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pods = core.list_namespaced_pod(ns.name, label_selector=f"app={app}").items
        ready = [p for p in pods if p.status.pod_ip and not p.metadata.deletion_timestamp]
        if len(ready) >= n:
            return ready
        time.sleep(0.2)
    pytest.fail(f"{n} pods of {app} never became ready")


def endpoint_slice(ns: KubeNamespace, svc: str, pods: list[Any], port: int) -> dict[str, Any]:
    """What the EndpointSlice controller would write for these pods, had a node run them."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{svc}-test", "labels": {
                "kubernetes.io/service-name": svc,
                "endpointslice.kubernetes.io/managed-by": "tuner-tests"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [p.status.pod_ip], "conditions": {"ready": True},
                           "targetRef": {"kind": "Pod", "name": p.metadata.name,
                                         "namespace": ns.name, "uid": p.metadata.uid}}
                          for p in pods]}


class Pushgateway:
    """A real HTTP server on 127.0.0.1 that records what is PUT to it, as a Pushgateway
    would take it (200)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str, str, str]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                received.append(("PUT", self.path, self.headers["Content-Type"], body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@contextmanager
def pushgateway() -> Iterator[Pushgateway]:
    gateway = Pushgateway()
    thread = threading.Thread(target=gateway.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield gateway
    finally:
        gateway.server.shutdown()
        gateway.server.server_close()
        thread.join(timeout=10)


def run_scan(kubeconfig: Path, *args: str, timeout_s: float = 120
             ) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run([*TUNER, "scan", "--kubeconfig", str(kubeconfig), *args],
                          capture_output=True, text=True, timeout=timeout_s, check=False)
    return done, time.monotonic() - started


def by_service(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["service"].split("/")[1]: f for f in document["findings"]}


def test_two_apps_one_exposed_one_safe_found_and_judged(kube: RealCluster, ns: KubeNamespace,
                                                        net: PodNetwork, tmp_path: Path
                                                        ) -> None:
    """Node closing at 2.5 s behind ingress-nginx at 2 s: exposed. Node closing at 4.0 s
    behind Envoy Gateway at 2 s (a BackendTrafficPolicy): safe. Both in one idle period."""
    kubeconfig = scan_account(ns, tmp_path)
    core = connect(kubeconfig=str(kube.kubeconfig), context=None).core
    with ExitStack() as stack:
        ports = {"exposed": pick_free_port(), "safe": pick_free_port()}
        for name, keep_alive_ms in (("exposed", 1500), ("safe", 3000)):  # Node adds 1 s
            start_in(net, stack, tmp_path, name, ["node", str(NODE_APP), str(ports[name]),
                                                  str(keep_alive_ms), net.pod_ip], ports[name])
        ns.apply([deployment("exposed", ports["exposed"], replicas=2),
                  deployment("safe", ports["safe"]),
                  service("exposed", ports["exposed"]), service("safe", ports["safe"]),
                  ingress("exposed", {"/": "exposed"})])
        ingress_nginx_configmap(ns, PROXY_IDLE_S)
        ns.apply([
            {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
             "metadata": {"name": "gw"},
             "spec": {"gatewayClassName": "eg",
                      "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}},
            {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
             "metadata": {"name": "safe"},
             "spec": {"parentRefs": [{"name": "gw"}], "hostnames": ["safe.example"],
                      "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                                 "backendRefs": [{"name": "safe", "port": 80}]}]}},
            {"apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "BackendTrafficPolicy",
             "metadata": {"name": "safe-idle"},
             "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io",
                                      "kind": "HTTPRoute", "name": "safe"}],
                      "timeout": {"http": {"connectionIdleTimeout": f"{PROXY_IDLE_S}s"}}}}])
        with NodeAgent(core, ns.name, f"{LABEL}=app", pod_ip=net.pod_ip):
            for name, n in (("exposed", 2), ("safe", 1)):
                ns.apply([endpoint_slice(ns, name, ready_pods(core, ns, name, n),
                                         ports[name])])
            configmap_ref = f"--ingress-nginx-configmap={ns.name}/ingress-nginx-controller"
            done, elapsed_s = run_scan(kubeconfig, "-n", ns.name, "--json", configmap_ref)
            assert done.returncode == 0, done.stderr
            document = json.loads(done.stdout)
            table, _ = run_scan(kubeconfig, "-n", ns.name, configmap_ref)
            gateway = stack.enter_context(pushgateway())
            metrics, _ = run_scan(kubeconfig, "-n", ns.name, "-o", "prometheus",
                                  configmap_ref, "--fail-on-exposed", "--push",
                                  f"{gateway.url}/metrics/job/tuner-scan")

    print(table.stdout)  # shown with -s: the README's example is this output
    print(f"scan: {elapsed_s:.2f} s wall with the CLI's start, {document['elapsed_s']} s "
          "in the scan")
    found = by_service(document)
    assert set(found) == {"exposed", "safe"}, document
    exposed, safe = found["exposed"], found["safe"]
    assert exposed["verdict"] == "unsafe" and exposed["probe"] == "measured"
    assert exposed["data_plane"] == "ingress-nginx" and exposed["proxy_idle_s"] == PROXY_IDLE_S
    assert exposed["idle_source"] == (f"ConfigMap {ns.name}/ingress-nginx-controller key "
                                      "upstream-keepalive-timeout")
    assert 2.3 <= exposed["upstream_close_s"] <= 3.1, exposed
    assert exposed["pod"].startswith("exposed-") and exposed["owner"].startswith("ReplicaSet/")
    assert exposed["n_same_owner"] == 2  # one pod probed for its ReplicaSet's two
    assert exposed["fix_proxy"] == (f"ConfigMap {ns.name}/ingress-nginx-controller: "
                                    "upstream-keepalive-timeout: \"1\" (global: every Ingress "
                                    "of this controller)")
    assert "at least 3s" in exposed["fix_app"]
    assert safe["verdict"] == "safe" and safe["data_plane"] == "envoy-gateway"
    assert safe["idle_source"].startswith(f"BackendTrafficPolicy {ns.name}/safe-idle")
    assert safe["route"] == f"HTTPRoute {ns.name}/safe (safe.example/)"
    # the scan watches 3 s (the smallest safe close for 2 s) plus time for a sweep that is
    # due (SWEEP_WAIT_S), so it saw Node's close at 4 s: safe, by the measured close
    assert safe["probed_for_s"] == 3 + SWEEP_WAIT_S
    assert 3.8 <= safe["upstream_close_s"] <= 4.6 and not safe["closes_by_sweep"], safe
    assert safe["fix_proxy"] == safe["fix_app"] == ""
    # both were watched at once: one idle period (the later close, 4 s) plus reads and
    # start-up, not the sum
    assert document["limit_s"] == 3 + SWEEP_WAIT_S
    assert document["elapsed_s"] < 4 + 3, document["elapsed_s"]
    assert elapsed_s < 4 + 8, elapsed_s
    # the classes are cluster-scoped: the namespaced Role cannot read them, and says so
    assert document["unreadable"]["ingressclasses"] == "forbidden: list ingressclasses"

    assert table.returncode == 0, table.stderr
    assert "EXPOSED" in table.stdout and "fix, data plane: ConfigMap" in table.stdout
    assert metrics.returncode == 6, metrics.stderr  # --fail-on-exposed
    assert (f'tuner_scan_exposed{{route_kind="Ingress",route_namespace="{ns.name}",'
            f'route="exposed",namespace="{ns.name}",service="exposed",'
            f'pod="{exposed["pod"]}",data_plane="ingress-nginx"}} 1.0') in metrics.stdout
    assert 'tuner_scan_backends{verdict="safe"} 1.0' in metrics.stdout
    # what --push sent is what it printed, as a PUT of text exposition to the job's path
    assert gateway.received == [("PUT", "/metrics/job/tuner-scan",
                                 "text/plain; version=0.0.4", metrics.stdout)]


def test_a_missing_permission_is_named_with_verb_and_resource(kube: RealCluster,
                                                              ns: KubeNamespace,
                                                              tmp_path: Path) -> None:
    kubeconfig = scan_account(ns, tmp_path, drop="endpointslices")
    done, _ = run_scan(kubeconfig, "-n", ns.name)
    assert done.returncode == 9, done.stderr
    assert (f"forbidden: may not list endpointslices (discovery.k8s.io/v1) in namespace "
            f"'{ns.name}'") in done.stderr
    assert "manifests/scan/base/rbac.yaml" in done.stderr and "Traceback" not in done.stderr


def test_silent_refusing_and_http2_only_pods_do_not_stall_the_scan(
        kube: RealCluster, ns: KubeNamespace, net: PodNetwork, tmp_path: Path) -> None:
    """A pod that accepts and never answers costs the answer timeout, not the probe's
    default; one that refuses and one that speaks HTTP/2 only are listed as such."""
    kubeconfig = scan_account(ns, tmp_path)
    core = connect(kubeconfig=str(kube.kubeconfig), context=None).core
    ports = {"silent": pick_free_port(), "refusing": pick_free_port(), "h2": pick_free_port()}
    with ExitStack() as stack:
        for kind in ("silent", "h2"):
            start_in(net, stack, tmp_path, f"scan-{kind}",
                     [sys.executable, str(SERVERS), kind, net.pod_ip, str(ports[kind])],
                     ports[kind])
        ns.apply([*[deployment(name, port) for name, port in ports.items()],
                  *[service(name, port) for name, port in ports.items()],
                  ingress("edge", {f"/{name}": name for name in ports})])
        with NodeAgent(core, ns.name, f"{LABEL}=app", pod_ip=net.pod_ip):
            for name, port in ports.items():
                ns.apply([endpoint_slice(ns, name, ready_pods(core, ns, name, 1), port)])
            done, elapsed_s = run_scan(kubeconfig, "-n", ns.name, "--json",
                                       "--answer-timeout=2s", "--max-idle=30s")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    print(f"scan: {elapsed_s:.2f} s wall with the CLI's start, {document['elapsed_s']} s "
          "in the scan")
    found = by_service(document)
    assert found["silent"]["probe"] == "timeout", found["silent"]
    assert found["silent"]["message"].startswith("no answer within 2 s")
    assert found["refusing"]["probe"] == "refused", found["refusing"]
    assert found["h2"]["probe"] == "http2-only", found["h2"]
    assert {f["verdict"] for f in found.values()} == {"unprobed"}
    # the ConfigMap is not readable (nor there): the default is used and said to be assumed
    assert found["silent"]["idle_source"].startswith("default 60s assumed: forbidden: get "
                                                     "configmaps ingress-nginx/")
    # limit: one answer timeout (2 s) per probe, all at once, plus reads and start-up
    assert document["elapsed_s"] < 2 + 3, document["elapsed_s"]
    assert elapsed_s < 2 + 8, elapsed_s
