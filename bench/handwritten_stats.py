"""The statistics tuner computed by hand before it used scipy, kept only so that
bench/stats_scipy_vs_handwritten.py can print old and new side by side. Not used by tuner.

Verbatim from tuner/analysis/intervals.py and the loop of `fit_monotone` in
tuner/analysis/recommend.py as they were before scipy (git log -- tuner/analysis).
"""

from __future__ import annotations

import math
from collections.abc import Callable

_BISECTION_STEPS = 60  # 2^-60: far below any rate that matters


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), as I_{1-p}(n - k, k + 1)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    return regularized_beta(n - k, k + 1, 1.0 - p)


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


def pool_adjacent_violators(points: list[tuple[float, int, int]]
                            ) -> list[tuple[float, float, int, int]]:
    """(margin, k, n) sorted by margin -> blocks (margin low, margin high, k, n) of the
    non-increasing fit of k / n."""
    blocks: list[tuple[float, float, int, int]] = []  # (low, high, k, n)
    for margin, k, n in points:
        blocks.append((margin, margin, k, n))
        # rates must not increase with the margin: pool while the last block's rate is
        # above the one before it
        while len(blocks) > 1 and blocks[-1][2] / blocks[-1][3] > blocks[-2][2] / blocks[-2][3]:
            last, before = blocks.pop(), blocks.pop()
            blocks.append((before[0], last[1], before[2] + last[2], before[3] + last[3]))
    return blocks
