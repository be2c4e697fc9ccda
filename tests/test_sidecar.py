"""`tuner sidecar` against a real local nginx (in front of Node), as a process of its own."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tuner.analysis.signatures import n_races
from tuner.load.bursts import BurstPlan, run_bursts, straddling_gaps
from tuner.probe import parse_target, probe

from .conftest import FIRST_TUNING, Pod, start_pod


def set_tuning(pod: Pod, **keys: str) -> None:
    """Change the mounted ConfigMap, one file per key (underscores become dashes)."""
    for key, value in keys.items():
        (pod.workdir / "tuning" / key.replace("_", "-")).write_text(value)


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[Pod]:
    tuning = tmp_path / "tuning"
    tuning.mkdir()
    for key, value in FIRST_TUNING.items():
        (tuning / key).write_text(value)
    with start_pod(tmp_path, ["--tuning-dir", str(tuning)]) as started:
        yield started


@pytest.mark.race
def test_log_counters_match_the_502s_of_a_race_hunting_load(pod: Pod) -> None:
    pod.wait_generation("1")
    before = pod.status()
    plan = BurstPlan(url=f"{pod.nginx_url}/orders", burst_size=30, n_bursts=12, max_seconds=35,
                     gaps_s=straddling_gaps(2.0, below_s=0.01, above_s=0.01, n_steps=11))
    report = run_bursts(plan)
    assert report.counts.n_502 >= 1
    mark = int(str(before["log_offset"]))

    def counted() -> dict[str, int]:
        since = pod.status(since=mark)["signatures_since"]
        assert isinstance(since, dict)
        return since
    # nginx writes its error lines as it answers; the sidecar counts every 100 ms
    deadline = time.monotonic() + 5
    while n_races(since := counted()) < report.counts.n_502 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert n_races(since) == report.counts.n_502  # one [error] line per POST that got 502

    def metrics_total() -> tuple[str, int]:
        metrics = httpx.get(f"{pod.sidecar_url}/metrics").text
        return metrics, sum(int(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                            if line.startswith("tuner_proxy_log_signatures_total")
                            and 'kind="connect_refused"' not in line)
    deadline = time.monotonic() + 5
    while (got := metrics_total())[1] < report.counts.n_502 and time.monotonic() < deadline:
        time.sleep(0.05)
    metrics, total = got
    assert 'tuner_setting_seconds{setting="upstream-keepalive-timeout"} 60' in metrics
    assert total == report.counts.n_502


def test_a_changed_tuning_is_rendered_reloaded_and_measurable(pod: Pod) -> None:
    pod.wait_generation("1")
    set_tuning(pod, keep_alive="1500ms", generation="2")
    status = pod.wait_generation("2")
    assert status["error"] is None and status["reloads"] == 2
    measured = probe(parse_target(f"{pod.nginx_url}/"), n_samples=3, max_idle_s=10)
    assert measured.idle_close_s is not None and 1.4 < measured.idle_close_s < 1.9

    set_tuning(pod, upstream_keepalive_timeout="forever", generation="3")
    deadline = time.monotonic() + 5
    while not (status := pod.status())["error"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status["generation"] == "2"  # the last good tuning stays in force
    assert "upstream-keepalive-timeout: 'forever' is not a duration" in str(status["error"])
    assert "tuner_tuning_error 1" in httpx.get(f"{pod.sidecar_url}/metrics").text
    assert json.loads(json.dumps(status))  # JSON all the way


def test_probe_measures_the_app_beside_it(pod: Pod) -> None:
    answer = httpx.get(f"{pod.sidecar_url}/probe?samples=2&max_idle=10s", timeout=30)
    assert answer.status_code == 200
    measured = answer.json()
    assert measured["advertised_s"] == 1.0  # Node, keepAliveTimeout 1000 ms
    assert 1.9 < measured["earliest_close_s"] < 2.3
    bad = httpx.get(f"{pod.sidecar_url}/probe?max_idle=forever", timeout=10)
    assert bad.status_code == 400 and "max_idle" in bad.json()["error"]
    # the app down is the sidecar's gateway failing, not a bad request: 502, and the
    # cluster runner fails that one trial instead of the experiment
    pod.app.stop()
    down = httpx.get(f"{pod.sidecar_url}/probe?samples=1&max_idle=5s", timeout=30)
    assert down.status_code == 502 and "cannot connect" in down.json()["error"]
