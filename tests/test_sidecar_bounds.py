"""The sidecar's bounds, piece by piece: the chunked, capped count of a log after a mark;
the shared-token caller check; the probe's total deadline against a real Node app; and
the token the cluster runner shows the sidecars (against the API stand-in)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tuner.analysis.signatures import count_nginx_signatures
from tuner.boundedhttp import Request, parse_head
from tuner.errors import ProbeError
from tuner.kube.apply import connect
from tuner.kube.cluster import Cluster
from tuner.kube.target import ClusterTarget
from tuner.lab import get_upstream
from tuner.lab.lab import UpstreamServer
from tuner.lab.process import pick_free_port
from tuner.probe import parse_target, probe
from tuner.sidecar import SidecarState
from tuner.sidecar_api import SidecarAPI, count_since
from tuner.sidecar_auth import SharedToken, bearer_token

from .kube_api import kube_api

RACE = ("2026/11/23 02:00:00 [error] 12#12: *3 upstream prematurely closed connection while "
        "reading response header from upstream, client: 127.0.0.1")
OTHER = "2026/11/23 02:00:00 [notice] 12#12: signal process started"


def test_the_count_after_a_mark_is_exact_across_chunks_and_capped(tmp_path: Path) -> None:
    log = tmp_path / "error.log"
    lines = [RACE if i % 7 == 0 else OTHER for i in range(12_000)]  # ~1 MiB: 4+ chunks
    log.write_text("\n".join(lines) + "\n" + RACE[:40])  # the last line is still unwritten
    mark = len(("\n".join(lines[:1000]) + "\n").encode())
    assert count_since(log, mark) == count_nginx_signatures(lines[1000:])
    assert count_since(log, 0, max_bytes=1000) is None  # too much: no partial count
    assert count_since(log, 10**12) == count_nginx_signatures(lines)  # rotated: from 0
    assert count_since(tmp_path / "missing.log", 0) == {}


def _get(api: SidecarAPI, target: str, token: str | None = None) -> tuple[int, dict[str, object]]:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = parse_head(f"GET {target} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
    assert not isinstance(head, str)
    answer = api.handle(Request(head.method, head.target, head.headers, ""))
    return answer.status, json.loads(answer.body)


def test_a_shared_token_file_is_the_only_key_and_can_be_rotated(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("first-secret\n")
    api = SidecarAPI(state=SidecarState(), error_log=tmp_path / "error.log", app_url=None,
                     callers=SharedToken(secret))
    assert _get(api, "/status?since=0", "first-secret")[0] == 200
    status, document = _get(api, "/status?since=0", "wrong")
    assert status == 401 and "not the one in the sidecar's --token-file" in str(document)
    assert _get(api, "/probe")[0] == 401
    time.sleep(0.01)  # a new mtime
    secret.write_text("second-secret\n")
    assert _get(api, "/status?since=0", "first-secret")[0] == 401
    assert _get(api, "/status?since=0", "second-secret")[0] == 200
    status, document = _get(api, "/status")
    assert status == 200 and "log_offset" not in document


@pytest.mark.parametrize(("header", "token"), [
    ("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Basic abc", None), ("Bearer", None),
    ("Bearer a b", None), (None, None)])
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_the_probe_ends_at_its_deadline_however_long_max_idle(tmp_path: Path) -> None:
    app = UpstreamServer(get_upstream("node"), workdir=tmp_path, port=pick_free_port())
    app.start(30.0)  # closes idle connections after 31 s
    try:
        started = time.monotonic()
        with pytest.raises(ProbeError, match="did not finish within its total deadline"):
            probe(parse_target(f"http://127.0.0.1:{app.port}/"), n_samples=2,
                  max_idle_s=60, deadline_s=1.5)
        assert time.monotonic() - started < 3.0
    finally:
        app.stop()


def test_the_runner_shows_the_sidecars_its_token_file_else_the_kubeconfigs(
        tmp_path: Path) -> None:
    with kube_api(tmp_path) as (_, kubeconfig):
        connection = connect(kubeconfig=str(kubeconfig), context=None)
        token_file = tmp_path / "sidecar-token"
        cluster = Cluster(connection, ClusterTarget(
            namespace="shop", service_url="http://x/", deployment="d",
            sidecar_token_file=str(token_file)), say=print)
        assert cluster.sidecar_token() == "test-token"  # no file: the kubeconfig's
        token_file.write_text("projected-token\n")
        assert cluster.sidecar_token() == "projected-token"
        token_file.write_text("rotated-by-the-kubelet\n")
        assert cluster.sidecar_token() == "rotated-by-the-kubelet"


def test_a_sidecar_that_may_not_review_tokens_says_which_grant_is_missing(
        tmp_path: Path) -> None:
    from tuner.kube.tokenreview import token_reviewer
    from tuner.sidecar_auth import ServiceAccountCaller

    with kube_api(tmp_path) as (state, kubeconfig):
        state.tokens["job"] = ("system:serviceaccount:shop:tuner", ["tuner-sidecar"])
        reviewer = token_reviewer(connect(kubeconfig=str(kubeconfig), context=None),
                                  audience="tuner-sidecar")
        api = SidecarAPI(state=SidecarState(), error_log=tmp_path / "error.log", app_url=None,
                         callers=ServiceAccountCaller(reviewer, namespace="shop", name="tuner",
                                                      audience="tuner-sidecar"))
        state.deny.add(("create", "tokenreviews"))
        status, document = _get(api, "/status?since=0", "job")
        assert status == 503
        assert "may not create tokenreviews" in str(document)
        assert "ClusterRole tuner-sidecar-tokenreview" in str(document)
        state.deny.clear()  # granted: the refusal was not cached
        assert _get(api, "/status?since=0", "job")[0] == 200
