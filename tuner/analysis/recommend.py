"""From trials to a recommendation with its evidence (pure).

The model: the race rate per reused request is a non-increasing function of the margin
`upstream_close_s - proxy_idle_s` (the longer the upstream outlives the proxy's idle
timeout, the fewer reused connections can meet its close). It is fitted by isotonic
regression (scipy's pool adjacent violators), weighted by the reused requests of each trial,
with a Clopper-Pearson interval per pooled block. A monotone fit, not a logistic curve: the race
is close to a step (0 once the proxy gives up first, a few % at or below 0), and a logistic
fit would smear that step over margins where nothing fails.

The recommendation, for each hop direction:
- the largest safe proxy idle timeout for the upstream as measured:
  `min(measured closes) - margin`, rounded down to 100 ms;
- the smallest upstream idle setting for the proxy as configured: the setting whose real
  close (setting + the offset measured between setting and close, e.g. Node's +1 s) is at
  least `proxy_idle + margin`.
Evidence: by monotonicity, every trial of the same upstream at a proxy idle timeout at or
above the recommended one (a margin at or below it) that saw no race failure bounds the
rate at the recommended one; their reused requests are pooled into "0 failures in n; 95 %
upper bound r". Without such trials the data cannot support a
recommendation, and the result says how many more requests would (n >= ln(20) / r_target).
Failures that do not follow the margin (504s, timeouts, refused connections) are reported
as another cause, never turned into a timeout. Trials the recommendation cannot rest on at
all (invalid ones, such as a load the upstream did not serve; no measured close; no reused
request) are left out, and `left_out` says which and why.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuner.analysis.intervals import clopper_pearson, upper_bound
from tuner.analysis.judge import MAX_BURST_SPREAD_MS, Control
from tuner.analysis.outcomes import RACE_OUTCOMES
from tuner.analysis.verdict import default_margin_s, largest_safe_proxy_idle_s
from tuner.trial import Trial

#: the failure rate the evidence must bound from above (95 %) for a recommendation
DEFAULT_TARGET_RATE = 0.02
CONFIDENCE = 0.95

MITIGATIONS = [
    {"proxy": "nginx", "setting": "proxy_next_upstream error timeout non_idempotent;",
     "effect": "masks the race: nginx re-sends POST/PATCH on a fresh connection, which can "
               "apply a request twice; not a fix"},
    {"proxy": "haproxy", "setting": "retry-on conn-failure empty-response",
     "effect": "masks the race: HAProxy replays the request on a new connection; not a fix"},
    # measured in the lab (Envoy 1.40.0 -> Node 1000 ms, bursts of 30 POSTs at the close,
    # num_retries 1): reset-before-request retried none of 45 races; reset retried 6 of 42
    # (and 14 of 71 GET races), 5xx 10 of 38; retriable-status-codes [503] and Istio's
    # default retry_on (connect-failure,refused-stream,unavailable,cancelled,
    # retriable-status-codes) none of 38 and 55: the race's 503 is Envoy's own reply to a
    # reset, not an upstream status. A retry often takes another pooled connection the same
    # close killed, so even `reset` hides only part.
    {"proxy": "envoy", "setting": "retry_policy: {retry_on: reset-before-request}",
     "effect": "does not mask this race: Envoy retries only a reset before the request was "
               "written, and the race's request was written into the closed connection "
               "(measured: no retry of 45 races); safe for POST, not a fix"},
    {"proxy": "envoy", "setting": "retry_policy: {retry_on: reset} (or 5xx)",
     "effect": "masks part of the race for every method, POST included: Envoy re-sends after "
               "the upstream reset, which can apply a request the upstream began twice; the "
               "retry can take another pooled connection the same close killed (measured: "
               "6 of 42 races retried to success with one retry); costs a retry per race "
               "(upstream_rq_retry, the retry budget); not a fix. retriable-status-codes "
               "[503], as in Istio's default retries, masks nothing here"},
    {"proxy": "any", "setting": "disable upstream keep-alive",
     "effect": "avoids the race by never reusing a connection, at the cost of a new "
               "connection per request"},
]


@dataclass(frozen=True)
class MarginBlock:
    """One pooled block of the monotone fit: margins [low, high], k races in n requests."""

    margin_low_s: float
    margin_high_s: float
    n_race: int
    n_reused: int
    rate: float
    rate_low: float
    rate_high: float


def fit_monotone(trials: Iterable[Trial]) -> list[MarginBlock]:
    """Isotonic (non-increasing in margin) fit of the race rate, with exact intervals."""
    points = sorted((t.margin_s, t.n_race, t.n_reused) for t in trials
                    if t.margin_s is not None and t.n_reused > 0 and t.verdict != "invalid")
    fitted = []
    for low, high, k, n in _pooled(points):
        ci_low, ci_high = clopper_pearson(k, n, CONFIDENCE)
        fitted.append(MarginBlock(low, high, k, n, k / n, ci_low, ci_high))
    return fitted


def _pooled(points: Sequence[tuple[float, int, int]]) -> list[tuple[float, float, int, int]]:
    """Pool adjacent violators over (margin, k, n) sorted by margin, weighted by n: the
    blocks (margin low, margin high, k, n) of the non-increasing fit of k / n."""
    if not points:
        return []
    from scipy.optimize import isotonic_regression  # 0.45 s to import: only when fitting

    starts = isotonic_regression([k / n for _, k, n in points],
                                 weights=[n for _, _, n in points], increasing=False).blocks
    blocks = []
    for start, end in itertools.pairwise(int(i) for i in starts):
        block_k = sum(k for _, k, _ in points[start:end])
        block_n = sum(n for _, _, n in points[start:end])
        # scipy also pools neighbours whose rates are merely equal; keep them apart (as
        # before scipy): an interval then rests only on trials a violation tied together
        low, k_sum, n_sum = start, 0, 0
        for i in range(start, end):
            k_sum, n_sum = k_sum + points[i][1], n_sum + points[i][2]
            if k_sum * block_n == block_k * n_sum:  # exact: this part has the block's rate
                blocks.append((points[low][0], points[i][0], k_sum, n_sum))
                low, k_sum, n_sum = i + 1, 0, 0
    return blocks


@dataclass(frozen=True)
class GapRow:
    """Requests and race failures after idle gaps at one offset from the measured close."""

    offset_ms: int
    n_requests: int
    n_race: int


def per_gap(trials: Iterable[Trial]) -> list[GapRow]:
    """Which idle gaps produced the failures: pooled over the unsafe trials, by the gap's
    offset from each trial's measured close (so trials with different closes line up)."""
    rows: dict[int, list[int]] = {}
    for trial in trials:
        if trial.n_race == 0 or trial.upstream_close_s is None:
            continue
        for gap, counts in trial.by_gap.items():
            if gap in ("first", "steady"):
                continue
            offset_ms = round((float(gap) - trial.upstream_close_s) * 1000)
            row = rows.setdefault(offset_ms, [0, 0])
            row[0] += sum(counts.values())
            row[1] += sum(n for kind, n in counts.items() if kind in RACE_OUTCOMES)
    return [GapRow(offset, n, k) for offset, (n, k) in sorted(rows.items())]


