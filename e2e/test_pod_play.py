"""Tier 3: the demo Deployment's pod from manifests/overlays/demo, run by podman (`podman
kube play`) from the locally built images under its own securityContext (non-root, read-only
root filesystem, all capabilities dropped, seccomp RuntimeDefault): Node, nginx and the
sidecar start, the sidecar applies a tuning it watches through the real API server (as the
sidecar's ServiceAccount), and nginx serves.

What podman does not do as a kubelet would, and what stands in: no ServiceAccount token is
projected, so the sidecar's volume `sidecar-api-token` holds the same files (a TokenRequest
token, as a kubelet gets it, the CA, the namespace) from the host; the pod uses the host's
network (loopback only is used), since the API server listens on 127.0.0.1; the images
`node:20-slim` and `nginxinc/nginx-unprivileged:1.27` are replaced by the local Debian base
(Node 18, nginx 1.22): no registry is reachable here."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.real_cluster import RealCluster, kube_namespace, render

from .conftest import podman

BASE_IMAGE = "localhost/tuner-base:bookworm"


def _pod(deployment: dict[str, Any], *, namespace: str, image: str, api_port: int,
         secrets: Path) -> dict[str, Any]:
    spec = json.loads(json.dumps(deployment["spec"]["template"]["spec"]))
    spec["hostNetwork"] = True
    spec.pop("serviceAccountName", None)
    for container in spec["containers"]:
        container.pop("ports", None)  # podman maps declared ports, which host networking refuses
        if container["name"] == "tuner-sidecar":
            container["image"] = image
            # a kubelet expands $(VAR) in args from the container's env; podman does not
            container["args"] = [a.replace("$(POD_NAMESPACE)", namespace)
                                 for a in container["args"]]
            container["env"] = [
                {"name": "POD_NAMESPACE", "value": namespace},
                {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
                {"name": "KUBERNETES_SERVICE_PORT", "value": str(api_port)}]
        else:
            container["image"] = BASE_IMAGE
    # the sidecar's projected API token (podman projects none): the same files, from the host
    spec["volumes"] = [v if v["name"] != "sidecar-api-token" else
                       {"name": v["name"], "hostPath": {"path": str(secrets),
                                                        "type": "Directory"}}
                       for v in spec["volumes"]]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "demo-app", "labels": {"app.kubernetes.io/name": "demo-app"}},
            "spec": spec}


def _wait(url: str, is_reached: Any, *, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(url, timeout=2)
            last = answer.json()
            if is_reached(last):
                return last
        except (httpx.HTTPError, ValueError) as exc:
            last = exc
        time.sleep(0.2)
    pytest.fail(f"no {what} within {timeout_s:g}s; last: {last}")


def test_the_demo_pod_runs_locked_down_and_applies_a_tuning(
        kube: RealCluster, tuner_image: str, tmp_path: Path) -> None:
    objects = render()
    (deployment,) = [d for d in objects if d["kind"] == "Deployment"]
    configmaps = [d for d in objects if d["kind"] == "ConfigMap"
                  and d["metadata"]["name"] in ("demo-app", "demo-nginx", "tuner-tuning")]
    with kube_namespace(kube, tmp_path) as ns:
        ns.apply([json.loads(json.dumps(c)) for c in configmaps
                  if c["metadata"]["name"] == "tuner-tuning"])
        (binding,) = [d for d in objects if d["kind"] == "ClusterRoleBinding"]
        binding["metadata"]["name"] = f"tuner-sidecar-tokenreview-{ns.name}"
        binding["subjects"][0]["namespace"] = ns.name
        kube.kubectl("apply", "-f", "-", stdin=json.dumps(binding))
        secrets = tmp_path / "serviceaccount"
        secrets.mkdir()
        token = kube.kubectl("-n", ns.name, "create", "token", "tuner-sidecar",
                             "--duration", "1h").stdout.strip()
        (secrets / "token").write_text(token)
        (secrets / "ca.crt").write_bytes(kube.ca_file.read_bytes())
        (secrets / "namespace").write_text(ns.name)
        for path in (secrets, *secrets.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        api_port = int(kube.server.rsplit(":", 1)[1])
        pod = _pod(deployment, namespace=ns.name, image=tuner_image, api_port=api_port,
                   secrets=secrets)
        (tmp_path / "pod.yaml").write_text(yaml.safe_dump(pod))
        flags = []
        for configmap in configmaps:  # podman reads one ConfigMap per file
            path = tmp_path / f"{configmap['metadata']['name']}.yaml"
            path.write_text(yaml.safe_dump(configmap))
            flags += ["--configmap", str(path)]
        podman("pod", "rm", "-f", "demo-app", check=False)
        started = time.monotonic()
        podman("kube", "play", "--network", "host", *flags, str(tmp_path / "pod.yaml"))
        try:
            status = _wait("http://127.0.0.1:9901/status",
                           lambda s: s.get("generation") == "0" and s.get("reloads", 0) >= 1,
                           timeout_s=60, what="the baseline applied by the sidecar")
            print(f"\npod up, baseline applied by the sidecar in "
                  f"{time.monotonic() - started:.1f} s")
            assert status["error"] is None, status
            # every container as its securityContext says
            for name in ("app", "nginx", "tuner-sidecar"):
                info = json.loads(podman("inspect", f"demo-app-{name}").stdout)[0]
                assert info["Config"]["User"] in ("10001", "10001:10001"), info["Config"]["User"]
                assert info["HostConfig"]["ReadonlyRootfs"] is True
                assert info["EffectiveCaps"] in (None, []), info["EffectiveCaps"]
                assert "no-new-privileges" in " ".join(info["HostConfig"]["SecurityOpt"] or [])
                assert podman("exec", f"demo-app-{name}", "id", "-u").stdout.strip() == "10001"
            answer = httpx.post("http://127.0.0.1:8080/", content=b"x", timeout=5)
            assert answer.status_code == 200 and answer.text == "ok"

            admin = kube.kubectl  # a tuning, as the Job would write it
            admin("-n", ns.name, "patch", "configmap", "tuner-tuning", "--type", "merge", "-p",
                  json.dumps({"data": {"upstream-keepalive-timeout": "1s",
                                       "generation": "1"}}))
            status = _wait("http://127.0.0.1:9901/status",
                           lambda s: s.get("generation") == "1", timeout_s=10,
                           what="the tuning applied")
            assert status["error"] is None, status
            conf = podman("exec", "demo-app-nginx", "cat",
                          "/etc/nginx/tuner/upstream-keepalive.conf").stdout
            assert "keepalive_timeout 1s;" in conf
            answer = httpx.post("http://127.0.0.1:8080/", content=b"x", timeout=5)
            assert answer.status_code == 200 and answer.text == "ok"
            # /probe answers only the Job's account: its audience-bound token, checked by
            # the sidecar with a real TokenReview (the overlay's ClusterRoleBinding)
            assert httpx.get("http://127.0.0.1:9901/probe", timeout=30).status_code == 401
            job_token = kube.kubectl("-n", ns.name, "create", "token", "tuner", "--audience",
                                     "tuner-sidecar", "--duration", "1h").stdout.strip()
            probe = httpx.get("http://127.0.0.1:9901/probe", timeout=30,
                              headers={"Authorization": f"Bearer {job_token}"}).json()
            # measured: the image's Node (Debian's 18.20) closes at its 5000 ms itself; Node 20
            # adds its 1 s buffer (6.0 s). The sidecar measures; it does not assume either.
            assert 4.8 < probe["idle_close_s"] < 6.5, probe
        finally:
            logs = {name: podman("logs", "--tail", "5", f"demo-app-{name}", check=False).stderr
                    for name in ("app", "nginx", "tuner-sidecar")}
            podman("pod", "rm", "-f", "-t", "5", "demo-app", check=False)
            kube.kubectl("delete", "clusterrolebinding", binding["metadata"]["name"],
                         check=False)
            print(logs)
