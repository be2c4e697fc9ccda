"""Locust's master and workers, conducted together, against the real lab (issue 12): every
worker fires each burst at the master's instant, every answer is counted once, and the
precision fields measure the burst over every process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tuner.lab import Lab, get_upstream
from tuner.load.locust_runner import LocustPlan, run_locust

pytestmark = pytest.mark.race

TUNER = [sys.executable, "-m", "tuner.cli"]


def test_two_workers_send_every_burst_and_count_every_answer() -> None:
    # nginx keeps idle connections 3 s, Node closes them at about 2.0 s: the race
    with Lab(proxy="nginx", upstream=get_upstream("node"), proxy_idle_s=3,
             upstream_idle_s=1) as lab:
        assert lab.proxy is not None
        results = run_locust(LocustPlan(host_url=lab.proxy.url, gaps_s=[1.995, 2.0, 2.005],
                                        burst_size=30, workers=2, max_seconds=30,
                                        sweep="groups"),
                             workdir=lab.workdir)
    assert results["n_processes"] == 2, results  # each burst was reported by both workers
    assert results["n_bursts"] >= 2, results
    # every user answered every burst, none twice (a late answer counts with the next report)
    assert results["n_requests"] == 30 * results["n_bursts"], results
    assert sum(sum(c.values()) for c in results["by_gap"].values()) == results["n_requests"]
    # the run ended by the stop rule, not by its budget or an error; whether this short run
    # caught a race is not asserted: the groups sweep catches it at 0-5 % per reused request,
    # and not in every run (README, "Production timeouts"), so the stop rule may say "safe"
    # here (the experiment's judge then says unsafe by the mechanism rule: the next test)
    assert results["stop_reason"] in ("unsafe", "safe"), results
    # one spread per burst and group of the sweep, measured over both workers
    assert len(results["burst_spread_ms"]) == 3 * results["n_bursts"]
    assert len(results["gap_error_ms"]) == 3 * (results["n_bursts"] - 1)
    assert results["n_cycles"] == results["n_bursts"] - 1  # every burst tried every gap


@pytest.mark.slow
def test_experiment_with_workers_gives_verdicts(tmp_path: Path) -> None:
    db = tmp_path / "w.db"
    result = subprocess.run([*TUNER, "experiment", "--proxy", "nginx", "--upstream", "node",
                             "--proxy-idle", "1s,3s", "--upstream-idle", "1s", "--workers", "2",
                             "--burst-size", "60", "--max-seconds", "40", "--db", str(db),
                             "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    trials = json.loads(result.stdout)["trials"]
    assert len(trials) == 3
    for trial in trials:
        assert trial["verdict"] != "invalid", trial
        assert trial["n_requests"] == 60 * trial["n_bursts"], trial
        assert trial["burst_spread_ms_median"] is not None, trial
        assert trial["gap_error_ms_p95"] is not None, trial
        if trial["control"] or trial["proxy_idle_s"] == 3:
            assert trial["verdict"] == "unsafe", trial
        else:
            assert trial["n_failed"] == 0, trial
            # safe, or honestly inconclusive: a busy machine can loosen the bursts
            assert trial["verdict"] in ("safe", "inconclusive"), trial
