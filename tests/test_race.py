"""The keep-alive race, reproduced with real nginx / HAProxy in front of a real Node server.

Timing-dependent by nature: the window per burst is a few milliseconds wide on loopback, so
the bursts' idle gaps sweep +-10 ms around Node's measured close time (2 ms steps); in the
lab that gave 18-39 failures per 360 requests with nginx. The assertions are generous
(at least one) but real: a proxy that closed idle connections first would fail them.
"""

from __future__ import annotations

import pytest

from tuner.analysis.outcomes import Outcome
from tuner.analysis.signatures import count_nginx_signatures, n_races
from tuner.lab import Lab, get_upstream
from tuner.load.bursts import BurstPlan, BurstReport, run_bursts, straddling_gaps
from tuner.probe import parse_target, probe

pytestmark = pytest.mark.race


def _measured_close_s(lab: Lab) -> float:
    assert lab.upstream is not None
    measured = probe(parse_target(f"{lab.upstream.url}/"), n_samples=3, max_idle_s=10)
    assert len(measured.closes_s) == 3, measured
    assert measured.earliest_close_s is not None
    return measured.earliest_close_s


def _hunt(lab: Lab, close_s: float) -> BurstReport:
    assert lab.proxy is not None
    plan = BurstPlan(url=f"{lab.proxy.url}/orders", burst_size=30, n_bursts=12,
                     max_seconds=35, method="POST",
                     gaps_s=straddling_gaps(close_s, below_s=0.01, above_s=0.01, n_steps=11))
    return run_bursts(plan)


def test_nginx_502s_when_it_outlives_node_and_none_when_it_does_not() -> None:
    with Lab(proxy="nginx", upstream=get_upstream("node"), proxy_idle_s=60,
             upstream_idle_s=1) as lab:
        assert lab.proxy is not None
        close_s = _measured_close_s(lab)

        mark = lab.proxy.error_log.mark()
        unsafe = _hunt(lab, close_s)
        unsafe_log = count_nginx_signatures(lab.proxy.error_log.lines_since(mark))
        assert unsafe.counts.n_502 >= 1, unsafe.counts.as_dict()
        assert n_races(unsafe_log) >= 1, unsafe_log

        # Safe: nginx gives up idle connections a second before Node closes them.
        lab.set_proxy_idle(round(close_s - 1.0, 3))
        mark = lab.proxy.error_log.mark()
        safe = _hunt(lab, close_s)
        safe_log = count_nginx_signatures(lab.proxy.error_log.lines_since(mark))
        assert safe.counts.n_requests == unsafe.counts.n_requests
        assert safe.counts.n_failed == 0, safe.counts.as_dict()
        assert n_races(safe_log) == 0, safe_log


def test_haproxy_closes_the_client_connection_silently() -> None:
    """HAProxy (http-reuse safe) answers a race on a reused server connection by closing the
    client connection with no status at all: the client sees a reset, not a 502."""
    with Lab(proxy="haproxy", upstream=get_upstream("node"), proxy_idle_s=60,
             upstream_idle_s=1) as lab:
        close_s = _measured_close_s(lab)
        report = _hunt(lab, close_s)
        assert report.counts.total[Outcome.RESET] >= 1, report.counts.as_dict()
        assert report.counts.n_502 == 0
