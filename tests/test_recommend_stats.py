"""Statistics and the recommendation (pure): property tests with the edge cases."""

from __future__ import annotations

import importlib
import itertools
from typing import Any

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from tuner.analysis.intervals import binomial_cdf, clopper_pearson, upper_bound
from tuner.analysis.recommend import fit_monotone, recommend, requests_needed
from tuner.trial import Trial


@pytest.fixture(autouse=True, scope="module")
def _scipy_loaded() -> None:
    """tuner imports scipy on first use (0.3-0.6 s): hypothesis' 200 ms deadline is meant
    for the statistics, not for that import."""
    for module in ("scipy.special", "scipy.optimize"):
        importlib.import_module(module)


@st.composite
def counts(draw: st.DrawFn) -> tuple[int, int]:
    n = draw(st.integers(min_value=0, max_value=5000))
    return draw(st.integers(min_value=0, max_value=n)), n


@given(counts())
@example((0, 0))       # zero requests
@example((0, 1))
@example((7, 7))       # all failed
@example((0, 5000))
def test_intervals_contain_the_estimate_and_stay_in_0_1(kn: tuple[int, int]) -> None:
    k, n = kn
    low, high = clopper_pearson(k, n)
    assert 0.0 <= low <= high <= 1.0
    if n:
        assert low <= k / n <= high
        assert upper_bound(k, n) >= k / n
    else:
        assert (low, high) == (0.0, 1.0)


def test_known_values() -> None:
    low, high = clopper_pearson(0, 10)
    assert low == 0.0 and high == pytest.approx(0.30850, abs=1e-4)
    assert clopper_pearson(5, 10) == pytest.approx((0.18709, 0.81291), abs=1e-4)
    assert upper_bound(0, 300) == pytest.approx(3 / 300, rel=0.01)  # the rule of three
    assert binomial_cdf(2, 10, 0.5) == pytest.approx(56 / 1024)
    assert requests_needed(0.01) == 300


def _record(proxy_idle_s: float, close_s: float, *, n_reused: int, n_race: int,
            upstream_idle_s: float = 1.0, verdict: str | None = None,
            outcomes: dict[str, int] | None = None, invalid_reason: str | None = None) -> Trial:
    return Trial(proxy="nginx", upstream="node", proxy_idle_s=proxy_idle_s,
                 upstream_idle_s=upstream_idle_s, upstream_close_s=close_s, n_reused=n_reused,
                 outcomes=outcomes or {"2xx": n_reused - n_race, "502": n_race},
                 verdict=verdict or ("unsafe" if n_race else "safe"),
                 invalid_reason=invalid_reason)


closes = st.floats(min_value=1.5, max_value=120, allow_nan=False)


@given(closes, st.integers(min_value=0, max_value=2000), st.integers(min_value=1, max_value=50))
@example(2.0, 240, 5)
@example(2.0, 0, 1)
def test_recommended_proxy_idle_is_below_the_close_minus_the_margin(
        close_s: float, n_safe: int, n_race: int) -> None:
    records = [_record(close_s + 1, close_s, n_reused=200, n_race=n_race)]
    safe_idle_s = max(0.1, close_s - 2)
    records.append(_record(safe_idle_s, close_s, n_reused=n_safe, n_race=0))
    rec = recommend(records, upstream_idle_setting_s=1.0)
    assert rec.upstream_close_s == close_s
    if rec.proxy_idle_s is not None:
        assert rec.proxy_idle_s <= close_s - rec.margin_s + 1e-9
    assert rec.unsafe and rec.unsafe[0]["proxy_idle_s"] == close_s + 1
    if rec.status == "ok":
        assert rec.evidence is not None and rec.evidence.upper_rate <= 0.02
    else:
        assert rec.more_load is not None and "more" in rec.more_load


@given(st.integers(min_value=0, max_value=3000), st.integers(min_value=0, max_value=3000))
def test_more_race_free_evidence_never_weakens_the_recommendation(a: int, b: int) -> None:
    low, high = sorted((a, b))
    def rec_for(n: int) -> Any:
        return recommend([_record(1.0, 2.0, n_reused=n, n_race=0),
                          _record(3.0, 2.0, n_reused=60, n_race=5)],
                         upstream_idle_setting_s=1.0)
    weak, strong = rec_for(low), rec_for(high)
    assert not (weak.status == "ok" and strong.status != "ok")
    if weak.evidence and strong.evidence:
        assert strong.evidence.upper_rate <= weak.evidence.upper_rate


@given(st.lists(st.tuples(st.floats(min_value=-5, max_value=5, allow_nan=False),
                          st.integers(min_value=1, max_value=500),
                          st.integers(min_value=0, max_value=500)), min_size=1, max_size=12))
@example([(0.0, 10, 10), (1.0, 10, 10)])       # all failed, equal rates
@example([(0.0, 300, 0), (0.0, 300, 0)])       # equal timeouts, no race
@example([(-1.0, 60, 8), (1.0, 60, 9)])        # a violation
def test_the_fit_is_monotone_and_keeps_every_request(points: list[tuple[float, int, int]]
                                                     ) -> None:
    trials = [_record(2.0 - m, 2.0, n_reused=n, n_race=min(k, n), verdict="safe")
              for m, n, k in points]
    assume(all(t.margin_s is not None for t in trials))
    blocks = fit_monotone(trials)
    rates = [b.rate for b in blocks]
    assert all(x >= y - 1e-12 for x, y in itertools.pairwise(rates))
    assert sum(b.n_reused for b in blocks) == sum(t.n_reused for t in trials)
    assert sum(b.n_race for b in blocks) == sum(t.n_race for t in trials)


def test_the_fit_pools_only_violators() -> None:
    """Neighbours with merely equal rates stay apart (scipy alone would pool them), so an
    interval rests only on trials a violation of monotonicity tied together."""
    trials = [_record(2.0 - m, 2.0, n_reused=n, n_race=k)
              for m, n, k in ((-1.0, 300, 6), (0.0, 60, 8), (1.0, 210, 0), (2.0, 210, 0))]
    blocks = [(b.margin_low_s, b.margin_high_s, b.n_race, b.n_reused)
              for b in fit_monotone(trials)]
    assert blocks == [(-1.0, 0.0, 14, 360), (1.0, 1.0, 0, 210), (2.0, 2.0, 0, 210)]
    assert fit_monotone([]) == []


def test_other_causes_are_not_a_timeout_recommendation() -> None:
    records = [_record(1.0, 2.0, n_reused=300, n_race=0),
               _record(1.5, 2.0, n_reused=100, n_race=0, outcomes={"2xx": 90, "504": 10}),
               _record(3.0, 2.0, n_reused=0, n_race=0, verdict="invalid",
                       invalid_reason="a lab process died during the trial")]
    rec = recommend(records, upstream_idle_setting_s=1.0)
    assert rec.status == "ok" and not rec.unsafe
    assert [(t["proxy_idle_s"], t["reason"]) for t in rec.left_out] == [
        (3.0, "invalid: a lab process died during the trial")]
    assert not any("invalid" in cause for cause in rec.other_causes)
    assert any("10 failures that do not follow the timeouts" in c for c in rec.other_causes)


def test_no_data_is_insufficient_and_says_how_much_more() -> None:
    rec = recommend([_record(3.0, 2.0, n_reused=60, n_race=5)], upstream_idle_setting_s=1.0)
    assert rec.status == "insufficient"
    assert rec.more_load is not None and "need 150" in rec.more_load
