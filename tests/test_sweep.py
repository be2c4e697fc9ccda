"""Servers that close idle connections by a periodic sweep: the probe, its verdict and the
scan plan with the earliest age a sweep may close at, checked against staggered raw reuse
(tests/ground_truth.py), not against the probe itself."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tuner.analysis.closes import Observed, infer_close_rule
from tuner.analysis.verdict import judge, largest_safe_proxy_idle_s
from tuner.probe import STAGGER_GROWTH_RATE, STAGGER_MIN_SPACING_S, parse_target, probe
from tuner.scan import audit
from tuner.scan.dataplanes import IdleSetting
from tuner.scan.discovery import pod_targets
from tuner.scan.probing import ProbeJob, probe_one

from .foreign import serving
from .ground_truth import n_dropped
from .test_scan import backend, ingress, route_of

SWEEP_SERVER = Path(__file__).with_name("sweep_server.py")
#: the setting and the sweep period of the server under test: a sweep of several seconds
IDLE_MS = 2000
SWEEP_MS = 4000
TUNER = [sys.executable, "-m", "tuner.cli"]


def sweep_command(sweep_ms: int = SWEEP_MS) -> str:
    """An `--upstream-cmd` template for the sweeping server."""
    return f"{sys.executable} {SWEEP_SERVER} {{port}} {{idle_ms}} {sweep_ms}"


@pytest.fixture(scope="module")
def sweeping(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The sweeping server on an OS-chosen port, ready; its port."""
    with serving(sweep_command(), name="sweep-server", idle_s=IDLE_MS / 1000,
                 log_dir=tmp_path_factory.mktemp("sweep")) as port:
        yield port


# -- the rule from closes (pure) ------------------------------------------------------------
def _staggered_answers(until_s: float) -> list[float]:
    """The probe's answer instants: the samples at 0, then its stagger schedule."""
    answers = [0.0, 0.0, 0.0]
    at_s = STAGGER_MIN_SPACING_S
    while at_s < until_s:
        answers.append(at_s)
        at_s += max(STAGGER_MIN_SPACING_S, STAGGER_GROWTH_RATE * at_s)
    return answers