@dataclass(frozen=True)
class Evidence:
    n_race: int
    n_reused: int
    upper_rate: float
    margin_low_s: float
    margin_high_s: float
    text: str


@dataclass(frozen=True)
class Recommendation:
    #: "ok"; "insufficient" when the data cannot support one; "no_control" when the
    #: experiment's control did not race, so no count of this load proves anything safe
    status: str
    upstream_idle_setting_s: float
    upstream_close_s: float | None
    margin_s: float
    #: the largest safe proxy idle *setting* for the upstream as measured
    proxy_idle_s: float | None
    #: the proxy idle timeout to protect, and the smallest upstream setting that does
    configured_proxy_idle_s: float
    upstream_idle_s: float | None
    upstream_close_offset_s: float | None
    evidence: Evidence | None
    unsafe: list[dict[str, Any]]
    other_causes: list[str]
    more_load: str | None
    model: list[MarginBlock]
    gaps: list[GapRow] = field(default_factory=list)
    alternatives: list[dict[str, str]] = field(default_factory=lambda: list(MITIGATIONS))
    #: the longest the proxy kept an idle connection, as a multiple of its setting (1.0
    #: when not measured): HAProxy's pool-purge-delay is not a lifetime
    proxy_lifetime_ratio: float = 1.0
    #: which side can actually bound the idle lifetime, when the proxy's cannot closely
    bound_note: str | None = None
    #: what the experiment's positive control showed
    control: str | None = None
    #: races the proxy saw and hid from the client with retries, over these trials
    n_hidden_races: int = 0
    #: the trials of this setting the recommendation does not rest on, each with its cell,
    #: proxy idle, repeat and the reason (tuner.analysis.recommend.left_out)
    left_out: list[dict[str, Any]] = field(default_factory=list)


#: beyond this lifetime-to-setting ratio the proxy's knob is too coarse to aim with
_COARSE_RATIO = 1.5


