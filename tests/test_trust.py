"""A safe verdict only when the load could have seen the race: real nginx in front of real
Node on 127.0.0.1, with bursts loosened on purpose (the test-only `loosen_ms`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TUNER = [sys.executable, "-m", "tuner.cli"]


@pytest.mark.race
@pytest.mark.slow
def test_loose_bursts_never_give_a_safe_verdict(tmp_path: Path) -> None:
    # nginx 1s in front of Node closing at 2.0 s is safe; with every request of a burst
    # delayed by a random 0-30 ms, the load cannot aim at the race window, and says so
    spec = tmp_path / "loose.yaml"
    spec.write_text("proxy: nginx\nupstream: node\nproxy_idle: [1s]\nupstream_idle: [1s]\n"
                    "max_seconds: 30\nloosen_ms: 30\n")
    db = tmp_path / "loose.db"
    result = subprocess.run([*TUNER, "experiment", str(spec), "--db", str(db), "--json"],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    trials = json.loads(result.stdout)["trials"]
    [control] = [t for t in trials if t["control"]]
    [cell] = [t for t in trials if not t["control"]]
    assert cell["verdict"] != "safe", cell["verdict_text"]
    assert cell["burst_spread_ms_median"] > 15, cell  # measured, not assumed
    assert cell["verdict"] == "inconclusive"
    assert "burst spread median" in cell["verdict_text"] or "control" in cell["verdict_text"]
    recommended = subprocess.run([*TUNER, "recommend", str(db), "--json"],
                                 capture_output=True, text=True, timeout=60)
    document = json.loads(recommended.stdout)
    assert recommended.returncode == 8 and document["status"] != "ok"
    if control["n_race"] == 0:
        assert document["status"] == "no_control" and document["control_raced"] is False
