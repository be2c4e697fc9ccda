"""`tuner sidecar` against a real local nginx (in front of Node), as a process of its own."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tuner.analysis.signatures import n_races
from tuner.lab import get_upstream
from tuner.lab.lab import UpstreamServer
from tuner.lab.process import ManagedProcess, http_get, is_listening, pick_free_port
from tuner.load.bursts import BurstPlan, run_bursts, straddling_gaps
from tuner.probe import parse_target, probe
from tuner.sidecar import parse_tuning, render_nginx

TUNER = [sys.executable, "-m", "tuner.cli"]


@dataclass
class Pod:
    """nginx + Node + the sidecar, wired as in manifests/overlays/demo."""

    tuning: Path
    nginx_url: str
    sidecar_url: str

    def set_tuning(self, **keys: str) -> None:
        for key, value in keys.items():
            (self.tuning / key.replace("_", "-")).write_text(value)

    def status(self, since: int | None = None) -> dict[str, object]:
        query = f"?since={since}" if since is not None else ""
        document: dict[str, object] = httpx.get(f"{self.sidecar_url}/status{query}").json()
        return document

    def wait_generation(self, generation: str, timeout_s: float = 10) -> dict[str, object]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.status()
            if status["generation"] == generation:
                time.sleep(0.3)  # old workers finish their graceful shutdown
                return status
            time.sleep(0.1)
        pytest.fail(f"the sidecar never applied generation {generation}: {self.status()}")


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[Pod]:
    tuning, render = tmp_path / "tuning", tmp_path / "render"
    tuning.mkdir()
    render.mkdir()
    first = {"generation": "1", "upstream-keepalive-timeout": "60",
             "upstream-keepalive-connections": "128", "keep-alive": "600"}
    for key, value in first.items():
        (tuning / key).write_text(value)
    for name, text in render_nginx(parse_tuning(first)).items():
        (render / name).write_text(text)
    upstream = UpstreamServer(get_upstream("node"), workdir=tmp_path, port=pick_free_port())
    upstream.start(1.0)
    port = pick_free_port()
    user = "user root root;" if os.geteuid() == 0 else ""
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""{user}
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {tmp_path}; proxy_temp_path {tmp_path};
    access_log off;
    include {render}/client-keepalive.conf;
    upstream app {{
        server 127.0.0.1:{upstream.port};
        include {render}/upstream-keepalive.conf;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://app; proxy_http_version 1.1;
                      proxy_set_header Connection ""; }}
    }}
}}
""")
    nginx_binary = shutil.which("nginx") or "/usr/sbin/nginx"
    nginx = ManagedProcess([nginx_binary, "-g", "daemon off;", "-c", str(conf),
                            "-e", str(tmp_path / "error.log")], name="nginx", log_dir=tmp_path)
    nginx.start()
    sidecar_port = pick_free_port()
    sidecar = ManagedProcess(
        [*TUNER, "sidecar", "--tuning-dir", str(tuning), "--render-dir", str(render),
         "--nginx-pid", str(tmp_path / "nginx.pid"), "--error-log", str(tmp_path / "error.log"),
         "--nginx-conf", str(conf), "--listen", f"127.0.0.1:{sidecar_port}", "--poll", "100ms",
         "--app-url", f"http://127.0.0.1:{upstream.port}/"],
        name="sidecar", log_dir=tmp_path)
    sidecar.start()
    try:
        nginx.wait_ready(lambda: is_listening(port), timeout_s=10, what="listen")
        sidecar.wait_ready(lambda: http_get(sidecar_port, "/status") is not None, timeout_s=20,
                           what="serve /status")
        yield Pod(tuning, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{sidecar_port}")
    finally:
        sidecar.stop()
        nginx.stop()
        upstream.stop()


@pytest.mark.race
def test_log_counters_match_the_502s_of_a_race_hunting_load(pod: Pod) -> None:
    pod.wait_generation("1")
    before = pod.status()
    plan = BurstPlan(url=f"{pod.nginx_url}/orders", burst_size=30, n_bursts=12, max_seconds=35,
                     gaps_s=straddling_gaps(2.0, below_s=0.01, above_s=0.01, n_steps=11))
    report = run_bursts(plan)
    time.sleep(0.5)  # the sidecar polls every 100 ms
    after = pod.status(since=int(str(before["log_offset"])))
    since = after["signatures_since"]
    assert isinstance(since, dict)
    assert report.counts.n_502 >= 1
    assert n_races(since) == report.counts.n_502  # one [error] line per POST that got 502
    metrics = httpx.get(f"{pod.sidecar_url}/metrics").text
    assert 'tuner_setting_seconds{setting="upstream-keepalive-timeout"} 60' in metrics
    total = sum(int(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                if line.startswith("tuner_proxy_log_signatures_total")
                and 'kind="connect_refused"' not in line)
    assert total == report.counts.n_502


def test_a_changed_tuning_is_rendered_reloaded_and_measurable(pod: Pod) -> None:
    pod.wait_generation("1")
    pod.set_tuning(keep_alive="1500ms", generation="2")
    status = pod.wait_generation("2")
    assert status["error"] is None and status["reloads"] == 2
    measured = probe(parse_target(f"{pod.nginx_url}/"), n_samples=3, max_idle_s=10)
    assert measured.idle_close_s is not None and 1.4 < measured.idle_close_s < 1.9

    pod.set_tuning(upstream_keepalive_timeout="forever", generation="3")
    time.sleep(1.0)
    status = pod.status()
    assert status["generation"] == "2"  # the last good tuning stays in force
    assert "upstream-keepalive-timeout: 'forever' is not a duration" in str(status["error"])
    assert "tuner_tuning_error 1" in httpx.get(f"{pod.sidecar_url}/metrics").text
    assert json.loads(json.dumps(status))  # JSON all the way


def test_probe_measures_the_app_beside_it(pod: Pod) -> None:
    answer = httpx.get(f"{pod.sidecar_url}/probe?samples=2&max_idle=10s", timeout=30)
    assert answer.status_code == 200
    measured = answer.json()
    assert measured["advertised_s"] == 1.0  # Node, keepAliveTimeout 1000 ms
    assert 1.9 < measured["effective_close_s"] < 2.3
    bad = httpx.get(f"{pod.sidecar_url}/probe?max_idle=forever", timeout=10)
    assert bad.status_code == 400 and "max_idle" in bad.json()["error"]
