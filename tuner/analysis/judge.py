"""A finished trial's verdict, from the mechanism first and the count second (pure).

A count of failures alone cannot call a setting safe: the race window is a few milliseconds
wide, so a load that misses it (bursts spread by a busy machine, a noisy node) sees no race
in an unsafe cell. So, in this order:
1. any race, seen by the client or only in the proxy's log (a retry hid it), is unsafe;
2. a proxy that keeps idle connections at least as long as the upstream's measured close
   (within `AT_CLOSE_S`) is unsafe whatever the count: "no race seen" there only means this
   load did not catch a rare race (the upstream's timer starts first, so even equal values
   race);
3. "safe" needs the stopping rule's evidence (no race in `safe_after` reused requests, every
   gap tried), a load that aimed well (bursts tight enough to hit the window), and a positive
   control of the same experiment that did race; without those the cell is inconclusive,
   with the reason;
4. a safe cell closer to the close than the recommended margin says so.

Thresholds, measured on the lab (nginx 1.22 -> Node 20, 30 POST users, loopback, 2 cores):
bursts were written within 2-8 ms (p95 ~7 ms) and nginx 3s vs a 2.0 s close gave 14 x 502 in
300; spread over 25-29 ms by delaying each user (`--tuner-loosen-ms 30`) the same cell gave
0 in 300. 15 ms sits between the two. The rule reads the *median* burst: on a busy machine
(four test suites beside it) most bursts stayed within 10 ms while one stall put the p95
at 76 ms; the stalled bursts are wasted, the others still aim.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tuner.analysis.intervals import upper_bound
from tuner.analysis.stopping import StopRule, decide
from tuner.analysis.verdict import default_margin_s, sweep_text
from tuner.trial import Trial

#: bursts written over more than this (median) cannot be trusted to hit the race window
MAX_BURST_SPREAD_MS = 15.0
#: "in the window": a reused request sent this close to the measured close
WINDOW_HALF_WIDTH_MS = 2
CONFIDENCE = 0.95
#: comparisons of float seconds allow this much binary noise
_EPSILON_S = 1e-9
#: a margin below this is "at the close": the probe and the lifetime measurement are each
#: good to a few ms, and the race window (FIN delay plus event-loop lag) is a few ms on
#: loopback and wider under load or across a network. nginx 2s measured 2.001 s against a
#: close measured 2.002 s; the two are equal, not 1 ms apart, and that cell races.
AT_CLOSE_S = 0.05


def p95(values: Sequence[float]) -> float | None:
    """The 95th percentile (nearest rank) of `values`; None if there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)])


def n_in_window(idle_ms: Mapping[str, int], close_s: float | None, *,
                half_width_ms: int = WINDOW_HALF_WIDTH_MS) -> int | None:
    """Reused requests whose connection had been idle within +-`half_width_ms` of the close."""
    if close_s is None:
        return None
    close_ms = close_s * 1000
    return sum(n for ms, n in idle_ms.items() if abs(int(ms) - close_ms) <= half_width_ms)


@dataclass(frozen=True)
class Control:
    """What the experiment's positive control showed (None fields: no control was run)."""

    #: True: the control raced, so this load can show the race here
    raced: bool | None
    text: str

    @classmethod
    def none(cls, why: str) -> Control:
        return cls(None, why)

    @classmethod
    def of(cls, control: Trial | None, *, skipped: bool = False) -> Control:
        if skipped:
            return cls.none("no control was run (--no-control): nothing shows this load could "
                            "reproduce the race here, so a safe verdict rests on the count alone")
        if control is None:
            return cls.none("the control has not run yet")
        if control.invalid_reason is not None:
            # no proof either way: a safe verdict must wait for a control that ran
            return cls(False, f"the control trial was invalid ({control.invalid_reason}); "
                              "run the experiment again with --resume to repeat it")
        keeps = f"{control.margin_s:+.2f} s" if control.margin_s is not None else "?"
        if control.n_race:
            return cls(True, f"the control (proxy idle {control.proxy_idle_s:g}s, margin "
                             f"{keeps}) raced: {control.n_race} races in {control.n_reused} "
                             "reused requests, so this load can show the race here")
        if control.closes_by_sweep and control.upstream_close_s is not None:
            # A sweep closes at its own instants, not at an idle age: a burst races only if
            # it meets one within the race window (a few ms of a period of seconds), so a
            # control that saw nothing proves nothing about the load, and the cells rest on
            # the mechanism the probe measured (a sweep left connections this old open).
            rule = sweep_text(control.upstream_close_s, control.sweep_period_s)
            return cls(None, f"the upstream {rule}: a load aimed at one close instant meets "
                             f"the race only when a burst meets a sweep (the control saw none "
                             f"in {control.n_reused} reused requests), so the verdicts rest "
                             "on the mechanism: past that age unsafe, below it by the margin "
                             "safe once its own load saw no race")
        spread = (f"; burst spread median {control.burst_spread_ms_median:.0f} ms, p95 "
                  f"{control.burst_spread_ms_p95 or 0:.0f} ms"
                  if control.burst_spread_ms_median is not None else "")
        return cls(False, f"the load could not reproduce the race here: the control (proxy "
                          f"idle {control.proxy_idle_s:g}s, margin {keeps}) saw no race in "
                          f"{control.n_reused} reused requests{spread}")


