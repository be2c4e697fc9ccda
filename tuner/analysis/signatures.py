"""Proxy error-log signatures (and Envoy's admin counters) of the keep-alive race (pure).

nginx logs the race at [error] even when it hides it from the client by retrying an
idempotent request on a fresh connection, so counting these lines shows hidden races too.
`connect() failed (111: Connection refused)` is a different cause (the upstream is down), and
is counted apart so it is never mistaken for a timeout mismatch.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping

#: nginx [error] messages for a request written into a connection the upstream had closed
NGINX_RACE_SIGNATURES = {
    "prematurely_closed": "upstream prematurely closed connection while reading response header",
    "reset_by_peer": "(104: Connection reset by peer) while reading response header",
    "broken_pipe": "(32: Broken pipe) while sending request to upstream",
}
NGINX_OTHER_SIGNATURES = {
    "connect_refused": "(111: Connection refused) while connecting to upstream",
}
#: HAProxy httplog termination state of a server-side close/abort (first two characters)
HAPROXY_RACE_STATES = ("SH", "SD")
# httplog: ... status bytes captured_request_cookie captured_response_cookie STATE ...
_HAPROXY_STATE = re.compile(r"\s-?\d{1,3}\s+-?\d+\s+\S+\s+\S+\s+([A-Za-z-]{4})\s")


#: Envoy cluster counters the lab reads per trial, by what they mean. A request written into
#: a connection the upstream closed ends the connection with a request on it: one race. The
#: others are failures of another cause (the upstream refused, the pool overflowed).
ENVOY_STATS = {
    "upstream_cx_destroy_remote_with_active_rq": "envoy_remote_close_with_active_rq",
    "upstream_cx_connect_fail": "envoy_connect_fail",
    "upstream_rq_pending_overflow": "envoy_overflow",
    # a retry of the request (only with a route retry policy): a race the client did not see
    "upstream_rq_retry": "envoy_retry",
}
OTHER_SIGNATURES = frozenset({*NGINX_OTHER_SIGNATURES, "envoy_connect_fail", "envoy_overflow",
                              "envoy_retry"})


def envoy_signatures(*, before: Mapping[str, int], after: Mapping[str, int]) -> Counter[str]:
    """What Envoy counted between two snapshots of its cluster counters. A counter that went
    down was reset (the cluster was replaced): its value after is all that is known."""
    counts: Counter[str] = Counter()
    for stat, kind in ENVOY_STATS.items():
        now, then = after.get(stat, 0), before.get(stat, 0)
        delta = now - then if now >= then else now
        if delta:
            counts[kind] = delta
    return counts


def is_nginx_race_line(line: str) -> bool:
    """True if an nginx error-log line is a keep-alive race signature."""
    return any(needle in line for needle in NGINX_RACE_SIGNATURES.values())


def count_nginx_signatures(lines: Iterable[str]) -> Counter[str]:
    """Count race and other upstream-failure signatures in nginx error-log lines."""
    counts: Counter[str] = Counter()
    for line in lines:
        for kind, needle in (NGINX_RACE_SIGNATURES | NGINX_OTHER_SIGNATURES).items():
            if needle in line:
                counts[kind] += 1
                break
    return counts


def count_haproxy_signatures(lines: Iterable[str]) -> Counter[str]:
    """Count server-side aborts in HAProxy httplog lines, by termination state.

    HAProxy logs nothing at all when it silently closes a client connection whose reused
    server connection died (`http-reuse safe`, not the client's first request); such races
    show only on the client side, as resets.
    """
    counts: Counter[str] = Counter()
    for line in lines:
        match = _HAPROXY_STATE.search(line)
        if match and match.group(1)[:2] in HAPROXY_RACE_STATES:
            counts[match.group(1)[:2]] += 1
    return counts


def n_races(counts: Mapping[str, int]) -> int:
    """How many counted lines are keep-alive race signatures (not other causes)."""
    return sum(n for kind, n in counts.items() if kind not in OTHER_SIGNATURES)
