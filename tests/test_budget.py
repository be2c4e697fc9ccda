"""Budgets counted in idle periods of the upstream's close (pure), and a budget that cannot
reach any verdict refused before anything starts."""

from __future__ import annotations

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
                                          r"least 26s; give max_seconds 206s or more"):
        check_grid(spec)
    check_grid(parse_spec({"upstream_idle": "19s"}))  # the default follows the close
    with pytest.raises(ConfigError, match="max_requests 50 cannot reach any verdict"):
        check_grid(parse_spec({"max_requests": 50}))
    with pytest.raises(ConfigError, match="burst_size 5 is below the 7 gaps"):
        check_grid(parse_spec({"burst_size": 5, "sweep": "groups"}))
    check_grid(parse_spec({"burst_size": 5}))  # one gap per burst: any burst covers it
