"""Is a proxy's idle timeout safe against an upstream's measured idle close? (pure)

The rule: the side that reuses idle connections must give them up first, by a margin:
`proxy_idle_s <= upstream_close_s - margin_s`. Equal values still race: the upstream's
timer starts when it sends the response, before the proxy's.

Default margin: the larger of 1 s and 10 % of the time it protects. 1 s is Node's own
buffer and covers loopback and in-cluster FIN delay plus event-loop lag; 10 % covers
servers whose close jitters with their timer granularity (gunicorn sweeps idle connections
about once a second) and long timeouts where a fixed second is lost in the noise. In the
wild: Node's 1 s, "+5 s" (65 vs 60), OCI's 10 s on 300 s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tuner.durations import format_seconds

DEFAULT_MARGIN_MIN_S = 1.0
#: Comparisons of float seconds allow this much binary noise (1.9 - 1.0 = 0.8999999999999999).
_EPSILON_S = 1e-9
DEFAULT_MARGIN_RATE = 0.10


def default_margin_s(protected_s: float) -> float:
    """The larger of 1 s and 10 % of `protected_s`."""
    return max(DEFAULT_MARGIN_MIN_S, DEFAULT_MARGIN_RATE * protected_s)


def largest_safe_proxy_idle_s(upstream_close_s: float, margin_s: float | None = None
                              ) -> float | None:
    """The longest idle timeout a proxy may keep, rounded down to 100 ms; None if none is."""
    margin = default_margin_s(upstream_close_s) if margin_s is None else margin_s
    safe_s = math.floor(round((upstream_close_s - margin) * 10, 6)) / 10
    return safe_s if safe_s > 0 else None


def smallest_safe_upstream_close_s(proxy_idle_s: float, margin_s: float | None = None) -> float:
    """The shortest real idle close an upstream may have behind this proxy, rounded up to 1 s.

    The inverse of `largest_safe_proxy_idle_s`: with the default margin (a share of the
    upstream's close) `p <= c - max(1, 0.1 c)` means `c >= max(p + 1, p / 0.9)`.
    """
    if margin_s is None:
        needed_s = max(proxy_idle_s + DEFAULT_MARGIN_MIN_S,
                       proxy_idle_s / (1 - DEFAULT_MARGIN_RATE))
    else:
        needed_s = proxy_idle_s + margin_s
    # less binary noise (66.66...67 must not round up past 67); rounding to 6 digits
    # instead dropped a margin of 6e-8 s, and the inverse then judged unsafe
    return float(math.ceil(needed_s - _EPSILON_S))


@dataclass(frozen=True)
class Verdict:
    """The answer to "is this proxy idle timeout safe against this upstream?"."""

    #: "safe", "unsafe" or "inconclusive"
    status: str
    proxy_idle_s: float
    upstream_close_s: float | None
    margin_s: float
    max_safe_proxy_idle_s: float | None
    min_safe_upstream_close_s: float
    message: str


def sweep_text(close_s: float, sweep_period_s: float | None) -> str:
    """How a sweeping upstream closes, in words (pure)."""
    every = f", every {sweep_period_s:.1f} s" if sweep_period_s is not None else ""
    return (f"closes any connection idle past {close_s:.2f} s at its next sweep{every}")


def judge(*, proxy_idle_s: float, upstream_close_s: float | None, max_idle_s: float,
          closes_on_next_request: bool = False, keeps_alive: bool = True,
          margin_s: float | None = None, closes_by_sweep: bool = False,
          sweep_period_s: float | None = None) -> Verdict:
    """Judge a proxy idle timeout against a probe's result.

    `upstream_close_s` is None when the upstream did not close within `max_idle_s`;
    `closes_on_next_request` when it kept the socket open but dropped a request sent on it;
    `closes_by_sweep` when it closes by a periodic sweep (`upstream_close_s` is then the
    earliest idle age a sweep may close at, and only the words change).
    """
    upstream_min_s = smallest_safe_upstream_close_s(proxy_idle_s, margin_s)
    if not keeps_alive:
        return Verdict("safe", proxy_idle_s, None, margin_s or 0.0, None, upstream_min_s,
                       "the upstream closes every connection after its response (no "
                       "keep-alive), so the proxy never reuses one and this race cannot happen "
                       "(at the cost of a new connection per request)")
    if closes_on_next_request:
        return Verdict("unsafe", proxy_idle_s, None, margin_s or 0.0, None, upstream_min_s,
                       f"the upstream keeps idle connections open but drops the next request "
                       f"after being idle up to {format_seconds(max_idle_s)}: every reused "
                       "connection can fail. Make the proxy's idle timeout shorter than the "
                       "upstream's, or stop the proxy from reusing connections.")
    if upstream_close_s is None:
        margin = default_margin_s(max_idle_s) if margin_s is None else margin_s
        if proxy_idle_s <= max_idle_s - margin + _EPSILON_S:
            return Verdict("safe", proxy_idle_s, None, margin, None, upstream_min_s,
                           f"the upstream kept idle connections open for the whole "
                           f"{format_seconds(max_idle_s)} probed, longer than the proxy's "
                           f"{format_seconds(proxy_idle_s)} plus a margin")
        return Verdict("inconclusive", proxy_idle_s, None, margin, None, upstream_min_s,
                       f"the upstream did not close within {format_seconds(max_idle_s)}, "
                       f"which is not enough to judge a proxy idle timeout of "
                       f"{format_seconds(proxy_idle_s)}: probe again with --max-idle "
                       f"{format_seconds(upstream_min_s + margin)}")
    margin = default_margin_s(upstream_close_s) if margin_s is None else margin_s
    proxy_max_s = largest_safe_proxy_idle_s(upstream_close_s, margin)
    if closes_by_sweep:
        rule = sweep_text(upstream_close_s, sweep_period_s)
        closes = f"the upstream {rule}"
        before = f"the earliest the upstream may close them (it {rule})"
    else:
        closes = f"the upstream closes them after {upstream_close_s:.1f} s"
        before = f"the upstream closes them ({upstream_close_s:.1f} s)"
    if proxy_idle_s <= upstream_close_s - margin + _EPSILON_S:
        return Verdict("safe", proxy_idle_s, upstream_close_s, margin, proxy_max_s,
                       upstream_min_s,
                       f"the proxy gives up idle connections after "
                       f"{format_seconds(proxy_idle_s)}, at least {format_seconds(margin)} "
                       f"before {before}")
    fix = (f"set the proxy's idle timeout to at most {format_seconds(proxy_max_s)}, or "
           if proxy_max_s is not None else "")
    return Verdict("unsafe", proxy_idle_s, upstream_close_s, margin, proxy_max_s,
                   upstream_min_s,
                   f"proxy keeps idle upstream connections {format_seconds(proxy_idle_s)} but "
                   f"{closes}: {fix}make the upstream keep them "
                   f"at least {format_seconds(upstream_min_s)} (as measured by a probe)")
