"""`tuner experiment --target kubernetes` when the cluster is not as it should be, against
the in-repo API server with the real client, run as the CLI: a missing ConfigMap or
Deployment, RBAC denial, bad spec sections, a rollout that never becomes ready, and an API
server that goes away for good. None of these reach load, so no pod runs here (the end to
end runs are in test_cluster_experiment.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tuner.errors import ConfigError
from tuner.experiment.spec import parse_spec

from .kube_api import KubeState, kube_api

TUNER = [sys.executable, "-m", "tuner.cli"]
NS = "tuner-demo"
BASELINE = {"upstream-keepalive-timeout": "60", "app-keep-alive-timeout-ms": "5000",
            "generation": "0"}


def _spec(tmp_path: Path, **kubernetes: Any) -> Path:
    section = {"namespace": NS, "service_url": "http://127.0.0.1:9/", "deployment": "demo-app",
               "rollout_timeout": "2s", "sidecar_timeout": "2s", "api_retry_limit": "2s",
               **kubernetes}
    path = tmp_path / "spec.yaml"
    # faults, not verdicts, are tested here: no positive control (test_cluster_experiment
    # runs it)
    path.write_text(json.dumps({"proxy": "nginx", "upstream": "node", "proxy_idle": ["1s"],
                                "upstream_idle": ["1s"], "max_seconds": 5, "control": False,
                                "kubernetes": section}))
    return path


def _cluster(state: KubeState, *, tuning: bool = True, deployment: bool = True) -> None:
    state.namespaces.add(NS)
    if tuning:
        state.configmaps[(NS, "tuner-tuning")] = {
            "apiVersion": "v1", "kind": "ConfigMap", "data": dict(BASELINE),
            "metadata": {"name": "tuner-tuning", "namespace": NS,
                         "resourceVersion": state.next_version()}}
    if deployment:
        state.add_deployment(NS, "demo-app", replicas=2)


def _run(tmp_path: Path, kubeconfig: Path, spec: Path, *extra: str,
         timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TUNER, "experiment", str(spec), "--target", "kubernetes",
                           "--kubeconfig", str(kubeconfig), "--db", str(tmp_path / "r.db"),
                           *extra], capture_output=True, text=True, timeout=timeout_s)


def test_a_missing_configmap_or_deployment_is_named(tmp_path: Path) -> None:
    with kube_api(tmp_path) as (state, kubeconfig):
        _cluster(state, tuning=False)
        done = _run(tmp_path, kubeconfig, _spec(tmp_path))
        assert done.returncode == 9, done.stderr
        assert "ConfigMap tuner-demo/tuner-tuning does not exist" in done.stderr
        assert "kubernetes.tuning_configmap" in done.stderr

        state.deployments.clear()
        _cluster(state, deployment=False)
        done = _run(tmp_path, kubeconfig, _spec(tmp_path))
        assert done.returncode == 9, done.stderr
        assert "Deployment tuner-demo/demo-app does not exist" in done.stderr
        assert state.configmaps[(NS, "tuner-tuning")]["data"] == BASELINE  # nothing touched


def test_rbac_denial_names_verb_resource_and_namespace(tmp_path: Path) -> None:
    with kube_api(tmp_path) as (state, kubeconfig):
        _cluster(state)
        state.deny.add(("patch", NS))
        done = _run(tmp_path, kubeconfig, _spec(tmp_path))
        assert done.returncode == 9, done.stderr
        assert "may not patch configmaps in namespace 'tuner-demo'" in done.stderr
        assert "manifests/base/rbac.yaml" in done.stderr


@pytest.mark.parametrize(("section", "message"), [
    ({"namespace": NS}, "kubernetes.service_url: missing"),
    ({"namespace": NS, "service_url": "demo-app:80", "deployment": "d"},
     "kubernetes.service_url: 'demo-app:80' is not an http:// or https:// URL"),
    ({"namespace": "Tuner", "service_url": "http://x/", "deployment": "d"},
     "kubernetes.namespace 'Tuner' is not a valid Kubernetes name"),
    ({"namespace": NS, "service_url": "http://x/", "deployment": "d", "rollout": "1m"},
     "kubernetes.rollout: unknown key"),
    ({"namespace": NS, "service_url": "http://x/", "deployment": "d", "sidecar_port": 0},
     "kubernetes.sidecar_port: 0 must be a port number"),
    ({"namespace": NS, "service_url": "http://x/", "deployment": "d",
      "rollout_timeout": "soon"}, "kubernetes.rollout_timeout: 'soon' is not a duration"),
])
def test_spec_section_errors_name_the_key(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_spec({"kubernetes": section})
    assert message in str(info.value)


def test_cli_refusals_before_anything_starts(tmp_path: Path) -> None:
    no_section = tmp_path / "plain.yaml"
    no_section.write_text("proxy_idle: [1s]\n")
    for argv, message in [
        ([str(no_section), "--target", "kubernetes"], "needs the spec's `kubernetes:` section"),
        ([str(_spec(tmp_path)), "--target", "kubernetes", "--resume"],
         "resuming is automatic"),
        ([str(_spec(tmp_path)), "--kubeconfig", "k"], "go with --target kubernetes"),
    ]:
        done = subprocess.run([*TUNER, "experiment", *argv, "--db", str(tmp_path / "x.db")],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and message in done.stderr, (argv, done.stderr)


def test_a_grid_value_the_key_cannot_hold_is_refused_before_the_cluster(
        tmp_path: Path) -> None:
    spec = _spec(tmp_path, upstream_idle_unit="s")
    spec.write_text(spec.read_text().replace('"upstream_idle": ["1s"]',
                                             '"upstream_idle": ["1500ms"]'))
    # no API server at all: the refusal comes before any connection
    done = _run(tmp_path, tmp_path / "no-such-kubeconfig", spec)
    assert done.returncode == 2, done.stderr
    assert "upstream_idle[0] 1.5s: app-keep-alive-timeout-ms (s) takes whole seconds" \
        in done.stderr


def test_a_rollout_that_never_becomes_ready_fails_the_trial_with_the_reason(
        tmp_path: Path) -> None:
    with kube_api(tmp_path) as (state, kubeconfig):
        _cluster(state)
        state.rollout = "never"
        started = time.monotonic()
        done = _run(tmp_path, kubeconfig, _spec(tmp_path), "--json")
        assert time.monotonic() - started < 40
        document = json.loads(done.stdout)
        (trial,) = document["trials"]
        assert trial["verdict"] == "invalid"
        assert trial["invalid_reason"].startswith(
            "the rollout of Deployment tuner-demo/demo-app did not complete within 2s "
            "(updated 1/2, available 1/2, total 3")
        # nothing to recommend from an invalid trial: exit 8, and the baseline is back
        assert done.returncode == 8, done.stderr
        assert document["recommendation_problem"]
        assert state.configmaps[(NS, "tuner-tuning")]["data"] == BASELINE
        ledger = state.configmaps[(NS, "tuner-ledger")]["data"]
        assert ledger["state"] == "finished"
        assert json.loads(ledger["trial-000"])["verdict"] == "invalid"


def test_an_api_server_gone_for_good_stops_with_the_restore_command(tmp_path: Path) -> None:
    with kube_api(tmp_path) as (state, kubeconfig):
        _cluster(state)

        def api_goes_away(_ns: str, _name: str) -> None:
            state.down_until = float("inf")
        state.on_restart = api_goes_away
        started = time.monotonic()
        done = _run(tmp_path, kubeconfig, _spec(tmp_path))
        elapsed_s = time.monotonic() - started
        assert done.returncode == 9, done.stderr
        assert "the API server does not answer (rollout status of demo-app); retrying" \
            in done.stdout
        assert "gave up on rollout status of demo-app after 2s" in done.stderr
        assert "could NOT restore the baseline" in done.stdout
        assert (f"kubectl -n {NS} patch configmap tuner-tuning --type merge -p "
                '\'{"data": {"upstream-keepalive-timeout": "60", ') in done.stdout
        assert "continue" in done.stderr  # how to go on
        assert elapsed_s < 45
        # the ledger kept the baseline for the re-run
        ledger = state.configmaps[(NS, "tuner-ledger")]["data"]
        assert ledger["state"] == "running"
        assert json.loads(ledger["baseline"]) == BASELINE


def test_a_tuning_left_at_a_trial_without_a_ledger_is_refused(tmp_path: Path) -> None:
    with kube_api(tmp_path) as (state, kubeconfig):
        _cluster(state)
        state.configmaps[(NS, "tuner-tuning")]["data"]["generation"] = "0123456789ab-004-1"
        done = _run(tmp_path, kubeconfig, _spec(tmp_path))
        assert done.returncode == 2, done.stderr
        assert "is at generation '0123456789ab-004-1', a trial of an earlier tuner run" \
            in done.stderr
        assert (NS, "tuner-ledger") not in state.configmaps  # nothing written
