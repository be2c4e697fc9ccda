"""Whole experiments through real proxies in front of servers we never wrote: embedded Tomcat
11 (Spring Boot's server; a 1 s sweep) behind nginx and HAProxy, Go net/http (a timer per
connection) behind nginx. Each grid has a cell past the server's close and one below it by the
margin; the recommendation is then tried by staggered raw reuse against the same server
(tests/ground_truth.py), not by the probe. Slow: a grid with its control takes 1-2 min."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .foreign import go_cmd, serving, tomcat_cmd
from .ground_truth import n_dropped

TUNER = [sys.executable, "-m", "tuner.cli"]
IDLE_S = 2.0


def _experiment(tmp_path: Path, *, proxy: str, template: str, proxy_idle: str,
                extra: tuple[str, ...] = ()
                ) -> tuple[dict[object, dict[str, object]], dict[str, object]]:
    """Run the grid (proxy idle values x IDLE_S) with its control; the trials by proxy idle
    ("control" for the control) and `tuner recommend --json`'s document."""
    db = tmp_path / "foreign.db"
    out = subprocess.run([*TUNER, "experiment", "--proxy", proxy, "--upstream-cmd", template,
                          "--proxy-idle", proxy_idle, "--upstream-idle", f"{IDLE_S:g}s",
                          "--db", str(db), "--json", *extra],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    # the preflight: straight to the upstream and through the proxy, both served
    assert "POST straight to the upstream http://127.0.0.1:" in out.stderr
    assert re.search(r": 200( OK)?, kept the connection", out.stderr), out.stderr
    assert f"POST through {proxy} http://127.0.0.1:" in out.stderr
    trials = {("control" if t["control"] else t["proxy_idle_s"]): t
              for t in json.loads(out.stdout)["trials"]}
    for trial in trials.values():
        assert trial["n_unserved"] == 0 and trial["statuses"].get("200", 0) > 0, trial
    rec = subprocess.run([*TUNER, "recommend", str(db), "--json"], capture_output=True,
                         text=True, timeout=60)
    assert rec.returncode == 0, rec.stdout + rec.stderr
    return trials, json.loads(rec.stdout)


def _kept_s(advice: dict[str, object]) -> float:
    """How long the recommended setting keeps idle connections: the setting times the
    proxy's measured lifetime ratio (HAProxy keeps them several times its setting)."""
    return float(advice["proxy_idle_s"]) * float(advice["proxy_lifetime_ratio"])  # type: ignore[arg-type]


def _tried(tmp_path: Path, template: str, proxy_idle_s: float, *, span_s: float) -> int:
    """The recommendation tried: connections kept `proxy_idle_s` idle, at every phase."""
    with serving(template, name="tried", log_dir=tmp_path, idle_s=IDLE_S) as port:
        return n_dropped(port, idle_s=proxy_idle_s, span_s=span_s)


@pytest.mark.slow
@pytest.mark.parametrize(("proxy", "proxy_idle"), [
    # the lower cell at or above what recommend can advise (0.8-0.9 s), so it is evidence
    ("nginx", "900ms,3s"),
    # HAProxy keeps idle connections several times its pool-purge-delay (300ms lived 2.4 s
    # here, past Tomcat's close): 100ms lives well under a second
    ("haproxy", "100ms,3s")])
def test_tomcat_gets_right_verdicts_and_a_recommendation_that_holds(
        tmp_path: Path, proxy: str, proxy_idle: str) -> None:
    trials, advice = _experiment(tmp_path, proxy=proxy, template=tomcat_cmd(),
                                 proxy_idle=proxy_idle)
    low_s = min(k for k in trials if k != "control")
    for trial in trials.values():  # Tomcat's NIO poller checks timeouts once a second
        assert trial["closes_by_sweep"] is True, trial
        assert 1.8 <= trial["upstream_close_s"] <= 2.05, trial
    assert trials[3.0]["verdict"] == "unsafe", trials[3.0]
    assert trials[low_s]["verdict"] == "safe", trials[low_s]
    assert advice["status"] == "ok" and _kept_s(advice) <= 1.0, advice
    assert _tried(tmp_path, tomcat_cmd(), _kept_s(advice), span_s=1.0) == 0
    # and past the setting the same reuse drops: the ground truth can fail
    assert _tried(tmp_path, tomcat_cmd(), 2.6, span_s=1.0) > 0


@pytest.mark.slow
def test_go_net_http_gets_right_verdicts_and_a_recommendation_that_holds(
        tmp_path: Path) -> None:
    # Without the control: it missed here once (0 races in 570 reused requests) while the
    # 3s cell, the same setting, caught 13 in 450; that is issue 20's open question, and a
    # missed control would make the safe cell inconclusive. The 3s cell's race shows the load.
    trials, advice = _experiment(tmp_path, proxy="nginx", template=go_cmd(),
                                 proxy_idle="1s,3s", extra=("--no-control",))
    for trial in trials.values():  # a timer per connection: IdleTimeout to the millisecond
        assert trial["closes_by_sweep"] is False, trial
        assert 1.95 <= trial["upstream_close_s"] <= 2.1, trial
    assert trials[3.0]["verdict"] == "unsafe" and trials[3.0]["n_race"] >= 1, trials[3.0]
    assert trials[1.0]["verdict"] == "safe", trials[1.0]
    assert advice["status"] == "ok" and _kept_s(advice) <= 1.01, advice
    assert _tried(tmp_path, go_cmd(), _kept_s(advice), span_s=1.0) == 0
    assert _tried(tmp_path, go_cmd(), 2.3, span_s=1.0) == 40