def rate_bound_text(n_reused: int) -> str:
    bound = upper_bound(0, n_reused, CONFIDENCE) if n_reused else 1.0
    return f"no race in {n_reused} reused requests; rate < {bound:.2%} (95 %)"


def judge_trial(trial: Trial, *, rule: StopRule, control: Control,
                margin_s: float | None = None) -> Trial:
    """`trial` with its verdict and verdict text; a trial with an invalid reason is invalid."""
    if trial.invalid_reason is not None:
        return trial.with_(verdict="invalid", verdict_text=None)
    n_race, n_reused = trial.n_race, trial.n_reused
    if n_race:
        hidden = (f"; {trial.n_hidden_races} of them hidden from the client by the proxy's "
                  "retries (each retried request took a second round trip, and a POST or "
                  "PATCH in the same spot fails)" if trial.n_hidden_races else "")
        return trial.with_(verdict="unsafe", verdict_text=(
            f"{n_race} races in {n_reused} reused requests{hidden}"))
    margin = trial.margin_s
    if margin is not None and margin < AT_CLOSE_S:
        measured = ("its measured idle lifetime"
                    if trial.proxy_lifetime_s is not None
                    and trial.proxy_lifetime_s > trial.proxy_idle_s else "its setting")
        where = (f"{-margin:.1f} s past the measured close" if margin <= 0
                 else f"until {margin * 1000:.0f} ms before the measured close, which is at it")
        if trial.closes_by_sweep and trial.upstream_close_s is not None:
            sweeps = sweep_text(trial.upstream_close_s, trial.sweep_period_s)
            return trial.with_(verdict="unsafe", verdict_text=(
                f"no race in {n_reused} requests, but the proxy keeps connections {where} "
                f"({measured}) and the upstream {sweeps}: a race whenever a burst meets a "
                "sweep, which this load's bursts did not"))
        return trial.with_(verdict="unsafe", verdict_text=(
            f"no race in {n_reused} requests, but the proxy keeps connections {where} "
            f"({measured}): a rare race this load did not catch"))
    n_cycles = (trial.n_cycles if trial.n_cycles is not None
                else max(0, trial.n_bursts - 1) // max(1, len(trial.gaps_s)))
    enough = decide(n_race=0, n_reused=n_reused, n_cycles=n_cycles, rule=rule) == "safe"
    if not enough:
        return trial.with_(verdict="inconclusive", verdict_text=(
            f"{rate_bound_text(n_reused)}: short of the {rule.safe_after_requests} reused "
            "requests over every gap a safe verdict needs; give it a larger budget"))
    spread = trial.burst_spread_ms_median
    if spread is not None and spread > MAX_BURST_SPREAD_MS:
        return trial.with_(verdict="inconclusive", verdict_text=(
            f"{rate_bound_text(n_reused)}, but the load could not aim at the race window: "
            f"burst spread median {spread:.0f} ms, p95 {trial.burst_spread_ms_p95 or 0:.0f} ms "
            f"(at most {MAX_BURST_SPREAD_MS:.0f} ms catches it); a busy machine spreads the "
            "bursts: run with less beside it"))
    if trial.n_in_window == 0:
        return trial.with_(verdict="inconclusive", verdict_text=(
            f"{rate_bound_text(n_reused)}, but no request was sent within "
            f"{WINDOW_HALF_WIDTH_MS} ms of the measured close"))
    if control.raced is False:
        return trial.with_(verdict="inconclusive", verdict_text=(
            f"{rate_bound_text(n_reused)}, but {control.text}"))
    text = rate_bound_text(n_reused)
    if control.raced is None:
        text += f" ({control.text})"
    recommended_s = (default_margin_s(trial.upstream_close_s or 0.0) if margin_s is None
                     else margin_s)
    if margin is not None and margin < recommended_s - _EPSILON_S:
        # to the millisecond, rounded down: "margin 1 s is below the 1 s" (0.9996 s) was
        # false as read
        text = (f"safe here; margin {math.floor(margin * 1000) / 1000:.3f} s is below the "
                f"{recommended_s:.3g} s we recommend: {text}")
    return trial.with_(verdict="safe", verdict_text=text)
