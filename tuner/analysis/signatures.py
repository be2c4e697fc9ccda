"""Proxy error-log signatures of the keep-alive race (pure).

nginx logs the race at [error] even when it hides it from the client by retrying an
idempotent request on a fresh connection, so counting these lines shows hidden races too.
`connect() failed (111: Connection refused)` is a different cause (the upstream is down), and
is counted apart so it is never mistaken for a timeout mismatch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

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
        for field in line.split():
            if len(field) == 4 and field[:2] in HAPROXY_RACE_STATES and field[2:].isascii():
                counts[field[:2]] += 1
                break
    return counts


def n_races(counts: Counter[str]) -> int:
    """How many counted lines are keep-alive race signatures (not other causes)."""
    return sum(n for kind, n in counts.items() if kind not in NGINX_OTHER_SIGNATURES)
