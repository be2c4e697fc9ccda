"""A trial's load budget, counted in idle periods of the upstream's real close (pure).

Why periods: a burst can only race after its connections sat idle about the upstream's real
close T, so a verdict costs whole periods whatever the request rate: the first burst opens
the connections, each later one reuses them after one period. At T = 60 s a fixed 40 s
budget never got past the first burst ("inconclusive" after two minutes, issue 12), so the
default follows T:
- unsafe: 3 race failures often come from the first reused burst; the budget allows
  `UNSAFE_PERIODS` (3) in case the first ones catch fewer, and never less than 40 s;
- safe: `safe_after` reused requests with every gap tried: with the groups sweep every burst
  tries every gap, so ceil(safe_after / burst_size) reused bursts (2 at 150 users); with one
  gap per burst, at least one burst per gap.
The trial stops at its verdict, so the budget is a cap, not the expected time.

The load's shape follows T too (`load_shape`): below `LONG_CLOSE_S` periods are cheap and
the lab's verdicts were all measured with 30 users and 7 gaps; from it on, a burst of 100
users over 3 gaps 4.5 ms apart (less than one burst's own spread: they leave no hole) makes
a safe verdict cost 3 reused bursts instead of 10 (measured at T = 20 s, no flags: the grid
{10 s, 25 s} with its control in 166 s instead of 372 s, every verdict right;
bench/burst_size_race.py gives the race rates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tuner.analysis.stopping import StopRule

#: Locust's start, the first burst and its answers, and the stop (measured here: 2-4 s)
STARTUP_S = 6.0
#: one burst's own duration on top of its gap (300 users written and answered: < 1 s here)
BURST_S = 1.0
UNSAFE_PERIODS = 3
#: never less than this: at short closes periods are cheap, and more bursts are more chances
#: (the lab's earlier fixed default; a 15 s budget at a 2 s close left unsafe cells uncaught)
MIN_BUDGET_S = 40.0


#: from this close on, a period costs enough to hold more connections per burst (the lab's
#: tests close at 2-3.5 s and keep the load all their verdicts were measured with)
LONG_CLOSE_S = 4.5
SHORT_BURST, SHORT_GAP_STEPS = 30, 7
LONG_BURST, LONG_GAP_STEPS = 100, 3


#: where the gaps sweep: from 9 ms below the measured close to the close. Bursts race at
#: gaps from about 9 ms below the close to it, and (nearly) never above it: the burst's own
#: spread carries its later requests past the close, and past it the proxy has seen the FIN
#: and opens fresh connections. Measured (bench/burst_size_race.py, nginx -> Node closing at
#: 2.0 s, 3 runs each): 30 users, 7 gaps, one cycle: 88 races in 630 reused requests over
#: -9..0 ms (25-34 a run) against 31 over -9..+9 ms (2-21 a run; 5 above the close, in one);
#: 100 users, 3 gaps: 65 in 900 (8, 9 and 48 a run) over -9..0 ms
GAP_BELOW_S, GAP_ABOVE_S = 0.009, 0.0


@dataclass(frozen=True)
class LoadShape:
    burst_size: int
    gap_steps: int
    gap_below_s: float = GAP_BELOW_S
    gap_above_s: float = GAP_ABOVE_S


def load_shape(close_s: float, *, burst_size: int | None = None,
               gap_steps: int | None = None,
               gap_half_width_s: float | None = None) -> LoadShape:
    """Users per burst, gaps per sweep and the sweep's span at this close; a value the
    user gave wins (a half width sweeps symmetrically around the close)."""
    long = close_s >= LONG_CLOSE_S
    below_s, above_s = ((GAP_BELOW_S, GAP_ABOVE_S) if gap_half_width_s is None
                        else (gap_half_width_s, gap_half_width_s))
    return LoadShape(burst_size or (LONG_BURST if long else SHORT_BURST),
                     gap_steps or (LONG_GAP_STEPS if long else SHORT_GAP_STEPS),
                     below_s, above_s)


@dataclass(frozen=True)
class Budget:
    max_seconds: float
    n_periods: int
    #: reused bursts a safe verdict needs at this burst size
    n_safe_bursts: int
    period_s: float

    def describe(self) -> str:
        floor = (f", at least {MIN_BUDGET_S:g} s" if self.max_seconds <= MIN_BUDGET_S else "")
        return (f"{self.max_seconds:.0f} s: {self.n_periods} periods of {self.period_s:.1f} s "
                f"+ {STARTUP_S:g} s to start{floor} (unsafe often after 1, safe after "
                f"{self.n_safe_bursts})")


def safe_bursts(*, burst_size: int, n_gaps: int, sweep: str, rule: StopRule) -> int:
    """Reused bursts a safe verdict needs (0 when the rule never stops as safe)."""
    if not rule.safe_after_requests:
        return 0
    n = math.ceil(rule.safe_after_requests / burst_size)
    if sweep != "groups":
        n = max(n, n_gaps * rule.min_cycles)
    return max(n, rule.min_cycles)


def default_budget(*, close_s: float, burst_size: int, n_gaps: int, sweep: str,
                   rule: StopRule) -> Budget:
    """The budget that reaches either verdict at this close and burst size."""
    period_s = close_s + BURST_S
    n_safe = safe_bursts(burst_size=burst_size, n_gaps=n_gaps, sweep=sweep, rule=rule)
    n_periods = max(UNSAFE_PERIODS, n_safe)
    seconds = max(MIN_BUDGET_S, n_periods * period_s + STARTUP_S)
    return Budget(round(seconds, 1), n_periods, n_safe, period_s)


def least_budget_s(close_s: float) -> float:
    """Below this no burst follows an idle period: no verdict is possible at all."""
    return round(close_s + BURST_S + STARTUP_S, 1)
