"""One trial of an experiment, as measured and judged: the record every part of `tuner`
passes along (pure data, no I/O).

Design decision: one frozen dataclass from the moment a trial ends to the report. It is
turned into JSON only at the edges: the results store (`to_json` / `from_json`) and the
machine-readable output. Counts that follow from others (requests, failures, 502s) are
properties, so they can never disagree with the outcomes they come from; `to_json` writes
them too, for readers of the JSON.

Records written by older versions of `tuner` lack the fields added since (the proxy's
measured idle lifetime, the load's precision, the control flag, the per-status counts);
`from_json` reads them as "not measured", and the verdict logic treats "not measured" as
what it is. Their outcomes have no `served` class: a 404 was `other_status` then, a failure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tuner.analysis.outcomes import FAILURES, RACE_OUTCOMES, SERVED_OUTCOMES, Outcome
from tuner.durations import plain_seconds

NON_RACE_FAILURES = FAILURES - RACE_OUTCOMES
_SERVED = frozenset(outcome.value for outcome in SERVED_OUTCOMES)

VERDICTS = ("safe", "unsafe", "inconclusive", "invalid")
#: the cell name of an experiment's positive control (its proxy idle is chosen per run)
CONTROL_CELL = "control"


def cell_name(proxy_idle_s: float, upstream_idle_s: float, *, control: bool = False) -> str:
    if control:
        return f"{CONTROL_CELL}|{plain_seconds(upstream_idle_s)}"
    return f"{plain_seconds(proxy_idle_s)}|{plain_seconds(upstream_idle_s)}"


@dataclass(frozen=True)
class Trial:
    """A trial's settings, what was measured, and the verdict."""

    proxy: str
    upstream: str
    proxy_idle_s: float
    upstream_idle_s: float
    repeat: int = 0
    #: the experiment's positive control: the proxy keeps idle connections well past the
    #: upstream's close, so this trial must race if the load can show the race at all
    control: bool = False

    #: "safe", "unsafe", "inconclusive" or "invalid" (the target failed: no result)
    verdict: str = "invalid"
    #: the verdict in words, with the numbers behind it
    verdict_text: str | None = None
    invalid_reason: str | None = None

    # -- the two sides' real idle lifetimes ----------------------------------------------
    #: the upstream's measured idle close (the probe's plan-with value)
    upstream_close_s: float | None = None
    upstream_advertised_s: float | None = None
    close_kind: str | None = None
    #: the upstream closes idle connections by a periodic sweep (tuner.probe): any
    #: connection idle past `upstream_close_s` may go at the next sweep, so a load shaped for
    #: one close instant meets the race only when a burst meets a sweep (None: not measured)
    closes_by_sweep: bool | None = None
    #: the sweep's period as the probe measured it (None: no sweep, or not measured)
    sweep_period_s: float | None = None
    #: the longest an idle connection lived in the proxy's pool at this setting, measured
    #: against an upstream that never closes (None: not measured, the setting is used)
    proxy_lifetime_s: float | None = None

    # -- what the load did ----------------------------------------------------------------
    gaps_s: tuple[float, ...] = ()
    outcomes: Mapping[str, int] = field(default_factory=dict)
    #: answers by HTTP status ("200", "404", "502"); requests with no HTTP answer (reset,
    #: timeout) have none. Empty in records older than the count.
    statuses: Mapping[str, int] = field(default_factory=dict)
    by_gap: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    n_reused: int = 0
    n_bursts: int = 0
    #: complete passes over the gap sweep (None: an older record; then one per len(gaps)
    #: bursts). With the groups sweep every burst tries every gap: one pass per burst.
    n_cycles: int | None = None
    stop_reason: str | None = None
    elapsed_s: float | None = None
    #: 95th percentile over bursts of the time from a burst's first request written to its
    #: last: the race window is a few ms wide, so a loose burst cannot aim at it
    burst_spread_ms_p95: float | None = None
    #: the median of the same: the load's typical aim (a busy machine's occasional stall
    #: shows in the p95, not here)
    burst_spread_ms_median: float | None = None
    #: 95th percentile of |achieved idle gap - planned gap| over bursts
    gap_error_ms_p95: float | None = None
    #: reused requests sent after an idle time within +-2 ms of the measured close
    n_in_window: int | None = None
    #: Locust processes that reported the bursts (1 without workers; None: older record)
    n_load_processes: int | None = None
    #: per remote worker, its clock's offset from the master's, measured before the first
    #: burst and corrected for (tuner.load.clocks); empty without remote workers
    clock_offsets_ms: Mapping[str, float] = field(default_factory=dict)

    # -- what the proxy saw ---------------------------------------------------------------
    #: race lines in the proxy's log (or its stats) during the trial: races the proxy hid
    #: from the client by retrying count here too
    n_proxy_log_races: int = 0
    log_signatures: Mapping[str, int] = field(default_factory=dict)

    # -- the cluster target ---------------------------------------------------------------
    generation: str | None = None
    n_pods: int | None = None

    # -- derived counts -------------------------------------------------------------------
    @property
    def cell(self) -> str:
        return cell_name(self.proxy_idle_s, self.upstream_idle_s, control=self.control)

    @property
    def n_requests(self) -> int:
        return sum(self.outcomes.values())

    @property
    def n_502(self) -> int:
        return self.outcomes.get(Outcome.BAD_GATEWAY.value, 0)

    @property
    def n_served(self) -> int:
        """Requests the upstream served: 2xx, and other statuses it answered on its own
        (a 404 or 405 of the app: tuner.analysis.outcomes)."""
        return sum(n for kind, n in self.outcomes.items() if kind in _SERVED)

    @property
    def n_failed(self) -> int:
        return self.n_requests - self.n_served

    @property
    def n_unserved(self) -> int:
        """Requests neither served nor failed by the race: refusals (400), other 5xx,
        timeouts, refused connections."""
        return self.n_requests - self.n_served - self.n_race_failures

    @property
    def failure_rate(self) -> float | None:
        return self.n_failed / self.n_requests if self.n_requests else None

    @property
    def n_race_failures(self) -> int:
        """Race failures the client saw."""
        return sum(n for kind, n in self.outcomes.items() if kind in RACE_OUTCOMES)

    @property
    def n_race(self) -> int:
        """Races, seen by the client or only by the proxy. A race the proxy hid with a retry
        (nginx re-sends a GET on a fresh connection) still happened: the same request as a
        POST fails. Each client failure also leaves a line in the proxy's log, so the larger
        of the two counts every race once."""
        return max(self.n_race_failures, self.n_proxy_log_races)

    @property
    def n_hidden_races(self) -> int:
        """Races the proxy saw and the client did not: hidden by the proxy's retries."""
        return max(0, self.n_proxy_log_races - self.n_race_failures)

    @property
    def n_other_failures(self) -> int:
        return sum(n for kind, n in self.outcomes.items() if kind in NON_RACE_FAILURES)

    @property
    def proxy_keeps_s(self) -> float:
        """How long the proxy may keep an idle connection: its setting, or longer where its
        measured lifetime is (HAProxy's is several times its setting)."""
        if self.proxy_lifetime_s is None:
            return self.proxy_idle_s
        return max(self.proxy_idle_s, self.proxy_lifetime_s)

    @property
    def margin_s(self) -> float | None:
        """How long the upstream outlives the proxy's idle connections (negative: races)."""
        if self.upstream_close_s is None:
            return None
        return self.upstream_close_s - self.proxy_keeps_s

    @property
    def is_valid(self) -> bool:
        return self.verdict != "invalid"

    # -- JSON, at the edges only ----------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        document = dataclasses.asdict(self)
        document["gaps_s"] = list(self.gaps_s)
        document.update(cell=self.cell, n_requests=self.n_requests, n_502=self.n_502,
                        n_served=self.n_served, n_failed=self.n_failed,
                        n_unserved=self.n_unserved, failure_rate=self.failure_rate,
                        n_race_failures=self.n_race_failures, n_race=self.n_race,
                        n_hidden_races=self.n_hidden_races, margin_s=self.margin_s)
        return document

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Trial:
        """Read a stored record (of this version or an older one); derived keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in document.items() if k in names}
        values["gaps_s"] = tuple(float(g) for g in values.get("gaps_s") or ())
        values["proxy_idle_s"] = float(document["proxy_idle_s"])
        values["upstream_idle_s"] = float(document["upstream_idle_s"])
        values.setdefault("proxy", "unknown")
        values.setdefault("upstream", "unknown")
        return cls(**values)

    def with_(self, **changes: Any) -> Trial:
        """A copy with `changes` (the record is frozen)."""
        return dataclasses.replace(self, **changes)
