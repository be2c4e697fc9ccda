"""Probe every pod at once, bounded (I/O).

Design decision: each pod gets the project's own probe (tuner/probe.py: it measures the real
idle close, not what headers say) in a worker thread, at most `concurrency` at a time, each
with its own idle limit (just long enough to judge its route's data plane, never more than
the scan's --max-idle) and short connect and answer timeouts. So the scan takes about the
longest limit, not the sum, and a pod that never answers costs its answer timeout, not the
probe's default ten seconds. A pod that does not answer HTTP/1.1 is asked for HTTP/2 (the
connection preface) to tell an h2c-only server from a broken one.
"""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tuner.errors import ConfigError, ProbeError
from tuner.probe import parse_target, probe
from tuner.scan.outcome import HTTP2_ONLY, MEASURED, NOT_HTTP, REFUSED, TIMEOUT, ProbeOutcome

#: HTTP/2 connection preface and an empty SETTINGS frame (RFC 9113 section 3.4)
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_H2_SETTINGS = 0x04


@dataclass(frozen=True)
class ProbeJob:
    """One pod to probe: where, what to ask, and how long to wait for its idle close."""

    key: int
    url: str
    host_header: str
    max_idle_s: float
    verify_tls: bool = True


def probe_url(address: str, port: int, path: str, *, scheme: str = "http") -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{scheme}://{host}:{port}{path if path.startswith('/') else '/' + path}"


def probe_all(jobs: Sequence[ProbeJob], *, concurrency: int, n_samples: int,
              answer_timeout_s: float) -> list[ProbeOutcome]:
    """Probe every job, at most `concurrency` at once; outcomes in the order of `jobs`."""
    if concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, got {concurrency}")
    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=min(concurrency, len(jobs)),
                            thread_name_prefix="scan-probe") as pool:
        return list(pool.map(lambda job: probe_one(job, n_samples=n_samples,
                                                   answer_timeout_s=answer_timeout_s), jobs))


def probe_one(job: ProbeJob, *, n_samples: int, answer_timeout_s: float) -> ProbeOutcome:
    started = time.monotonic()
    # a route without a host name: the URL's own address is the Host header
    target = parse_target(job.url, host_header=job.host_header or None,
                          verify_tls=job.verify_tls)
    try:
        result = probe(target, n_samples=n_samples, max_idle_s=job.max_idle_s,
                       connect_timeout_s=answer_timeout_s, answer_timeout_s=answer_timeout_s,
                       deadline_s=pod_deadline_s(job.max_idle_s, n_samples=n_samples,
                                                 answer_timeout_s=answer_timeout_s))
    except ProbeError as exc:
        status, detail = _classify(exc, target.host, target.port, answer_timeout_s)
        return ProbeOutcome(job.key, status, detail, time.monotonic() - started)
    return ProbeOutcome(job.key, MEASURED, "", time.monotonic() - started,
                        close_s=result.earliest_close_s,
                        closes_on_next_request=result.closes_on_next_request,
                        keeps_alive=result.keeps_alive, closes_by_sweep=result.closes_by_sweep,
                        sweep_period_s=result.sweep_period_s)


def pod_deadline_s(max_idle_s: float, *, n_samples: int, answer_timeout_s: float) -> float:
    """The most one pod's probe may take: its idle wait, each connection's connect and first
    answer, the window check's answer and the final reuses. A server trickling its answers
    byte by byte would otherwise restart the answer timeout at every byte."""
    return max_idle_s + (2 * (n_samples + 1) + 1 + n_samples) * answer_timeout_s + 1.0


def _classify(exc: ProbeError, host: str, port: int, timeout_s: float) -> tuple[str, str]:
    cause = exc.__cause__
    if cause is None and "total deadline" in str(exc):
        return TIMEOUT, f"did not finish within its deadline on {host}:{port}: {exc}"
    if isinstance(cause, ConnectionRefusedError):
        return REFUSED, f"connection refused on {host}:{port}: nothing listens there"
    if isinstance(cause, TimeoutError):
        return TIMEOUT, f"no answer within {timeout_s:g} s on {host}:{port}"
    if isinstance(cause, http.client.HTTPException | ConnectionResetError) \
            and speaks_http2(host, port, timeout_s=timeout_s):
        return HTTP2_ONLY, ("answers the HTTP/2 preface but not HTTP/1.1 (h2c only): the "
                            "HTTP/1.1 probe cannot measure it; check its HTTP/2 idle timeout")
    return NOT_HTTP, str(exc)


def speaks_http2(host: str, port: int, *, timeout_s: float) -> bool:
    """True if the server answers an HTTP/2 connection preface with a SETTINGS frame."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(_H2_PREFACE)
            header = b""
            while len(header) < 9:
                chunk = sock.recv(9 - len(header))
                if not chunk:
                    return False
                header += chunk
    except OSError:
        return False
    return header[3] == _H2_SETTINGS
