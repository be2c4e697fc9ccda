"""Exact binomial confidence intervals (pure).

Clopper-Pearson, not Wilson: the decision this tool supports rests on "0 failures in n
requests", and for k = 0 (or k = n) and small n, Wilson's interval undercovers while
Clopper-Pearson guarantees at least the nominal coverage for every n and p. It is
conservative, which is the right side to err on before raising a production timeout.
The bounds are found by bisection on the exact binomial tail (log-space terms), so no
statistics library is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

_BISECTION_STEPS = 80  # 2^-80: far below any rate that matters


def _log_pmf(k: int, n: int, p: float) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * math.log(p) + (n - k) * math.log1p(-p))


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    terms = [_log_pmf(i, n, p) for i in range(k + 1)]
    peak = max(terms)
    return min(1.0, math.exp(peak) * sum(math.exp(t - peak) for t in terms))


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided exact interval for the rate k / n; (0, 1) when n == 0."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    alpha = 1.0 - confidence
    lower = 0.0 if k == 0 else _solve(lambda p: 1.0 - binomial_cdf(k - 1, n, p), alpha / 2)
    upper = 1.0 if k == n else 1.0 - _solve(lambda q: binomial_cdf(k, n, 1.0 - q), alpha / 2)
    return lower, upper


def upper_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided upper bound: "the rate is below this with `confidence`" (k = 0: ~3/n)."""
    if n == 0:
        return 1.0
    if k >= n:
        return 1.0
    alpha = 1.0 - confidence
    return 1.0 - _solve(lambda q: binomial_cdf(k, n, 1.0 - q), alpha)


def _solve(increasing: Callable[[float], float], target: float) -> float:
    """The p in [0, 1] where the increasing function `increasing(p)` reaches `target`."""
    lo, hi = 0.0, 1.0
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        if increasing(mid) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