def _swept(answers: list[float], *, setting_s: float, period_s: float, phase_s: float
           ) -> list[Observed]:
    """What a sweeping server does to connections answered at `answers`, watched (as the
    probe does) until the second close instant."""
    def close_at(answered_s: float) -> float:
        k = max(0, int((answered_s + setting_s - phase_s) // period_s))
        while phase_s + k * period_s <= answered_s + setting_s:
            k += 1
        return phase_s + k * period_s
    closes = sorted({close_at(a) for a in answers})
    stop_s = closes[1] if len(closes) > 1 else closes[0]
    return [Observed(a, c if (c := close_at(a)) <= stop_s else None) for a in answers]


@given(setting_s=st.floats(0.5, 5.0), period_s=st.floats(0.5, 10.0),
       phase=st.floats(0.0, 0.999))
@example(setting_s=2.0, period_s=10.0, phase=0.99)  # the server, its late phase
@example(setting_s=2.0, period_s=4.0, phase=0.0)
def test_a_sweep_is_read_from_staggered_connections(setting_s: float, period_s: float,
                                                    phase: float) -> None:
    phase_s = phase * period_s
    first_close_s = phase_s + period_s * (1 + int((setting_s - phase_s) // period_s))
    # the probe staggers until the first close
    observed = _swept(_staggered_answers(first_close_s), setting_s=setting_s,
                      period_s=period_s, phase_s=phase_s)
    rule = infer_close_rule(observed)
    assert rule.closes_by_sweep
    assert rule.sweep_period_s == pytest.approx(period_s)
    assert rule.earliest_close_s is not None
    # never later than the setting, and no further below it than the stagger's spacing
    spacing_s = max(STAGGER_MIN_SPACING_S, STAGGER_GROWTH_RATE * period_s)
    assert setting_s - 2 * spacing_s <= rule.earliest_close_s <= setting_s + 1e-9
    # the samples alone saw one phase: anywhere up to a period late
    assert rule.youngest_close_s is not None and rule.youngest_close_s > setting_s


@given(close_s=st.floats(0.2, 120.0), jitter_ms=st.lists(st.integers(0, 5), min_size=30,
                                                         max_size=30))
@example(close_s=2.0, jitter_ms=[0] * 30)
def test_a_timer_per_connection_is_no_sweep(close_s: float, jitter_ms: list[int]) -> None:
    answers = _staggered_answers(close_s)[:30]
    observed = [Observed(a, a + close_s + j / 1000) for a, j in zip(answers, jitter_ms,
                                                                   strict=False)]
    rule = infer_close_rule(observed)
    assert not rule.closes_by_sweep and rule.sweep_period_s is None
    assert rule.earliest_close_s == pytest.approx(close_s + min(jitter_ms[:len(answers)]) / 1000)


def test_no_close_and_one_connection() -> None:
    assert infer_close_rule([]).earliest_close_s is None
    rule = infer_close_rule([Observed(0.0, None)])
    assert not rule.closes_by_sweep and rule.earliest_close_s is None
    assert infer_close_rule([Observed(0.0, 2.5)]).earliest_close_s == 2.5


# -- a real sweeping server -----------------------------------------------------------------
def test_ground_truth_of_the_sweeping_server(sweeping: int) -> None:
    """Staggered raw reuse: never dropped below the setting, dropped past it in about the
    share (D - setting) / period of connections, all at a sweep."""
    assert n_dropped(sweeping, idle_s=1.7, span_s=SWEEP_MS / 1000) == 0
    dropped = n_dropped(sweeping, idle_s=3.0, span_s=SWEEP_MS / 1000)
    assert 4 <= dropped <= 16, dropped  # expected 40 x 1 s / 4 s = 10


def test_the_probe_plans_with_the_sweep_and_its_advice_holds(sweeping: int) -> None:
    result = probe(parse_target(f"http://127.0.0.1:{sweeping}/"), n_samples=3, max_idle_s=20)
    assert result.closes_by_sweep, result.rule
    assert result.sweep_period_s is not None
    assert 3.8 <= result.sweep_period_s <= 4.2, result.rule
    earliest_s = result.earliest_close_s
    assert earliest_s is not None and 1.6 <= earliest_s <= 2.02, result.rule
    # the cost: one idle period and one sweep period, at most
    assert result.elapsed_s <= 2.0 + 2 * 4.0 + 1.0, result.elapsed_s
    document = result.as_json()
    assert document["closes_by_sweep"] is True
    assert document["sweep_period_s"] == pytest.approx(result.sweep_period_s, abs=1e-3)
    assert document["earliest_close_s"] == pytest.approx(earliest_s, abs=1e-3)

    unsafe = judge(proxy_idle_s=3.0, upstream_close_s=earliest_s, max_idle_s=20,
                   closes_by_sweep=True, sweep_period_s=result.sweep_period_s)
    assert unsafe.status == "unsafe" and "sweep" in unsafe.message
    advice_s = largest_safe_proxy_idle_s(earliest_s)
    assert advice_s is not None and advice_s <= 1.0
    assert judge(proxy_idle_s=advice_s, upstream_close_s=earliest_s,
                 max_idle_s=20).status == "safe"
    # the advice tried: connections kept that long are never dropped, at any phase
    assert n_dropped(sweeping, idle_s=advice_s, span_s=SWEEP_MS / 1000) == 0


def test_probe_cli_calls_a_setting_past_the_sweep_threshold_unsafe(sweeping: int) -> None:
    out = subprocess.run([*TUNER, "probe", f"http://127.0.0.1:{sweeping}/", "--samples", "3",
                          "--max-idle", "20s", "--proxy-idle", "3s", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 6, out.stderr
    document = json.loads(out.stdout)
    assert document["verdict"]["status"] == "unsafe"
    assert document["closes_by_sweep"] is True
    assert document["verdict"]["max_safe_proxy_idle_s"] <= 1.0
    text = subprocess.run([*TUNER, "probe", f"http://127.0.0.1:{sweeping}/", "--samples", "3",
                           "--max-idle", "20s", "--proxy-idle", "3s"],
                          capture_output=True, text=True, timeout=60)
    assert "SWEEP" in text.stdout and "plan with" in text.stdout, text.stdout


def test_scan_calls_a_pod_that_sweeps_unsafe_behind_a_longer_pool(sweeping: int) -> None:
    """The scan's real probe of a sweeping pod, judged by the scan's own audit: a 3 s pool
    waits long enough for a sweep that is due after the pod looked safe."""
    route = route_of(ingress("web", "web"))
    [target], _ = pod_targets([route], backend("web", [("p", "rs", "127.0.0.1")]))
    plan = audit.plan(target, IdleSetting("ingress-nginx", 3.0, "x"), max_idle_s=120)
    assert plan.max_idle_s >= 3.0 + 1 + SWEEP_MS / 1000
    outcome = probe_one(ProbeJob(0, f"http://127.0.0.1:{sweeping}/", "", plan.max_idle_s),
                        n_samples=3, answer_timeout_s=2.0)
    found = audit.finding(plan, outcome)
    assert found.closes_by_sweep and found.verdict == "unsafe", found
    assert found.upstream_close_s is not None and found.upstream_close_s <= 2.02


@pytest.mark.slow
def test_experiment_and_recommendation_on_a_sweeping_server(tmp_path: Path,
                                                             sweeping: int) -> None:
    """The whole experiment through real nginx: the cell past the sweep's threshold is
    unsafe by the mechanism (no burst met a sweep), the cell below it safe, and the
    recommendation, tried by staggered raw reuse against the same server, drops nothing."""
    db = tmp_path / "sweep.db"
    out = subprocess.run([*TUNER, "experiment", "--proxy", "nginx", "--upstream-cmd",
                          sweep_command(), "--proxy-idle", "800ms,3s", "--upstream-idle", "2s",
                          "--db", str(db), "--json"], capture_output=True, text=True,
                         timeout=400)
    assert out.returncode == 0, out.stderr
    trials = {("control" if t["control"] else t["proxy_idle_s"]): t
              for t in json.loads(out.stdout)["trials"]}
    for trial in trials.values():
        assert trial["closes_by_sweep"] is True, trial
        assert 1.6 <= trial["upstream_close_s"] <= 2.02, trial
    assert trials[3.0]["verdict"] == "unsafe" and "sweep" in trials[3.0]["verdict_text"]
    assert trials[0.8]["verdict"] == "safe", trials[0.8]
    assert "rest on the mechanism" in trials[0.8]["verdict_text"]
    rec = subprocess.run([*TUNER, "recommend", str(db), "--json"], capture_output=True,
                         text=True, timeout=60)
    assert rec.returncode == 0, rec.stdout + rec.stderr
    advice = json.loads(rec.stdout)
    assert advice["status"] == "ok" and advice["proxy_idle_s"] <= 1.0, advice
    assert n_dropped(sweeping, idle_s=advice["proxy_idle_s"], span_s=SWEEP_MS / 1000) == 0
