"""The lab with real processes: every proxy x every built-in upstream, reloads, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from tuner.errors import ConfigError, ProcessStartError, ProxyConfigError
from tuner.lab import BUILTIN_UPSTREAMS, PROXIES, Lab, command_upstream, get_upstream
from tuner.lab.nginx import NginxProxy
from tuner.lab.process import pick_free_port
from tuner.probe import parse_target, probe

from .conftest import alive, descendants

NODE_APP = Path(__file__).parents[1] / "tuner" / "lab" / "apps" / "node_server.js"


@pytest.mark.parametrize("upstream", sorted(BUILTIN_UPSTREAMS))
@pytest.mark.parametrize("proxy", sorted(PROXIES))
def test_proxy_forwards_get_and_post(proxy: str, upstream: str,
                                     no_leftover_children: None) -> None:
    with Lab(proxy=proxy, upstream=get_upstream(upstream), proxy_idle_s=60,
             upstream_idle_s=2) as lab:
        url = lab.info().proxy_url
        with httpx.Client(timeout=10) as client:
            got = client.get(f"{url}/items?id=7")
            posted = client.post(f"{url}/orders", content=b"x" * 5000)
        assert got.status_code == 200
        assert got.json()["method"] == "GET"
        assert posted.status_code == 200
        assert posted.json() == {**posted.json(), "method": "POST", "bytes": 5000}
        workdir = lab.workdir
    assert not workdir.exists(), "the lab's temporary files must be removed"


def test_reload_applies_the_new_proxy_idle_timeout(no_leftover_children: None) -> None:
    with Lab(proxy="nginx", upstream=get_upstream("node"), proxy_idle_s=60,
             upstream_idle_s=5) as lab:
        assert lab.proxy is not None
        master_pid = lab.proxy.process.pid if lab.proxy.process else None
        lab.set_proxy_idle(0.75)
        conf = lab.proxy.conf_path.read_text()
        assert "keepalive_timeout 750ms;" in conf
        assert lab.proxy.process is not None and lab.proxy.process.pid == master_pid
        assert httpx.get(f"{lab.proxy.url}/__tuner/generation").text.strip() == "generation 2"
        assert httpx.post(f"{lab.proxy.url}/", content=b"{}").status_code == 200


def test_haproxy_reload(no_leftover_children: None) -> None:
    with Lab(proxy="haproxy", upstream=get_upstream("node"), proxy_idle_s=60,
             upstream_idle_s=5) as lab:
        assert lab.proxy is not None
        lab.set_proxy_idle(2)
        assert "pool-purge-delay 2s" in lab.proxy.conf_path.read_text()
        assert httpx.get(f"{lab.proxy.url}/__tuner/generation").text.strip() == "generation 2"
        assert httpx.post(f"{lab.proxy.url}/", content=b"{}").status_code == 200


def test_upstream_restart_changes_its_real_close_time(no_leftover_children: None) -> None:
    with Lab(proxy="nginx", upstream=get_upstream("uvicorn"), proxy_idle_s=60,
             upstream_idle_s=1) as lab:
        assert lab.upstream is not None
        target = parse_target(f"{lab.upstream.url}/")
        before = probe(target, n_samples=1, max_idle_s=10)
        lab.set_upstream_idle(2)
        after = probe(target, n_samples=1, max_idle_s=10)
        assert before.idle_close_s is not None and after.idle_close_s is not None
        assert 0.8 < before.idle_close_s < 1.6
        assert 1.8 < after.idle_close_s < 2.6
        assert httpx.get(f"{lab.proxy.url}/" if lab.proxy else "").status_code == 200


def test_bring_your_own_upstream(no_leftover_children: None) -> None:
    upstream = command_upstream(f"node {NODE_APP} {{port}} {{idle_ms}}")
    with Lab(proxy="nginx", upstream=upstream, proxy_idle_s=60, upstream_idle_s=1.5) as lab:
        assert lab.upstream is not None
        response = httpx.post(f"{lab.info().proxy_url}/", content=b"abc")
        assert response.json()["bytes"] == 3
        sample = probe(parse_target(f"{lab.upstream.url}/"), n_samples=1, max_idle_s=10)
        assert sample.advertised_s == 1  # Node rounds timeout=1.5 s down in its header
        assert sample.idle_close_s is not None and 2.3 < sample.idle_close_s < 2.8


def test_error_log_since_a_mark(no_leftover_children: None) -> None:
    with Lab(proxy="nginx", upstream=get_upstream("node"), proxy_idle_s=60,
             upstream_idle_s=2) as lab:
        assert lab.proxy is not None and lab.upstream is not None
        mark = lab.proxy.error_log.mark()
        lab.upstream.stop()  # the upstream is gone: nginx logs connect() refused
        assert httpx.get(f"{lab.proxy.url}/").status_code == 502
        lines = lab.proxy.error_log.lines_since(mark)
        assert any("Connection refused" in line for line in lines), lines
        assert lab.problem() is None  # the upstream was stopped on purpose, not crashed


def test_upstream_that_exits_reports_status_and_stderr(no_leftover_children: None) -> None:
    upstream = command_upstream("echo 'bind failed: port {port} idle {idle_s}' >&2; exit 3")
    with pytest.raises(ProcessStartError) as info, Lab(
            proxy="nginx", upstream=upstream, proxy_idle_s=60, upstream_idle_s=1):
        pass
    message = str(info.value)
    assert "exited (status 3)" in message
    assert "bind failed: port" in message


def test_upstream_that_never_listens_times_out(no_leftover_children: None) -> None:
    upstream = command_upstream("sleep 30 # {port} {idle_s}")
    with pytest.raises(ProcessStartError, match=r"did not answer HTTP .* within 1s"), Lab(
            proxy="nginx", upstream=upstream, proxy_idle_s=60, upstream_idle_s=1,
            upstream_ready_timeout_s=1):
        pass


def test_exception_inside_the_lab_stops_everything(no_leftover_children: None) -> None:
    # what ran before (the session's Kubernetes control plane, once a kube test started it)
    # is not the lab's
    before = descendants(os.getpid())
    with pytest.raises(RuntimeError, match="boom"), Lab(
            proxy="haproxy", upstream=get_upstream("gunicorn"), proxy_idle_s=60,
            upstream_idle_s=2) as lab:
        workdir = lab.workdir
        started = descendants(os.getpid()) - before  # masters and their workers
        assert len(started) >= 4
        raise RuntimeError("boom")
    assert not alive(started)
    assert not workdir.exists()


def test_unknown_proxy_lists_choices() -> None:
    with pytest.raises(ConfigError, match="'traefik'; choose one of nginx, haproxy, envoy"):
        Lab(proxy="traefik", upstream=get_upstream("node"), proxy_idle_s=1, upstream_idle_s=1)


def test_value_the_upstream_cannot_take_fails_before_starting(
        no_leftover_children: None) -> None:
    with pytest.raises(ConfigError, match="whole seconds"):
        Lab(proxy="nginx", upstream=get_upstream("hypercorn"), proxy_idle_s=1,
            upstream_idle_s=2.5)


def test_proxy_rejecting_its_config_shows_its_own_message(tmp_path: Path,
                                                          no_leftover_children: None) -> None:
    class MisspelledNginx(NginxProxy):
        def render(self, proxy_idle_s: float) -> str:
            return super().render(proxy_idle_s).replace("keepalive_timeout", "keepalive_timout")

    proxy = MisspelledNginx(workdir=tmp_path, listen_port=pick_free_port(),
                            upstream_port=pick_free_port())
    with pytest.raises(ProxyConfigError, match='unknown directive "keepalive_timout"'):
        proxy.start(proxy_idle_s=1)
    proxy.stop()
    assert proxy.generation == 0  # the rejected generation never came into force


def test_a_render_that_fails_keeps_the_generation(tmp_path: Path) -> None:
    class BrokenNginx(NginxProxy):
        def render(self, proxy_idle_s: float) -> str:
            raise ValueError(f"cannot render {proxy_idle_s}")

    proxy = BrokenNginx(workdir=tmp_path, listen_port=pick_free_port(),
                        upstream_port=pick_free_port())
    with pytest.raises(ValueError, match="cannot render 1"):
        proxy.start(proxy_idle_s=1)
    assert proxy.generation == 0


def test_lab_info_is_json_serializable(no_leftover_children: None) -> None:
    with Lab(proxy="nginx", upstream=get_upstream("node"), proxy_idle_s=60,
             upstream_idle_s=2) as lab:
        info = json.loads(json.dumps(lab.info().__dict__))
        assert info["proxy_url"].startswith("http://127.0.0.1:")
        assert info["proxy_version"].startswith("1.")
        assert os.path.exists(info["proxy_error_log"])
