"""manifests/scan: the scan's CronJob and read-only RBAC, rendered by `kubectl kustomize`,
validated against the Kubernetes 1.32 schemas, and held to what the scan really reads."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from tuner.cli import build_parser
from tuner.scan import listing

from .test_manifests import KUBERNETES_VERSION, MANIFESTS, render

SCAN = MANIFESTS / "scan"


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render(SCAN / "base")


@pytest.fixture(scope="module")
def cluster_wide() -> list[dict[str, Any]]:
    return render(SCAN / "overlays" / "cluster-wide")


def granted(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_both_validate_against_the_schemas(base: list[dict[str, Any]],
                                           cluster_wide: list[dict[str, Any]]) -> None:
    for doc in [*base, *cluster_wide]:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert sorted(d["kind"] for d in base) == ["CronJob", "Role", "RoleBinding",
                                               "ServiceAccount"]
    assert {d["kind"] for d in cluster_wide} >= {"ClusterRole", "ClusterRoleBinding",
                                                 "Namespace"}


def test_the_role_is_namespaced_read_only_and_exactly_what_the_scan_lists(
        base: list[dict[str, Any]]) -> None:
    assert not [d for d in base if d["kind"].startswith("Cluster")]
    [role] = [d for d in base if d["kind"] == "Role"]
    rules = granted(role["rules"])
    assert {verb for _, _, verb in rules} == {"list"}
    namespaced = {listing.INGRESSES, listing.HTTPROUTES, listing.GATEWAYS, listing.SERVICES,
                  listing.ENDPOINT_SLICES, listing.PODS, listing.DESTINATION_RULES,
                  listing.BACKEND_TRAFFIC_POLICIES, listing.UPSTREAM_SETTINGS_POLICIES}
    assert {(r.group, r.plural, "list") for r in namespaced} == rules
    assert not any(resource == "secrets" for _, resource, _ in rules)


def test_the_cluster_role_adds_only_the_classes_and_one_configmap(
        base: list[dict[str, Any]], cluster_wide: list[dict[str, Any]]) -> None:
    [role] = [d for d in base if d["kind"] == "Role"]
    [cluster_role] = [d for d in cluster_wide if d["kind"] == "ClusterRole"]
    extra = granted(cluster_role["rules"]) - granted(role["rules"])
    assert extra == {("networking.k8s.io", "ingressclasses", "list"),
                     ("gateway.networking.k8s.io", "gatewayclasses", "list"),
                     ("", "configmaps", "get")}
    [configmaps] = [r for r in cluster_role["rules"] if r["resources"] == ["configmaps"]]
    assert configmaps["resourceNames"] == ["ingress-nginx-controller"]
    [binding] = [d for d in cluster_wide if d["kind"] == "ClusterRoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tuner-scan",
                                    "namespace": "tuner-scan"}]


def test_the_cronjob_is_bounded_locked_down_and_prints_prometheus(
        base: list[dict[str, Any]], cluster_wide: list[dict[str, Any]]) -> None:
    for docs, namespaced in ((base, True), (cluster_wide, False)):
        [cron] = [d for d in docs if d["kind"] == "CronJob"]
        assert cron["spec"]["concurrencyPolicy"] == "Forbid"
        job = cron["spec"]["jobTemplate"]["spec"]
        assert job["activeDeadlineSeconds"] <= 900 and job["backoffLimit"] <= 2
        pod = job["template"]["spec"]
        assert pod["serviceAccountName"] == "tuner-scan"
        assert pod["securityContext"]["runAsNonRoot"] is True
        [container] = pod["containers"]
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        args = container["args"]
        assert args[0] == "scan" and "--output=prometheus" in args
        assert any(a.startswith("--namespace=") for a in args) is namespaced
        env = {"$(NAMESPACE)": "shop", "$(PUSHGATEWAY_URL)": "http://pg:9091/metrics/job/x"}
        expanded = [a.replace("$(NAMESPACE)", env["$(NAMESPACE)"]).replace(
            "$(PUSHGATEWAY_URL)", env["$(PUSHGATEWAY_URL)"]) for a in args]
        parsed = build_parser().parse_args(expanded)  # the tuner takes what the Job passes
        assert parsed.output == "prometheus" and parsed.push.startswith("http://pg:9091/")
