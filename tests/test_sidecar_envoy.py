"""The sidecar beside a real Envoy: it renders the tuning's idle timeout into Envoy's CDS
file, knows when Envoy has it in force, and counts races from Envoy's admin stats (on
/status, with the runner's since= protocol, and on /metrics)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tuner.analysis.outcomes import Outcome
from tuner.lab import Lab, get_upstream
from tuner.lab.envoy import EnvoyProxy, in_force_idle, same_duration
from tuner.lab.process import pick_free_port
from tuner.load.bursts import BurstPlan, run_bursts, straddling_gaps
from tuner.probe import parse_target, probe
from tuner.sidecar_auth import AnyCaller
from tuner.sidecar_envoy import EnvoyPaths, EnvoySidecar


@pytest.mark.race
def test_envoy_sidecar_applies_the_tuning_and_counts_races(
        tmp_path: Path, no_leftover_children: None) -> None:
    tuning = tmp_path / "tuning"
    tuning.mkdir()
    (tuning / "generation").write_text("g1")
    (tuning / "upstream-keepalive-timeout").write_text("1s")
    with Lab(proxy="envoy", upstream=get_upstream("node"), proxy_idle_s=3600,
             upstream_idle_s=1) as lab:
        proxy, upstream = lab.proxy, lab.upstream
        assert isinstance(proxy, EnvoyProxy) and upstream is not None
        sidecar = EnvoySidecar(EnvoyPaths(
            admin_url=f"http://127.0.0.1:{proxy.admin_port}", cds_path=proxy.conf_path,
            app_port=upstream.port, tuning_dir=tuning))
        sidecar.step()
        port = pick_free_port()
        server = sidecar.serve("127.0.0.1", port, callers=AnyCaller())
        try:
            status = httpx.get(f"http://127.0.0.1:{port}/status").json()
            assert status["in_force"] and status["generation"] == "g1", status
            dump = proxy.admin_json("/config_dump?resource=dynamic_active_clusters")
            assert dump is not None
            idle = in_force_idle(dump, version="1")
            assert idle is not None and same_duration(idle, 1.0)

            # back to Envoy's default (the key removed): 1 h, which races with Node's 2 s
            (tuning / "upstream-keepalive-timeout").unlink()
            (tuning / "generation").write_text("g2")
            sidecar.step()
            status = httpx.get(f"http://127.0.0.1:{port}/status").json()
            assert status["in_force"] and status["generation"] == "g2", status
            mark = status["log_offset"]
            close_s = probe(parse_target(f"{upstream.url}/"), n_samples=3,
                            max_idle_s=10).earliest_close_s
            assert close_s is not None
            report = run_bursts(BurstPlan(
                url=f"{proxy.url}/", burst_size=30, n_bursts=8, max_seconds=30,
                method="POST",
                gaps_s=straddling_gaps(close_s, below_s=0.01, above_s=0.01, n_steps=11)))
            n_503 = report.counts.total[Outcome.UNAVAILABLE]
            assert n_503 >= 1, report.counts.as_dict()
            sidecar.step()
            since = httpx.get(f"http://127.0.0.1:{port}/status?since={mark}").json()
            assert since["signatures_since"] == {"envoy_remote_close_with_active_rq": n_503}
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            assert (f'tuner_envoy_cluster_events_total{{kind="envoy_remote_close_with_active_rq"}}'
                    f" {n_503}") in metrics
        finally:
            server.stop()
            sidecar.stop()


def test_cli_needs_the_envoy_or_the_nginx_flags(tmp_path: Path) -> None:
    import subprocess
    import sys

    tuner = [sys.executable, "-m", "tuner.cli", "sidecar", "--tuning-dir", str(tmp_path),
             "--allow-unauthenticated"]
    nginx = subprocess.run(tuner, capture_output=True, text=True, timeout=60)
    assert nginx.returncode == 2 and "--render-dir, --nginx-pid, --error-log" in nginx.stderr
    envoy = subprocess.run([*tuner, "--envoy-admin", "http://127.0.0.1:9902"],
                           capture_output=True, text=True, timeout=60)
    assert envoy.returncode == 2 and "--envoy-cds FILE" in envoy.stderr
    bad = subprocess.run([*tuner, "--envoy-admin", "127.0.0.1:9902", "--envoy-cds",
                          str(tmp_path / "cds.json"), "--app-port", "3000"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "'127.0.0.1:9902' is not an http:// URL" in bad.stderr
