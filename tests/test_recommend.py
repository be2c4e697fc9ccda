"""`tuner recommend` and `tuner apply` on recorded trial data; apply against the in-repo
Kubernetes API server, driven by the real `kubernetes` client over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tuner.errors import KubeError
from tuner.findings import load_findings
from tuner.kube.apply import apply_configmaps, connect
from tuner.store import ResultsStore, StoredTrial
from tuner.trial import Trial

from .kube_api import kube_api

TUNER = [sys.executable, "-m", "tuner.cli"]
#: a real experiment: nginx 1.22 -> Node 20, proxy idle 1s/2s/3s x keepAliveTimeout 1s/2.5s
RECORDED = Path(__file__).parent / "data" / "nginx_node_grid.json"


def _store(tmp_path: Path, *, write_back: dict[str, Any] | None = None,
           drop_cells: tuple[str, ...] = ()) -> Path:
    recorded = json.loads(RECORDED.read_text())
    spec = dict(recorded["spec"])
    if write_back is not None:
        spec["write_back"] = write_back
    db = tmp_path / "recorded.db"
    with ResultsStore(db) as store:
        store.add_experiment(experiment_id=recorded["experiment_id"], created_at=0.0, spec=spec,
                             versions=recorded["versions"], host=recorded["host"])
        for i, trial in enumerate(recorded["trials"]):
            if trial["cell"] in drop_cells:
                continue
            store.add_trial(StoredTrial(recorded["experiment_id"], trial["cell"],
                                        trial["repeat"], float(i), float(i) + 1,
                                        Trial.from_json(trial)))
    return db


def test_recommendation_on_recorded_data(tmp_path: Path) -> None:
    report = load_findings(_store(tmp_path), margin_s=None, proxy_idle_s=None,
                          upstream_idle_s=None, target_rate=0.02)
    rec = report.primary
    assert rec.upstream_idle_setting_s == 1.0 and rec.status == "ok"
    assert rec.upstream_close_s is not None and 1.95 < rec.upstream_close_s < 2.1
    assert rec.proxy_idle_s == 1.0  # 2.0 s close minus the 1 s margin
    # for the grid's largest proxy idle (3 s): Node's measured +1 s offset, not assumed
    assert rec.upstream_close_offset_s is not None and 0.95 < rec.upstream_close_offset_s < 1.1
    assert rec.upstream_idle_s is not None and rec.upstream_idle_s >= 3.0 + 1.0 - 1.1
    assert rec.evidence is not None and rec.evidence.n_race == 0
    assert rec.evidence.n_reused >= 200 and rec.evidence.upper_rate < 0.02
    assert sorted(u["proxy_idle_s"] for u in rec.unsafe) == [2.0, 3.0]
    assert all(u["rate_low"] > 0 for u in rec.unsafe)
    assert {a["setting"] for a in rec.alternatives} >= {
        "proxy_next_upstream error timeout non_idempotent;"}


def test_cli_json_and_configmap(tmp_path: Path) -> None:
    db = _store(tmp_path, write_back={
        "ingress_nginx": {"namespace": "ingress-nginx", "name": "ingress-nginx-controller"},
        "app": {"namespace": "shop", "name": "checkout", "key": "KEEP_ALIVE_TIMEOUT_MS"}})
    result = subprocess.run([*TUNER, "recommend", str(db), "--json"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    for key in ("proxy_idle_s", "upstream_idle_s", "upstream_close_s", "margin_s", "evidence",
                "alternatives"):
        assert key in document
    cms = subprocess.run([*TUNER, "recommend", str(db), "-o", "configmap", "--namespace",
                          "shop"], capture_output=True, text=True, timeout=60)
    objects = list(yaml.safe_load_all(cms.stdout))
    assert [o["metadata"]["name"] for o in objects] == [
        "tuner-keepalive", "ingress-nginx-controller", "checkout"]
    assert objects[0]["data"]["proxy-idle-timeout-seconds"] == "1"
    assert objects[0]["data"]["nginx-snippet"] == (
        "upstream app { keepalive 32; keepalive_timeout 1000ms; }")
    assert objects[0]["data"]["node-snippet"].startswith("server.keepAliveTimeout = ")
    assert "uvicorn-snippet" not in objects[0]["data"]  # measured on Node, not uvicorn
    assert "no race in" in objects[0]["metadata"]["annotations"][
        "tuner.keepalive.dev/evidence"]
    assert objects[1]["data"] == {"upstream-keepalive-timeout": "1"}
    # Node: the setting that makes the real close >= 3 s + 1 s margin, measured offset ~1 s
    assert 2900 <= int(objects[2]["data"]["KEEP_ALIVE_TIMEOUT_MS"]) <= 3100


def test_insufficient_data_has_its_own_exit_code(tmp_path: Path) -> None:
    db = _store(tmp_path, drop_cells=("1|1", "1|2.5", "2|2.5", "3|2.5"))
    result = subprocess.run([*TUNER, "recommend", str(db)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 8, result.stdout + result.stderr
    assert "INSUFFICIENT" in result.stdout and "more" in result.stdout


def _objects(tmp_path: Path) -> list[dict[str, Any]]:
    db = _store(tmp_path, write_back={
        "ingress_nginx": {"namespace": "ingress-nginx", "name": "ingress-nginx-controller"}})
    report = load_findings(db, margin_s=None, proxy_idle_s=None, upstream_idle_s=None,
                          target_rate=0.02)
    return report.configmaps(name="tuner-keepalive", namespace="shop")


def test_apply_creates_then_merges_and_dry_run_writes_nothing(tmp_path: Path) -> None:
    objects = _objects(tmp_path)
    with kube_api(tmp_path) as (state, kubeconfig):
        state.namespaces |= {"shop", "ingress-nginx"}
        state.configmaps[("ingress-nginx", "ingress-nginx-controller")] = {
            "apiVersion": "v1", "kind": "ConfigMap", "data": {"use-forwarded-headers": "true"},
            "metadata": {"name": "ingress-nginx-controller", "namespace": "ingress-nginx",
                         "resourceVersion": "7"}}
        connection = connect(kubeconfig=str(kubeconfig), context=None)
        planned = apply_configmaps(connection, objects, dry_run=True)
        assert [r.action for r in planned] == ["would create", "would update"]
        assert "+upstream-keepalive-timeout: 1" in planned[1].diff
        assert ("shop", "tuner-keepalive") not in state.configmaps
        assert all(verb == "get" for verb, _ in state.requests)

        done = apply_configmaps(connection, objects, dry_run=False)
        assert [r.action for r in done] == ["created", "updated"]
        controller = state.configmaps[("ingress-nginx", "ingress-nginx-controller")]
        assert controller["data"] == {"use-forwarded-headers": "true",
                                      "upstream-keepalive-timeout": "1"}
        again = apply_configmaps(connection, objects, dry_run=False)
        assert [r.action for r in again] == ["unchanged", "unchanged"]


def test_apply_retries_conflicts(tmp_path: Path) -> None:
    objects = _objects(tmp_path)[:1]
    with kube_api(tmp_path) as (state, kubeconfig):
        state.namespaces.add("shop")
        connection = connect(kubeconfig=str(kubeconfig), context=None)
        apply_configmaps(connection, objects, dry_run=False)
        objects[0]["data"]["margin-seconds"] = "2"
        state.conflicts = 2  # two other writers win before we do
        [result] = apply_configmaps(connection, objects, dry_run=False)
        assert result.action == "updated"
        assert state.configmaps[("shop", "tuner-keepalive")]["data"]["margin-seconds"] == "2"
        assert sum(1 for verb, _ in state.requests if verb == "patch") == 3
        state.conflicts = 10
        objects[0]["data"]["margin-seconds"] = "3"
        with pytest.raises(KubeError, match="5 conflicts"):
            apply_configmaps(connection, objects, dry_run=False)


@pytest.mark.parametrize(("setup", "message"), [
    (lambda s: s.deny.add(("create", "shop")),
     "forbidden: may not create configmaps in namespace 'shop'"),
    (lambda s: None, "namespace 'shop' does not exist"),
    (lambda s: setattr(s, "reject", "keep-alive changes need a ticket"),
     "rejected ConfigMap shop/tuner-keepalive: admission webhook"),
])
def test_apply_errors_name_what_failed(tmp_path: Path, setup: Any, message: str) -> None:
    objects = _objects(tmp_path)[:1]
    with kube_api(tmp_path) as (state, kubeconfig):
        if "does not exist" not in message:
            state.namespaces.add("shop")
        setup(state)
        connection = connect(kubeconfig=str(kubeconfig), context=None)
        with pytest.raises(KubeError, match=message):
            apply_configmaps(connection, objects, dry_run=False)


def test_apply_cli_refused_connection_names_the_server(tmp_path: Path) -> None:
    db = _store(tmp_path)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "gone",
        "clusters": [{"name": "gone", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "u"}}]}))
    result = subprocess.run([*TUNER, "apply", str(db), "--kubeconfig", str(kubeconfig),
                             "--context", "gone"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 9
    assert "cannot reach the Kubernetes API server at http://127.0.0.1:9 (context gone)" \
        in result.stderr


def test_the_test_server_speaks_merge_patch_and_server_side_apply(tmp_path: Path) -> None:
    """The in-repo API server against the real client: the patch types a cluster offers."""
    from kubernetes.client.exceptions import ApiException

    with kube_api(tmp_path) as (state, kubeconfig):
        state.namespaces.add("shop")
        api, _, _ = connect(kubeconfig=str(kubeconfig), context=None)
        body = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "app", "namespace": "shop"},
                "data": {"KEEP_ALIVE_TIMEOUT_MS": "5000", "LOG": "info"}}
        created = api.patch_namespaced_config_map(
            "app", "shop", body, field_manager="helm",
            _content_type="application/apply-patch+yaml")
        assert created.data == {"KEEP_ALIVE_TIMEOUT_MS": "5000", "LOG": "info"}
        ours = {**body, "data": {"KEEP_ALIVE_TIMEOUT_MS": "3000"}}
        with pytest.raises(ApiException) as conflict:
            api.patch_namespaced_config_map("app", "shop", ours, field_manager="tuner",
                                            _content_type="application/apply-patch+yaml")
        assert conflict.value.status == 409
        assert 'conflict with "helm"' in json.loads(conflict.value.body)["message"]
        forced = api.patch_namespaced_config_map(
            "app", "shop", ours, field_manager="tuner", force=True,
            _content_type="application/apply-patch+yaml")
        assert forced.data == {"KEEP_ALIVE_TIMEOUT_MS": "3000", "LOG": "info"}
        merged = api.patch_namespaced_config_map(
            "app", "shop", {"data": {"LOG": None, "NEW": "1"}},
            _content_type="application/merge-patch+json")
        assert merged.data == {"KEEP_ALIVE_TIMEOUT_MS": "3000", "NEW": "1"}
        with pytest.raises(ApiException) as stale:
            api.patch_namespaced_config_map(
                "app", "shop", {"metadata": {"resourceVersion": "1"}, "data": {"X": "1"}},
                _content_type="application/merge-patch+json")
        assert stale.value.status == 409
        with pytest.raises(ApiException) as missing:
            api.patch_namespaced_config_map("app", "shop", body,
                                            _content_type="application/apply-patch+yaml")
        assert missing.value.status == 400 and "fieldManager" in missing.value.body