def is_evidence(trial: Trial) -> bool:
    """Can this trial's zero count bound the failure rate? Only if it ran, saw no race at a
    positive margin (at or past the close no count means safe), is not the control, and
    the load's bursts were tight enough to hit the window."""
    return (trial.is_valid and not trial.control and trial.n_race == 0
            and trial.margin_s is not None and trial.margin_s > 0
            and (trial.burst_spread_ms_median is None
                 or trial.burst_spread_ms_median <= MAX_BURST_SPREAD_MS))


def _evidence(trials: Sequence[Trial], proxy_idle_s: float) -> Evidence | None:
    """Pool the race-free trials of one upstream setting whose proxy idle timeout is at
    least `proxy_idle_s` (so a margin at most the recommended one) and below every setting
    that raced: by monotonicity, each bounds the failure rate at `proxy_idle_s`."""
    valid = [t for t in trials if t.is_valid and t.margin_s is not None]
    failing_from = min((t.proxy_idle_s for t in valid if t.n_race > 0), default=math.inf)
    pooled = [t for t in valid if is_evidence(t)
              and proxy_idle_s - 1e-9 <= t.proxy_idle_s < failing_from]
    n = sum(t.n_reused for t in pooled)
    if n == 0:
        return None
    margins = [t.margin_s for t in pooled if t.margin_s is not None]
    bound = upper_bound(0, n, CONFIDENCE)
    text = (f"no race in {n} reused requests at margins "
            f"{min(margins):.2f}-{max(margins):.2f} s; rate < {bound:.2%} (95 %)")
    return Evidence(0, n, bound, min(margins), max(margins), text)


def requests_needed(target_rate: float, confidence: float = CONFIDENCE) -> int:
    """Race-free reused requests that bound the rate below `target_rate` (rule of three)."""
    return math.ceil(math.log(1 / (1 - confidence)) / target_rate)


#: HAProxy 2.6's idle server connections lived up to 6x its pool-purge-delay in the lab
#: (tuner.lab.lifetime, 16 connections at 500 ms and 1 s): assumed when not measured
HAPROXY_LIFETIME_RATIO = 6.0


def lifetime_ratio(trials: Iterable[Trial]) -> float:
    """The largest measured lifetime-to-setting ratio of the proxy; when none was measured,
    1.0, or HAProxy's measured 6.0 (its setting is not a lifetime)."""
    trials = list(trials)
    ratios = [t.proxy_lifetime_s / t.proxy_idle_s for t in trials
              if t.proxy_lifetime_s is not None and t.proxy_idle_s > 0 and not t.control]
    if not ratios and any(t.proxy == "haproxy" for t in trials):
        return HAPROXY_LIFETIME_RATIO
    return max([1.0, *ratios])


def left_out(trials: Iterable[Trial]) -> list[dict[str, Any]]:
    """The trials no part of a recommendation uses (neither the fit nor the evidence), and
    why: invalid (its reason: the lab failed, or the upstream did not serve the load), no
    measured close, or no reused request (pure)."""
    out = []
    for t in trials:
        if not t.is_valid:
            reason = f"invalid: {t.invalid_reason or 'no result'}"
        elif t.upstream_close_s is None:
            reason = "the upstream's close was not measured: no margin to place it at"
        elif t.n_reused == 0:
            reason = "no reused request: nothing followed an idle gap"
        else:
            continue
        out.append({"cell": t.cell, "proxy_idle_s": t.proxy_idle_s,
                    "upstream_idle_s": t.upstream_idle_s, "repeat": t.repeat,
                    "control": t.control, "verdict": t.verdict, "reason": reason})
    return out


