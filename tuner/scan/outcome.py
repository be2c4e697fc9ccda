"""What probing one pod came to (pure: the I/O side fills it, the audit reads it)."""

from __future__ import annotations

from dataclasses import dataclass

REFUSED = "refused"
TIMEOUT = "timeout"
HTTP2_ONLY = "http2-only"
NOT_HTTP = "not-http"
MEASURED = "measured"


@dataclass(frozen=True)
class ProbeOutcome:
    key: int
    status: str  # MEASURED, REFUSED, TIMEOUT, HTTP2_ONLY, NOT_HTTP
    detail: str
    elapsed_s: float
    #: what the audit needs from a MEASURED probe (tuner.probe.ProbeResult's properties):
    #: the close time to plan with, None if the pod kept connections open to the limit
    close_s: float | None = None
    closes_on_next_request: bool = False
    keeps_alive: bool = True
    #: the pod closes by a periodic sweep: `close_s` is then the earliest age it may close at
    closes_by_sweep: bool = False
    sweep_period_s: float | None = None
