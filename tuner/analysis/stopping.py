"""When a trial has seen enough to stop: the sequential stopping rule (pure). The verdict
itself is tuner.analysis.judge's: it also weighs the mechanism, the load's aim and the
control, which no count can.

Only failures that follow the keep-alive race count: 502 (nginx), 503 (Envoy-like) and a
reset / empty reply (HAProxy's silent close). 504s, timeouts and refused connections have
other causes and never make a trial "unsafe".

The rule, checked after every burst:
- unsafe: as soon as `unsafe_after_failures` race failures were seen (default 3: one could
  be a fluke of another cause, three in one trial are the race);
- safe: no race failure at all after `safe_after_requests` requests that reused idle
  connections (every request of a burst that followed a gap), and only once every gap of
  the schedule was tried `min_cycles` times: the window is a few ms wide and the sweep must
  have passed over it. 300 requests with 0 failures put the 95 % upper bound on the failure
  rate at 1 % (rule of three); the lab's unsafe cells measured 1.8-13 % per reused request,
  so an unsafe cell passes as safe with a probability of at most (1 - 0.018)^300 = 0.4 %.
- 0 for either threshold means "never stop early for this reason".
- otherwise the trial runs to its budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tuner.analysis.outcomes import RACE_OUTCOMES


@dataclass(frozen=True)
class StopRule:
    unsafe_after_failures: int = 3
    safe_after_requests: int = 300
    min_cycles: int = 1


def n_race_failures(counts: Mapping[str, int]) -> int:
    return sum(n for kind, n in counts.items() if kind in RACE_OUTCOMES)


def decide(*, n_race: int, n_reused: int, n_cycles: int, rule: StopRule) -> str | None:
    """"unsafe" or "safe" once the evidence is decisive, else None (keep going)."""
    if rule.unsafe_after_failures and n_race >= rule.unsafe_after_failures:
        return "unsafe"
    if (rule.safe_after_requests and n_race == 0 and n_reused >= rule.safe_after_requests
            and n_cycles >= rule.min_cycles):
        return "safe"
    return None