def recommend(trials: Iterable[Trial], *, upstream_idle_setting_s: float,
              margin_s: float | None = None, configured_proxy_idle_s: float | None = None,
              whole_seconds: bool = False, target_rate: float = DEFAULT_TARGET_RATE,
              control: Control | None = None) -> Recommendation:
    """The recommendation for one upstream setting of the experiment."""
    every = list(trials)
    here = [t for t in every if math.isclose(t.upstream_idle_s, upstream_idle_setting_s)
            and not t.control]
    valid = [t for t in here if t.is_valid]
    closes = [t.upstream_close_s for t in valid if t.upstream_close_s is not None]
    close_s = min(closes) if closes else None
    margin = default_margin_s(close_s or 0.0) if margin_s is None else margin_s
    protect_s = configured_proxy_idle_s or max((t.proxy_idle_s for t in here), default=60.0)
    skipped = left_out(here)
    other = [f"proxy idle {t.proxy_idle_s:g}s: {t.n_other_failures} failures that do not "
              "follow the timeouts (504, timeouts, refused connections)"
              for t in valid if t.n_other_failures]
    unsafe: list[dict[str, Any]] = []
    for t in valid:
        if t.n_race:
            low, high = clopper_pearson(t.n_race, max(t.n_reused, t.n_race), CONFIDENCE)
            unsafe.append({"proxy_idle_s": t.proxy_idle_s, "upstream_close_s": t.upstream_close_s,
                           "proxy_lifetime_s": t.proxy_lifetime_s,
                           "n_race": t.n_race, "n_hidden": t.n_hidden_races,
                           "n_reused": t.n_reused,
                           "rate": t.n_race / max(1, t.n_reused), "rate_low": low,
                           "rate_high": high})
        elif t.verdict == "unsafe":
            unsafe.append({"proxy_idle_s": t.proxy_idle_s, "upstream_close_s": t.upstream_close_s,
                           "proxy_lifetime_s": t.proxy_lifetime_s, "n_race": 0, "n_hidden": 0,
                           "n_reused": t.n_reused, "by_margin": t.verdict_text})
    model = fit_monotone(valid)
    n_hidden = sum(t.n_hidden_races for t in valid)
    control_text = control.text if control is not None else None
    ratio = lifetime_ratio(valid)
    if close_s is None:
        return Recommendation("insufficient", upstream_idle_setting_s, None, margin, None,
                              protect_s, None, None, None, unsafe, other,
                              "no valid trial measured the upstream's close time; run an "
                              "experiment whose trials are not invalid"
                              + (f" ({len(skipped)} left out: see left_out)" if skipped else ""),
                              model, control=control_text, n_hidden_races=n_hidden,
                              proxy_lifetime_ratio=ratio, left_out=skipped)
    # the margin bounds the proxy's real idle lifetime; its setting is that over the ratio
    lifetime_s = largest_safe_proxy_idle_s(close_s, margin)
    proxy_s = (math.floor(round(lifetime_s / ratio * 10, 6)) / 10 or None
               if lifetime_s is not None else None)
    offsets = [t.upstream_close_s - t.upstream_idle_s for t in valid
               if t.upstream_close_s is not None]
    offset_s = min(offsets)  # the least the real close exceeds the setting: conservative
    # the upstream must outlive what the proxy really keeps, not what it is set to
    needed_s = protect_s * ratio + margin - offset_s
    step_s = 1.0 if whole_seconds else 0.001
    upstream_s = max(step_s, math.ceil(round(needed_s / step_s, 6)) * step_s)
    bound_note = None
    if ratio > _COARSE_RATIO:
        bound_note = (f"the proxy kept idle connections up to {ratio:.1f}x its setting "
                      "(HAProxy's pool-purge-delay closes about half the idle connections "
                      "per period, it is not a lifetime): the proxy side bounds the lifetime "
                      "only coarsely; the upstream side (its idle setting) is the one that "
                      "bounds it exactly")
    evidence = _evidence(valid, proxy_s) if proxy_s is not None else None
    more_load = None
    status = "ok"
    if control is not None and control.raced is False:
        status = "no_control"
        more_load = (f"{control.text}: no count of this load shows a setting safe; run it "
                     "on a quieter machine, or with tighter bursts (fewer users per worker)")
    elif proxy_s is None:
        status = "insufficient"
        more_load = (f"no proxy idle setting keeps connections less than the upstream's close "
                     f"({close_s:.2f} s) minus the margin ({margin:g} s): the proxy kept them up "
                     f"to {ratio:.1f}x its setting. Bound it from the upstream side: run trials "
                     f"at upstream idle {upstream_s:g}s or more with the proxy at "
                     f"{protect_s:g}s, which then gives the evidence")
    elif evidence is None or evidence.upper_rate > target_rate:
        status = "insufficient"
        n_have = evidence.n_reused if evidence else 0
        n_need = requests_needed(target_rate)
        more_load = (f"need {n_need} race-free reused requests at a proxy idle timeout between "
                     f"{proxy_s or 0:g}s and the upstream's close ({close_s:.2f} s) to bound the "
                     f"failure rate below {target_rate:.0%}; have {n_have}: run about "
                     f"{max(0, n_need - n_have)} more (for example a trial at proxy idle "
                     f"{proxy_s or 0:g}s with a larger --max-seconds)")
    return Recommendation(status, upstream_idle_setting_s, close_s, margin, proxy_s, protect_s,
                          upstream_s, offset_s, evidence, unsafe, other, more_load, model,
                          per_gap(valid), proxy_lifetime_ratio=ratio, bound_note=bound_note,
                          control=control_text, n_hidden_races=n_hidden, left_out=skipped)
