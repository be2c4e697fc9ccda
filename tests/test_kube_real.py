"""The Kubernetes side of `tuner` against a real control plane (Kubernetes v1.34.4, built
here: see tests/real_cluster.py), with the Roles of manifests/base applied by kubectl and
enforced by the real RBAC authorizer: the runner authenticates as the Job's ServiceAccount,
the sidecar as its own. Real validation (422), real optimistic concurrency (409), real 403s
and 404s, real watches, and a real Deployment controller rolling out restarts."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tuner.errors import KubeError, KubeWaitTimeout
from tuner.kube.apply import apply_configmaps, connect
from tuner.kube.objects import configmap
from tuner.kube.rollout import RESTARTED_AT, restart_deployment, wait_rollout

from .real_cluster import KubeNamespace, NodeAgent, RealCluster, kube_namespace, render

SELECTOR = "app.kubernetes.io/name=demo-app"


@pytest.fixture
def ns(kube: RealCluster, tmp_path: Path) -> Iterator[KubeNamespace]:
    with kube_namespace(kube, tmp_path) as namespace:
        yield namespace


def _admin(kube: RealCluster) -> client.CoreV1Api:
    api, _, _ = connect(kubeconfig=str(kube.kubeconfig), context=None)
    return api


def _demo(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in render() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def test_the_server_is_the_real_kubernetes_we_built(kube: RealCluster) -> None:
    version = json.loads(kube.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.34.4"
    assert version["clientVersion"]["gitVersion"] == "v1.34.4"
    # the controller-manager runs: it gave the new namespace its default ServiceAccount
    assert kube.kubectl("-n", "default", "get", "serviceaccount", "default", "-o", "name"
                        ).stdout.strip() == "serviceaccount/default"


#: what the Job's runner does, and nothing more: (verb, resource, name); the demo's spec
#: writes the app's recommended setting back into tuner-tuning (its `write_back`)
RUNNER_MAY = {
    # every ConfigMap write, the recommendation's and the write_back's too: read, then a
    # merge patch with the resourceVersion read (tuner/kube/client.py)
    *[(verb, "configmaps", name) for verb in ("get", "patch")
      for name in ("tuner-tuning", "tuner-ledger", "tuner-keepalive")],
    ("create", "configmaps", ""),  # the ledger and the recommendation, the first time
    ("get", "deployments.apps", "demo-app"), ("patch", "deployments.apps", "demo-app"),
    ("list", "pods", ""),
}
#: with kubernetes.workers only (tuner/kube/workers.py): one Job of worker pods per trial
WORKER_MAY = {("create", "jobs.batch", ""), ("get", "jobs.batch", "tuner-workers"),
              ("delete", "jobs.batch", "tuner-workers")}
RUNNER_MAY |= WORKER_MAY
SIDECAR_MAY = {("get", "configmaps", "tuner-tuning"), ("watch", "configmaps", "tuner-tuning")}
#: what every authenticated user may do (system:basic-user): asking who one is, and can-i
SELF_REVIEWS = {"selfsubjectreviews.authentication.k8s.io",
                "selfsubjectaccessreviews.authorization.k8s.io",
                "selfsubjectrulesreviews.authorization.k8s.io"}
_RULE = re.compile(r"^(\S+)\s+\[([^\]]*)\]\s+\[([^\]]*)\]\s+\[([^\]]*)\]\s*$")


def can_i_list(ns: KubeNamespace, kubeconfig: Path) -> set[tuple[str, str, str]]:
    """`kubectl auth can-i --list` in the namespace, with the account's own token, as
    (verb, resource, name) triples (no name: any object)."""
    table = ns.cluster.kubectl("-n", ns.name, "auth", "can-i", "--list",
                               kubeconfig=kubeconfig).stdout
    granted = set()
    for line in table.splitlines()[1:]:
        match = _RULE.match(line)
        if match is None or match.group(1) in SELF_REVIEWS:
            continue  # a non-resource URL (/healthz, /api) or the self reviews
        resource, _urls, names, verbs = match.groups()
        for verb in verbs.split():
            for name in names.split() or [""]:
                granted.add((verb, resource, name))
    return granted


def _can_i(ns: KubeNamespace, kubeconfig: Path, verb: str, target: str) -> bool:
    done = ns.cluster.kubectl("-n", ns.name, "auth", "can-i", verb, target,
                              kubeconfig=kubeconfig, check=False)
    assert done.stdout.strip() in ("yes", "no"), done.stderr
    return done.stdout.strip() == "yes"


def test_kubectl_auth_can_i_as_the_jobs_account(ns: KubeNamespace) -> None:
    """Asked with the Job's own token: yes to exactly the verbs the runner uses on its
    named ConfigMaps and Deployment (tests/test_kube_real_loop.py checks, from the audit
    log, that it uses every one of them), no to deleting them."""
    granted = can_i_list(ns, ns.tuner_kubeconfig)
    assert granted == RUNNER_MAY, (f"missing: {sorted(RUNNER_MAY - granted)}; "
                                   f"not needed: {sorted(granted - RUNNER_MAY)}")
    for target in ("configmaps/tuner-tuning", "configmaps/tuner-ledger",
                   "configmaps/tuner-keepalive", "deployments.apps/demo-app", "pods"):
        assert not _can_i(ns, ns.tuner_kubeconfig, "delete", target), target
    for verb, target in [("get", "secrets"), ("create", "pods"), ("watch", "configmaps"),
                         ("patch", "deployments.apps/other"), ("update", "deployments.apps")]:
        assert not _can_i(ns, ns.tuner_kubeconfig, verb, target), (verb, target)
    assert _can_i(ns, ns.tuner_kubeconfig, "patch", "configmaps/tuner-tuning")
    assert can_i_list(ns, ns.sidecar_kubeconfig) == SIDECAR_MAY


def test_the_whole_demo_overlay_passes_the_real_servers_validation(kube: RealCluster) -> None:
    """`kubectl apply -k manifests/overlays/demo --dry-run=server`: every object through
    the real admission chain and validation of v1.34 (the Job's podFailurePolicy, the
    securityContexts, the PVC), nothing stored."""
    kube.kubectl("create", "namespace", "tuner-demo", check=False)
    done = kube.kubectl("apply", "-k", str(Path(__file__).parents[1] / "manifests" /
                                          "overlays" / "demo"), "--dry-run=server")
    lines = done.stdout.strip().splitlines()
    assert all(line.endswith("(server dry run)") for line in lines), done.stdout
    kinds = {line.split("/")[0] for line in lines}
    assert {"configmap", "deployment.apps", "job.batch", "role.rbac.authorization.k8s.io",
            "service", "serviceaccount", "persistentvolumeclaim"} <= kinds, kinds


def test_apply_merges_into_existing_data_as_the_jobs_account(ns: KubeNamespace) -> None:
    admin = _admin(ns.cluster)
    runner = connect(kubeconfig=str(ns.tuner_kubeconfig), context=None)
    ours = configmap(name="tuner-keepalive", namespace=ns.name,
                     data={"proxy-idle-timeout-seconds": "1"})
    (created,) = apply_configmaps(runner, [ours], dry_run=False)
    assert created.action == "created"
    admin.patch_namespaced_config_map("tuner-keepalive", ns.name,
                                      {"data": {"someone-elses": "keep me"}})
    ours["data"]["proxy-idle-timeout-seconds"] = "2"
    (updated,) = apply_configmaps(runner, [ours], dry_run=False)
    assert updated.action == "updated"
    data = admin.read_namespaced_config_map("tuner-keepalive", ns.name).data
    assert data == {"proxy-idle-timeout-seconds": "2", "someone-elses": "keep me"}
    (again,) = apply_configmaps(runner, [ours], dry_run=False)
    assert again.action == "unchanged"


def test_real_refusals_are_named(ns: KubeNamespace) -> None:
    runner = connect(kubeconfig=str(ns.tuner_kubeconfig), context=None)
    # 403: a ConfigMap the Role does not name (get is refused before anything is written)
    with pytest.raises(KubeError, match=rf"forbidden: may not get configmaps in namespace "
                                        rf"'{ns.name}' \(ConfigMap other\).*cannot get "
                                        r"resource \"configmaps\""):
        apply_configmaps(runner, [configmap(name="other", namespace=ns.name, data={"a": "1"})],
                         dry_run=False)
    # 422: the real server's validation of a key (ours checks names, not keys)
    bad = configmap(name="tuner-keepalive", namespace=ns.name, data={"a": "1"})
    bad["data"] = {"not a key!": "1"}
    with pytest.raises(KubeError, match=rf"rejected ConfigMap {ns.name}/tuner-keepalive: "
                                        r".*data\[not a key!\]: Invalid value"):
        apply_configmaps(runner, [bad], dry_run=False)
    # 404: the namespace, as the admin sees it
    admin = connect(kubeconfig=str(ns.cluster.kubeconfig), context=None)
    with pytest.raises(KubeError, match="namespace 'nowhere' does not exist"):
        apply_configmaps(admin, [configmap(name="x", namespace="nowhere", data={"a": "1"})],
                         dry_run=False)
    # 409: a replace carrying a resourceVersion someone else has moved past
    core = _admin(ns.cluster)
    core.create_namespaced_config_map(ns.name, configmap(name="c", namespace=ns.name,
                                                         data={"a": "1"}))
    stale = core.read_namespaced_config_map("c", ns.name)
    core.patch_namespaced_config_map("c", ns.name, {"data": {"a": "2"}})
    with pytest.raises(client.exceptions.ApiException) as conflict:
        core.replace_namespaced_config_map("c", ns.name, stale)
    assert conflict.value.status == 409


def _deployment(ns: KubeNamespace, replicas: int = 1) -> None:
    deployment = _demo("Deployment", "demo-app")
    deployment["spec"]["replicas"] = replicas
    ns.apply([_demo("ConfigMap", "tuner-tuning"), deployment])


def _apps(kubeconfig: Path) -> tuple[client.AppsV1Api, str]:
    core, host, _ = connect(kubeconfig=str(kubeconfig), context=None)
    return client.AppsV1Api(core.api_client), host


def test_rollout_restart_and_status_through_the_real_deployment_controller(
        ns: KubeNamespace) -> None:
    """The demo Deployment from the overlay; the controller-manager's Deployment and
    ReplicaSet controllers replace its pods on a restart; the node agent marks each new pod
    ready, as a kubelet would. The runner's account restarts it and waits."""
    _deployment(ns, replicas=2)
    core = _admin(ns.cluster)
    with NodeAgent(core, ns.name, SELECTOR) as node:
        apps, host = _apps(ns.tuner_kubeconfig)
        first = wait_rollout(apps, ns.name, "demo-app", timeout_s=60, host=host, context=None,
                             poll_s=0.2)
        assert first.is_complete and len(node.started) == 2
        restart_deployment(apps, ns.name, "demo-app", host=host, context=None)
        template = apps.read_namespaced_deployment("demo-app", ns.name).spec.template
        assert RESTARTED_AT in template.metadata.annotations
        done = wait_rollout(apps, ns.name, "demo-app", timeout_s=60, host=host, context=None,
                            poll_s=0.2)
        assert done.is_complete and done.generation == first.generation + 1
        assert len(node.started) == 4  # two new pods, made by the ReplicaSet controller
        names = {p.metadata.name for p in core.list_namespaced_pod(
            ns.name, label_selector=SELECTOR).items if not p.metadata.deletion_timestamp}
        assert names == set(node.started[2:])


def test_a_rollout_whose_pods_never_become_ready_times_out_with_the_counts(
        ns: KubeNamespace) -> None:
    _deployment(ns, replicas=1)
    apps, host = _apps(ns.tuner_kubeconfig)
    started = time.monotonic()
    with pytest.raises(KubeWaitTimeout, match=r"did not complete within 2s \(updated 1/1, "
                                              r"available 0/1"):
        wait_rollout(apps, ns.name, "demo-app", timeout_s=2, host=host, context=None,
                     poll_s=0.2)
    assert time.monotonic() - started < 10


def test_missing_and_forbidden_deployments_as_the_jobs_account(ns: KubeNamespace) -> None:
    apps, host = _apps(ns.tuner_kubeconfig)
    # named in the Role but not there: the real 404
    with pytest.raises(KubeError, match=rf"Deployment {ns.name}/demo-app does not exist"):
        restart_deployment(apps, ns.name, "demo-app", host=host, context=None)
    # not named in the Role: RBAC answers 403 before the server looks, there or not
    with pytest.raises(KubeError, match=rf"may not patch deployments in namespace "
                                        rf"'{ns.name}'"):
        restart_deployment(apps, ns.name, "other", host=host, context=None)
