"""A trial's verdict (pure): the mechanism before the count, hidden races, the load's aim,
the positive control. Property tests with the edge cases the issue measured."""

from __future__ import annotations

import dataclasses

from hypothesis import example, given
from hypothesis import strategies as st

from tuner.analysis.judge import (
    MAX_BURST_SPREAD_MS,
    Control,
    judge_trial,
    n_in_window,
    p95,
)
from tuner.analysis.stopping import StopRule
from tuner.trial import Trial

RULE = StopRule()
GAPS = tuple(round(1.991 + 0.003 * i, 3) for i in range(7))
RACED = Control(True, "the control raced")


def _trial(*, proxy_idle_s: float, close_s: float = 2.0, n_reused: int = 330,
           n_502: int = 0, log_races: int = 0, spread_ms: float | None = 4.0,
           in_window: int | None = 40, lifetime_s: float | None = None,
           n_bursts: int = 12) -> Trial:
    return Trial(proxy="nginx", upstream="node", proxy_idle_s=proxy_idle_s,
                 upstream_idle_s=1.0, upstream_close_s=close_s, proxy_lifetime_s=lifetime_s,
                 outcomes={"2xx": n_reused + 30 - n_502, "502": n_502}, n_reused=n_reused,
                 n_bursts=n_bursts, gaps_s=GAPS, n_proxy_log_races=log_races,
                 burst_spread_ms_p95=spread_ms, burst_spread_ms_median=spread_ms,
                 n_in_window=in_window)


@given(st.floats(min_value=0.0, max_value=30.0), st.integers(min_value=0, max_value=100_000))
@example(0.0, 330)  # nginx 2s vs a 2.0 s close: "safe" in a fresh-clone test run
@example(1.0, 330)
def test_no_count_makes_a_proxy_past_the_close_safe(past_s: float, n_reused: int) -> None:
    trial = _trial(proxy_idle_s=2.0 + past_s, n_reused=n_reused)
    judged = judge_trial(trial, rule=RULE, control=RACED)
    assert judged.verdict == "unsafe"
    assert judged.verdict_text is not None
    assert f"no race in {n_reused} requests" in judged.verdict_text
    assert judged.margin_s is not None
    assert f"{-judged.margin_s:.1f} s past the measured close" in judged.verdict_text


def test_a_few_ms_before_the_close_is_at_the_close() -> None:
    # nginx 2s measured 2.001 s in front of a close measured 2.002 s
    judged = judge_trial(_trial(proxy_idle_s=2.0, close_s=2.002, lifetime_s=2.001), rule=RULE,
                         control=RACED)
    assert judged.verdict == "unsafe" and "1 ms before the measured close" in (
        judged.verdict_text or "")


def test_the_measured_lifetime_decides_not_the_setting() -> None:
    # HAProxy 500 ms kept connections up to 3.0 s, past a 1.5 s close
    trial = _trial(proxy_idle_s=0.5, close_s=1.5, lifetime_s=3.0)
    judged = judge_trial(trial, rule=RULE, control=RACED)
    assert judged.verdict == "unsafe" and "measured idle lifetime" in (judged.verdict_text or "")
    assert judge_trial(dataclasses.replace(trial, proxy_lifetime_s=None), rule=RULE,
                       control=RACED).verdict == "safe"


def test_races_the_proxy_hid_are_races() -> None:
    # --methods GET: nginx retried every raced GET; the client saw 0 failures
    judged = judge_trial(_trial(proxy_idle_s=3.0, log_races=25), rule=RULE, control=RACED)
    assert judged.verdict == "unsafe" and judged.n_race == 25 and judged.n_hidden_races == 25
    assert "25 of them hidden from the client" in (judged.verdict_text or "")
    # a POST that failed also left its line: counted once, not twice
    both = _trial(proxy_idle_s=3.0, n_502=4, log_races=4)
    assert both.n_race == 4 and both.n_hidden_races == 0


def test_safe_reads_as_a_bound_and_names_a_thin_margin() -> None:
    judged = judge_trial(_trial(proxy_idle_s=1.7, n_reused=330), rule=RULE, control=RACED)
    assert judged.verdict == "safe"
    assert judged.verdict_text is not None
    assert "no race in 330 reused requests; rate < 0.90% (95 %)" in judged.verdict_text
    assert judged.verdict_text.startswith("safe here; margin 0.300 s is below the 1 s")
    wide = judge_trial(_trial(proxy_idle_s=0.5), rule=RULE, control=RACED)
    assert wide.verdict == "safe" and "safe here" not in (wide.verdict_text or "")


@given(st.floats(min_value=MAX_BURST_SPREAD_MS + 0.01, max_value=500))
def test_loose_bursts_are_never_safe(spread_ms: float) -> None:
    judged = judge_trial(_trial(proxy_idle_s=0.5, spread_ms=spread_ms), rule=RULE,
                         control=RACED)
    assert judged.verdict == "inconclusive"
    assert f"burst spread median {spread_ms:.0f} ms" in (judged.verdict_text or "")


