"""The safety rule and its two directions (pure): property tests with edge cases."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tuner.analysis.verdict import (
    default_margin_s,
    judge,
    largest_safe_proxy_idle_s,
    smallest_safe_upstream_close_s,
)

closes = st.floats(min_value=0.001, max_value=7200, allow_nan=False)
margins = st.one_of(st.none(), st.floats(min_value=0.0, max_value=60, allow_nan=False))


@given(closes, margins)
@example(2.0, None)  # Node keepAliveTimeout 1000 ms
@example(1.0, None)  # too short for the default 1 s margin
@example(60.0, 5.0)
def test_recommended_proxy_idle_is_below_the_close_minus_the_margin(
        close_s: float, margin_s: float | None) -> None:
    safe_s = largest_safe_proxy_idle_s(close_s, margin_s)
    margin = default_margin_s(close_s) if margin_s is None else margin_s
    if safe_s is None:
        assert close_s - margin < 0.1 + 1e-9
        return
    assert 0 < safe_s <= close_s - margin + 1e-9
    assert judge(proxy_idle_s=safe_s, upstream_close_s=close_s, max_idle_s=7200,
                 margin_s=margin_s).status == "safe"


@given(closes, closes)
def test_recommendation_moves_monotonically_with_the_close(a_s: float, b_s: float) -> None:
    low, high = sorted((a_s, b_s))
    safe_low, safe_high = largest_safe_proxy_idle_s(low), largest_safe_proxy_idle_s(high)
    if safe_low is not None:
        assert safe_high is not None and safe_low <= safe_high


@given(closes, st.floats(min_value=0, max_value=100, allow_nan=False))
@example(2.0, 0.0)  # equal values still race
def test_a_proxy_at_or_above_the_close_is_unsafe(close_s: float, extra_s: float) -> None:
    verdict = judge(proxy_idle_s=close_s + extra_s, upstream_close_s=close_s, max_idle_s=7200)
    assert verdict.status == "unsafe"
    assert "upstream closes them after" in verdict.message


@given(st.floats(min_value=0.001, max_value=3600, allow_nan=False), margins)
@example(60.0, None)
@example(60.0, 5.0)
def test_the_upstream_direction_is_the_inverse(proxy_idle_s: float,
                                               margin_s: float | None) -> None:
    needed_s = smallest_safe_upstream_close_s(proxy_idle_s, margin_s)
    assert judge(proxy_idle_s=proxy_idle_s, upstream_close_s=needed_s, max_idle_s=7200,
                 margin_s=margin_s).status == "safe"


def test_the_message_gives_both_fixes() -> None:
    verdict = judge(proxy_idle_s=60, upstream_close_s=3.0, max_idle_s=600, margin_s=1.0)
    assert verdict.message == (
        "proxy keeps idle upstream connections 60s but the upstream closes them after 3.0 s: "
        "set the proxy's idle timeout to at most 2s, or make the upstream keep them at least "
        "61s (as measured by a probe)")
    assert smallest_safe_upstream_close_s(60) == 67  # 60 / 0.9, rounded up
    assert smallest_safe_upstream_close_s(60, 5.0) == 65


@pytest.mark.parametrize(("proxy_idle_s", "status"), [(0.2, "safe"), (60, "inconclusive")])
def test_a_server_that_never_closed(proxy_idle_s: float, status: str) -> None:
    assert judge(proxy_idle_s=proxy_idle_s, upstream_close_s=None,
                 max_idle_s=2.0).status == status
