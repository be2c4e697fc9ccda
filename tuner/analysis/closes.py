"""What a set of idle connections' closes says about the server's rule (pure).

Two kinds of server close idle keep-alive connections:
- a timer per connection (Node, Go, nginx): each closes at the same idle age, however the
  connections were staggered, so close instants are as staggered as the answers;
- a periodic sweep (gunicorn's gthread worker once a second, others every several seconds):
  at each sweep, every connection idle longer than the setting is closed at once. A
  connection then closes at any age from the setting to the setting plus the period,
  depending on when it went idle; connections answered at different instants close
  together.

Design decision: the connections are answered at staggered instants, and the evidence is
read from the sweep instants, not from one close age. At a sweep instant, a connection that
was closed had an age above the setting, and one that stayed open had an age at or below
it; so the setting lies between the oldest survivor and the youngest close, and only the
survivor's age is proven safe. Plan with it: the latest close a probe sees is a phase of the
sweep (all samples answered together see the same late sweep), not a property of the server.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

#: Closes stamped within this of a group's first close belong to one sweep. The probe stamps
#: a close when its loop sees the FIN (well under a millisecond on loopback); 20 ms absorbs a
#: loop busy sending a staggered request, and staggered answers are at least 50 ms apart.
SAME_INSTANT_S = 0.02
#: A group of closes is a sweep when the connections it closed were answered at least this
#: far apart: a per-connection timer cannot close them together, unless its event loop
#: stalled this long (a busy Node can group closes tens of ms apart, not 100 ms).
SWEEP_EVIDENCE_S = 0.1
#: the longest sweep period a wait is sized for: a sweeping server closes a connection at
#: any age up to its setting plus the period, so a connection still open at some age is
#: safe only if no sweep was due (gunicorn's is 1 s, Tomcat's NIO poller's 1 s; the
#: slowest tried here swept every 10 s)
SWEEP_WAIT_S = 10.0


@dataclass(frozen=True)
class Observed:
    """One idle connection: when (time.monotonic()) its response ended and when it closed."""

    answered_at: float
    #: None: still open when the probe stopped watching it
    closed_at: float | None


@dataclass(frozen=True)
class CloseRule:
    """The server's idle-close rule as far as the observed closes show it."""

    closes_by_sweep: bool
    #: the shortest time between two sweeps seen (None: no sweep, or only one seen)
    sweep_period_s: float | None
    #: the youngest idle age at which a connection was closed
    youngest_close_s: float | None
    #: the oldest idle age a connection had at a sweep that left it open (None: no sweep)
    oldest_survivor_s: float | None
    #: the idle age to plan with: the oldest survivor of a sweep (the setting lies between
    #: it and the youngest close), or without a sweep the youngest close
    earliest_close_s: float | None
    #: the instants (monotonic) of the close groups, oldest first
    close_instants: tuple[float, ...] = ()


def close_groups(observed: Sequence[Observed], *, same_instant_s: float = SAME_INSTANT_S
                 ) -> list[list[Observed]]:
    """The closed connections in groups closed at one instant, oldest first."""
    closed = sorted((o for o in observed if o.closed_at is not None),
                    key=lambda o: o.closed_at or 0.0)
    groups: list[list[Observed]] = []
    for conn in closed:
        assert conn.closed_at is not None
        if groups and conn.closed_at - (groups[-1][0].closed_at or 0.0) <= same_instant_s:
            groups[-1].append(conn)
        else:
            groups.append([conn])
    return groups


def _answered_span_s(group: Sequence[Observed]) -> float:
    answers = [o.answered_at for o in group]
    return max(answers) - min(answers)


def infer_close_rule(observed: Sequence[Observed], *,
                     same_instant_s: float = SAME_INSTANT_S,
                     sweep_evidence_s: float = SWEEP_EVIDENCE_S) -> CloseRule:
    """Read the server's rule from staggered connections' answers and closes."""
    groups = close_groups(observed, same_instant_s=same_instant_s)
    ages = [o.closed_at - o.answered_at for o in observed if o.closed_at is not None]
    youngest_s = min(ages) if ages else None
    instants = tuple(g[0].closed_at or 0.0 for g in groups)
    by_sweep = any(_answered_span_s(g) >= sweep_evidence_s for g in groups)
    if not by_sweep:
        return CloseRule(False, None, youngest_s, None, youngest_s, instants)
    # every group counts as a sweep instant: a sweep that closed one connection is a sweep
    gaps_s = [b - a for a, b in itertools.pairwise(instants)]
    period_s = min(gaps_s) if gaps_s else None
    survivor_s = -math.inf
    for instant in instants:
        for conn in observed:
            open_after = conn.closed_at is None or conn.closed_at > instant + same_instant_s
            if conn.answered_at < instant and open_after:
                survivor_s = max(survivor_s, instant - conn.answered_at)
    oldest_s = survivor_s if survivor_s > -math.inf else None
    # a survivor older than a close means the rule is not one threshold (a server that closes
    # a random subset): then only the youngest close is known
    if oldest_s is not None and youngest_s is not None and oldest_s < youngest_s:
        plan_s: float | None = oldest_s
    else:
        plan_s = youngest_s
    return CloseRule(True, period_s, youngest_s, oldest_s, plan_s, instants)
