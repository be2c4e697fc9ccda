"""Budgets counted in idle periods of the upstream's close (pure), and a budget that cannot
reach any verdict refused before anything starts."""

from __future__ import annotations

import dataclasses

import pytest

from tuner.analysis.budget import default_budget, least_budget_s, safe_bursts
from tuner.analysis.stopping import StopRule
from tuner.errors import ConfigError
from tuner.experiment.runner import check_grid
from tuner.experiment.spec import parse_spec


def test_default_budget_follows_the_close() -> None:
    rule = StopRule()
    at_20 = default_budget(close_s=20.0, burst_size=150, n_gaps=7, sweep="groups", rule=rule)
    assert (at_20.n_periods, at_20.n_safe_bursts) == (3, 2)
    assert at_20.max_seconds == pytest.approx(3 * 21 + 6)
    at_60 = default_budget(close_s=60.0, burst_size=150, n_gaps=7, sweep="groups", rule=rule)
    assert at_60.max_seconds == pytest.approx(3 * 61 + 6)
    # small bursts need more periods for a safe verdict; one gap per burst needs a cycle
    assert safe_bursts(burst_size=30, n_gaps=7, sweep="groups", rule=rule) == 10
    assert safe_bursts(burst_size=300, n_gaps=7, sweep="bursts", rule=rule) == 7
    assert safe_bursts(burst_size=300, n_gaps=7, sweep="groups", rule=rule) == 1
    assert least_budget_s(20.0) == 27.0
    # at short closes periods are cheap: never below 40 s, more bursts are more chances
    assert default_budget(close_s=2.0, burst_size=150, n_gaps=7, sweep="groups",
                          rule=rule).max_seconds == 40.0


def test_a_budget_too_small_for_any_verdict_is_refused_up_front() -> None:
    spec = parse_spec({"upstream_idle": "19s", "max_seconds": "20s"})
    with pytest.raises(ConfigError, match=r"max_seconds 20s cannot reach any verdict.*at "
                                          r"least 26s; give max_seconds 66s or more"):
        check_grid(spec)
    check_grid(parse_spec({"upstream_idle": "19s"}))  # the default follows the close
    with pytest.raises(ConfigError, match="max_requests 50 cannot reach any verdict"):
        check_grid(parse_spec({"max_requests": 50}))
    with pytest.raises(ConfigError, match="burst_size 5 is below the 7 gaps"):
        check_grid(parse_spec({"burst_size": 5, "sweep": "groups"}))
    check_grid(parse_spec({"burst_size": 5}))  # one gap per burst: any burst covers it


def test_the_load_holds_more_connections_when_periods_are_long() -> None:
    from tuner.analysis.budget import LoadShape, load_shape

    assert load_shape(2.0) == LoadShape(burst_size=30, gap_steps=7)
    assert load_shape(4.49) == LoadShape(burst_size=30, gap_steps=7)
    assert load_shape(4.5) == LoadShape(burst_size=100, gap_steps=3)
    # what the user gave wins, each value on its own
    assert load_shape(20.0, burst_size=30) == LoadShape(burst_size=30, gap_steps=3)
    assert load_shape(2.0, gap_steps=5) == LoadShape(burst_size=30, gap_steps=5)
    rule = StopRule()
    # a safe verdict: 10 reused bursts at a short close, 3 at a long one
    assert safe_bursts(burst_size=30, n_gaps=7, sweep="bursts", rule=rule) == 10
    assert safe_bursts(burst_size=100, n_gaps=3, sweep="bursts", rule=rule) == 3
    # the trial's gaps, budget and plan agree on the shape
    from tuner.experiment.trials import gaps_for, load_plan, trial_budget

    spec = parse_spec({"upstream_idle": "19s"})
    gaps = gaps_for(spec, 20.001, max_idle_s=62)
    # from 9 ms below the close to the close: no burst is spent past it
    # the likeliest to race first: the middle of the span, then the close
    assert gaps == [19.9965, 20.001, 19.992]
    budget = trial_budget(spec, gaps, 20.001)
    assert budget is not None and budget.n_safe_bursts == 3
    assert load_plan(spec, "http://127.0.0.1:1", gaps, close_s=20.001).burst_size == 100
    short = gaps_for(spec, 2.0, max_idle_s=10)
    assert short == [1.9955, 1.997, 1.994, 1.9985, 1.9925, 2.0, 1.991]
    assert load_plan(spec, "http://127.0.0.1:1", short, close_s=2.0).burst_size == 30
    # a half width the user gave sweeps both sides; the shape still follows the close
    symmetric = parse_spec({"upstream_idle": "3s", "gap_half_width": "9ms"})
    gaps = gaps_for(symmetric, 4.495, max_idle_s=14)
    assert len(gaps) == 7 and min(gaps) == 4.486 and max(gaps) == 4.504
    assert load_plan(symmetric, "http://127.0.0.1:1", gaps, close_s=4.495).burst_size == 30


def test_every_load_the_close_can_give_is_checked_up_front() -> None:
    # Node closes a second after its setting: 4 s closes at 5 s, where bursts hold 100 users
    with pytest.raises(ConfigError, match=r"max_requests 100 .*first burst \(100\).*give "
                                          r"max_requests 200"):
        check_grid(parse_spec({"upstream_idle": "4s", "max_requests": 100}))
    check_grid(parse_spec({"upstream_idle": "4s", "max_requests": 200}))
    check_grid(parse_spec({"upstream_idle": "2s", "max_requests": 60}))


def test_a_cluster_rerun_with_a_newer_image_finds_its_experiment() -> None:
    from tuner.experiment.cluster_runner import spec_digest

    # the ledger of a Job that ran before the load followed the close stored the digest of
    # the defaults of then
    before = dataclasses.replace(parse_spec({}), burst_size=30, gap_steps=7,
                                 gap_half_width_s=0.009)
    assert spec_digest(parse_spec({})) == spec_digest(before)
    assert spec_digest(parse_spec({"burst_size": 100})) != spec_digest(before)
