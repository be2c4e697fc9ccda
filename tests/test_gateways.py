"""Write-back for the Envoy family: `tuner recommend -o destinationrule` (Istio) and
`-o backendtrafficpolicy` (Envoy Gateway), with the app's ConfigMap key.

Validated twice: offline against the openAPIV3Schema of our minimal CRDs
(manifests/crds/), and, when the checkout has issue 11's real API server fixture (`kube`),
by a real kube-apiserver with those CRDs installed, through `tuner apply` (create, then merge
into an object with other fields) and a refused bad value.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tuner.errors import ConfigError
from tuner.kube.custom import merged
from tuner.kube.gateways import (
    GATEWAY_DURATION,
    backend_traffic_policy,
    destination_rule,
    gateway_duration,
    parse_target_ref,
)

from .test_recommend import _store

TUNER = [sys.executable, "-m", "tuner.cli"]
CRDS = Path(__file__).parents[1] / "manifests" / "crds"
APP = {"namespace": "shop", "name": "checkout", "key": "KEEP_ALIVE_TIMEOUT_MS"}


def _schema(kind: str) -> dict[str, Any]:
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            return schema
    raise AssertionError(f"no CRD for {kind} in {CRDS}")


def _validate(obj: dict[str, Any]) -> None:
    """Our CRD's structural schema, as JSON Schema (the x-kubernetes-* keys are ignored)."""
    jsonschema.validate(obj, _schema(obj["kind"]))


def test_durations_fit_both_apis() -> None:
    for seconds, text in ((1.0, "1s"), (0.8, "800ms"), (3600, "1h"), (90, "90s"),
                          (1.5, "1500ms"), (120, "2m"), (0.0015, "1ms")):
        assert gateway_duration(seconds) == text
        assert GATEWAY_DURATION.match(text)
    assert gateway_duration(1.2345) == "1234ms"  # rounded down: shorter is the safe side
    assert GATEWAY_DURATION.match(gateway_duration(123.4567))
    with pytest.raises(ConfigError, match="below 1 ms"):
        gateway_duration(0.0004)


def test_objects_match_the_crds() -> None:
    rule = destination_rule(proxy_idle_s=1.5, name="checkout-idle", namespace="shop",
                            host="checkout.shop.svc.cluster.local")
    assert rule["spec"]["trafficPolicy"]["connectionPool"]["http"]["idleTimeout"] == "1500ms"
    _validate(rule)
    policy = backend_traffic_policy(proxy_idle_s=1.0, name="checkout-idle", namespace="shop",
                                    target_refs=[parse_target_ref("HTTPRoute/checkout")])
    assert policy["spec"] == {
        "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                        "name": "checkout"}],
        "timeout": {"http": {"connectionIdleTimeout": "1s"}}}
    _validate(policy)
    # the schemas do refuse: a fraction is no Gateway API Duration
    bad = merged(policy, {"spec": {"timeout": {"http": {"connectionIdleTimeout": "1.5s"}}}})
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad)


def test_bad_inputs_name_the_value() -> None:
    with pytest.raises(ConfigError, match="--host 'Not A Host'"):
        destination_rule(proxy_idle_s=1, name="x", namespace="shop", host="Not A Host")
    with pytest.raises(ConfigError, match="needs the app's host") as missing:
        destination_rule(proxy_idle_s=1, name="x", namespace="shop", host=None)
    # the flag is named, not the value Python gave it ("--host None:")
    assert str(missing.value).startswith("-o destinationrule needs --host")
    assert "None" not in str(missing.value)
    with pytest.raises(ConfigError, match="--target-ref 'Service/x'"):
        parse_target_ref("Service/x")
    with pytest.raises(ConfigError, match="give --target-ref"):
        backend_traffic_policy(proxy_idle_s=1, name="x", namespace="shop", target_refs=[])


def test_merge_patch_keeps_other_fields() -> None:
    before = {"host": "checkout", "trafficPolicy": {
        "loadBalancer": {"simple": "LEAST_REQUEST"},
        "connectionPool": {"http": {"idleTimeout": "1h", "maxRetries": 3}}}}
    after = merged(before, {"host": "checkout", "trafficPolicy": {
        "connectionPool": {"http": {"idleTimeout": "1s"}}}})
    assert after == {"host": "checkout", "trafficPolicy": {
        "loadBalancer": {"simple": "LEAST_REQUEST"},
        "connectionPool": {"http": {"idleTimeout": "1s", "maxRetries": 3}}}}


