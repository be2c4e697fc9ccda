"""The lab the race benchmarks share: nginx keeping idle connections a second past Node's
real close of about T, so every reused request that lands in the few-millisecond window
races; with that close measured (tuner probe), which the gap sweeps straddle."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tuner.lab import Lab, get_upstream
from tuner.probe import parse_target, probe


@contextmanager
def racing_lab(t_s: float) -> Iterator[tuple[Lab, float]]:
    """The running lab and Node's measured close, in seconds."""
    with Lab(proxy="nginx", upstream=get_upstream("node"), proxy_idle_s=t_s + 1.0,
             upstream_idle_s=t_s - 1.0) as lab:
        assert lab.proxy is not None and lab.upstream is not None
        measured = probe(parse_target(f"{lab.upstream.url}/"), n_samples=5,
                         max_idle_s=3 * t_s + 5)
        close_s = measured.earliest_close_s
        assert close_s is not None, "Node never closed"
        yield lab, close_s
