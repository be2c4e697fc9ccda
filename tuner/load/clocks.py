"""Clock offsets between Locust's master and its workers (pure, so testable).

The master conducts in wall-clock time: it sends every worker the instant of the next burst,
and the workers report when they wrote their requests and got their first answer. On one
machine every process reads the same clock. Workers in pods on other nodes do not: a node
whose clock is d ms behind fires its users d ms late, and (worse) stamps its requests d ms
early, so the burst looks tight while its connections sat idle gaps that differ by d. The
race window is a few milliseconds wide; NTP keeps nodes within a few ms at best.

So the master measures each worker's offset the way NTP does, over the connection it
already has: it sends its time t0, the worker answers with its own time tw, the master
reads t1 on arrival. offset = tw - (t0 + t1) / 2, within half the round trip (rtt = t1 - t0)
of the truth. Of several pings the one with the shortest round trip is kept (the least
queueing). The master then sends each worker the burst's instant in that worker's clock,
and takes the worker's reports back into its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sample:
    offset_s: float
    rtt_s: float


@dataclass
class ClockSync:
    """The master's view of every worker's clock. A worker never measured has offset 0: the
    same clock as the master's, as on one machine."""

    best: dict[str, Sample] = field(default_factory=dict)

    def record(self, worker: str, *, sent_s: float, worker_s: float, received_s: float
               ) -> None:
        """One ping: sent at `sent_s` (master clock), stamped `worker_s` by the worker,
        answered at `received_s` (master clock). A reply from before its ping (a clock
        that went back on the master) is ignored."""
        rtt_s = received_s - sent_s
        if rtt_s < 0:
            return
        sample = Sample(offset_s=worker_s - (sent_s + received_s) / 2, rtt_s=rtt_s)
        if worker not in self.best or sample.rtt_s < self.best[worker].rtt_s:
            self.best[worker] = sample

    def offset_s(self, worker: str) -> float:
        sample = self.best.get(worker)
        return sample.offset_s if sample is not None else 0.0

    def to_worker(self, master_s: float, worker: str) -> float:
        """An instant of the master's clock, as `worker`'s clock reads it."""
        return master_s + self.offset_s(worker)

    def report_to_master(self, worker: str, report: Mapping[str, Any]) -> dict[str, Any]:
        """A worker's burst report with its instants moved into the master's clock (its
        idle ages are differences within one clock and stay as they are)."""
        offset_s = self.offset_s(worker)
        moved = dict(report)
        if "first_answer" in moved:
            moved["first_answer"] = float(moved["first_answer"]) - offset_s
        if "groups" in moved:
            moved["groups"] = {group: [float(first) - offset_s, float(last) - offset_s]
                               for group, (first, last) in moved["groups"].items()}
        return moved

    def summary(self) -> dict[str, dict[str, float]]:
        """Per worker: its offset and the round trip it was measured over, in ms."""
        return {worker: {"offset_ms": round(s.offset_s * 1000, 3),
                         "rtt_ms": round(s.rtt_s * 1000, 3)}
                for worker, s in sorted(self.best.items())}