@pytest.mark.parametrize(("output", "extra", "kind"), [
    ("destinationrule", ["--host", "checkout.shop.svc.cluster.local"], "DestinationRule"),
    ("backendtrafficpolicy", ["--target-ref", "HTTPRoute/checkout", "--target-ref",
                              "Gateway/eg"], "BackendTrafficPolicy"),
])
def test_recommend_prints_the_object_and_the_app_key(tmp_path: Path, output: str,
                                                     extra: list[str], kind: str) -> None:
    db = _store(tmp_path, write_back={"app": APP})
    done = subprocess.run([*TUNER, "recommend", str(db), "-o", output, "--namespace", "shop",
                           "--name", "checkout-idle", *extra], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    gateway, app = yaml.safe_load_all(done.stdout)
    assert gateway["kind"] == kind and gateway["metadata"]["namespace"] == "shop"
    _validate(gateway)
    assert "tuner.keepalive.dev/evidence" in gateway["metadata"]["annotations"]
    text = yaml.safe_dump(gateway["spec"])
    assert "1s" in text  # the recorded grid's recommendation: 1 s (2.0 s close - 1 s margin)
    assert app["kind"] == "ConfigMap" and "KEEP_ALIVE_TIMEOUT_MS" in app["data"]


def test_recommend_without_host_says_what_to_give(tmp_path: Path) -> None:
    db = _store(tmp_path)
    done = subprocess.run([*TUNER, "recommend", str(db), "-o", "destinationrule"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--host" in done.stderr and "Traceback" not in done.stderr


# -- a real API server (issue 11's fixture), when this checkout has it ----------------------
@pytest.fixture
def real_kube(request: pytest.FixtureRequest) -> Any:
    try:
        return request.getfixturevalue("kube")
    except pytest.FixtureLookupError:
        pytest.skip("no real API server fixture (`kube`, issue 11) in this checkout")


def test_a_real_api_server_accepts_and_merges(tmp_path: Path, real_kube: Any) -> None:
    kube = real_kube
    for path in sorted(CRDS.glob("*.yaml")):
        kube.kubectl("apply", "--server-side", "-f", str(path))
    for crd in ("destinationrules.networking.istio.io",
                "backendtrafficpolicies.gateway.envoyproxy.io"):
        kube.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd}")
    namespace = f"gw-{tmp_path.name[-8:].lower().replace('_', '-')}".rstrip("-")
    kube.kubectl("create", "namespace", namespace)
    # an existing DestinationRule with fields of its own, which must survive
    kube.kubectl("apply", "-f", "-", stdin=yaml.safe_dump({
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "checkout-idle", "namespace": namespace},
        "spec": {"host": "checkout", "trafficPolicy": {
            "loadBalancer": {"simple": "LEAST_REQUEST"},
            "connectionPool": {"http": {"idleTimeout": "1h", "maxRetries": 3}}}}}))
    db = _store(tmp_path, write_back={"app": {**APP, "namespace": namespace}})
    common = ["--namespace", namespace, "--name", "checkout-idle",
              "--kubeconfig", str(kube.kubeconfig)]
    for output, extra in (("destinationrule", ["--host", "checkout"]),
                          ("backendtrafficpolicy", ["--target-ref", "HTTPRoute/checkout"])):
        done = subprocess.run([*TUNER, "apply", str(db), "-o", output, *common, *extra],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
    rule = yaml.safe_load(kube.kubectl("-n", namespace, "get", "destinationrule",
                                       "checkout-idle", "-o", "yaml").stdout)
    assert rule["spec"]["trafficPolicy"] == {
        "loadBalancer": {"simple": "LEAST_REQUEST"},
        "connectionPool": {"http": {"idleTimeout": "1s", "maxRetries": 3}}}
    policy = yaml.safe_load(kube.kubectl("-n", namespace, "get", "backendtrafficpolicy",
                                         "checkout-idle", "-o", "yaml").stdout)
    assert policy["spec"]["timeout"]["http"]["connectionIdleTimeout"] == "1s"
    # the server enforces the CRD's schema: a fraction is refused
    refused = kube.kubectl("-n", namespace, "patch", "backendtrafficpolicy", "checkout-idle",
                           "--type", "merge", "-p",
                           '{"spec":{"timeout":{"http":{"connectionIdleTimeout":"1.5s"}}}}',
                           check=False)
    assert refused.returncode != 0 and "connectionIdleTimeout" in refused.stderr