def test_a_control_that_did_not_race_forbids_safe() -> None:
    control_trial = _trial(proxy_idle_s=3.1, spread_ms=14.0)
    control = Control.of(control_trial)
    assert control.raced is False and "burst spread median 14 ms" in control.text
    judged = judge_trial(_trial(proxy_idle_s=0.5), rule=RULE, control=control)
    assert judged.verdict == "inconclusive"
    assert "the load could not reproduce the race here" in (judged.verdict_text or "")
    # races are still races
    assert judge_trial(_trial(proxy_idle_s=0.5, n_502=3), rule=RULE,
                       control=control).verdict == "unsafe"
    invalid = Control.of(dataclasses.replace(control_trial, invalid_reason="nginx died"))
    assert invalid.raced is False


def test_skipping_the_control_is_said() -> None:
    judged = judge_trial(_trial(proxy_idle_s=0.5), rule=RULE,
                         control=Control.of(None, skipped=True))
    assert judged.verdict == "safe" and "--no-control" in (judged.verdict_text or "")


def test_too_few_requests_or_none_in_the_window_is_inconclusive() -> None:
    short = judge_trial(_trial(proxy_idle_s=0.5, n_reused=120), rule=RULE, control=RACED)
    assert short.verdict == "inconclusive" and "short of the 300" in (short.verdict_text or "")
    missed = judge_trial(_trial(proxy_idle_s=0.5, in_window=0), rule=RULE, control=RACED)
    assert missed.verdict == "inconclusive"


def test_an_invalid_trial_stays_invalid() -> None:
    trial = dataclasses.replace(_trial(proxy_idle_s=0.5), invalid_reason="nginx died")
    assert judge_trial(trial, rule=RULE, control=RACED).verdict == "invalid"


def test_precision_figures() -> None:
    assert p95([]) is None
    assert p95([float(i) for i in range(1, 101)]) == 95.0
    assert p95([7.0]) == 7.0
    idle = {"1998": 3, "1999": 4, "2002": 5, "2003": 9, "1990": 1}
    assert n_in_window(idle, 2.0008) == 4 + 5  # 1998.8..2002.8 ms
    assert n_in_window(idle, None) is None


def test_the_record_round_trips_through_json() -> None:
    trial = judge_trial(_trial(proxy_idle_s=3.0, log_races=2, lifetime_s=3.002), rule=RULE,
                        control=RACED)
    document = trial.to_json()
    assert document["n_race"] == 2 and document["burst_spread_ms_p95"] == 4.0
    assert document["margin_s"] == trial.margin_s
    assert Trial.from_json(document) == trial
    # a record of an older version: the new fields read as not measured
    old = {"proxy_idle_s": 2.0, "upstream_idle_s": 1.0, "verdict": "safe", "n_502": 0,
           "outcomes": {"2xx": 90}, "gaps_s": [1.99, 2.0]}
    read = Trial.from_json(old)
    assert read.burst_spread_ms_p95 is None and read.proxy_lifetime_s is None
    assert read.n_requests == 90 and not read.control


def test_a_margin_just_under_the_rule_reads_as_under_it() -> None:
    # the demo's first screen said "margin 1 s is below the 1 s we recommend" (0.9996 s)
    judged = judge_trial(_trial(proxy_idle_s=1.0004), rule=RULE, control=RACED)
    assert judged.verdict == "safe"
    assert (judged.verdict_text or "").startswith("safe here; margin 0.999 s is below the 1 s")


def test_a_sweeping_upstream_rests_on_the_mechanism() -> None:
    """A control that missed a sweep's race proves nothing: past the sweep's threshold is
    unsafe, below it by the margin is safe on the cell's own load."""
    swept = dict(closes_by_sweep=True, sweep_period_s=4.0)
    control = _trial(proxy_idle_s=3.0, close_s=1.95).with_(control=True, **swept)
    verdict = Control.of(control)
    assert verdict.raced is None and "sweep, every 4.0 s" in verdict.text
    past = judge_trial(_trial(proxy_idle_s=3.0, close_s=1.95).with_(**swept), rule=RULE,
                       control=verdict)
    assert past.verdict == "unsafe" and "a race whenever a burst meets a sweep" in (
        past.verdict_text or "")
    below = judge_trial(_trial(proxy_idle_s=0.5, close_s=1.95).with_(**swept), rule=RULE,
                        control=verdict)
    assert below.verdict == "safe" and "rest on the mechanism" in (below.verdict_text or "")
    # without a sweep, the same missed control voids the safe cell
    missed = Control.of(control.with_(closes_by_sweep=False))
    assert missed.raced is False
    assert judge_trial(_trial(proxy_idle_s=0.5), rule=RULE,
                       control=missed).verdict == "inconclusive"
