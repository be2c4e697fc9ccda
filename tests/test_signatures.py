from __future__ import annotations

from tuner.analysis.signatures import count_haproxy_signatures, count_nginx_signatures, n_races

# Lines as nginx 1.22 wrote them in the lab (trimmed hosts and ports).
NGINX_LINES = [
    '2026/11/22 03:00:45 [error] 4061#4061: *41 upstream prematurely closed connection while '
    'reading response header from upstream, client: 127.0.0.1, server: , request: "POST / '
    'HTTP/1.1", upstream: "http://127.0.0.1:5000/"',
    '2026/11/22 03:00:45 [error] 4061#4061: *39 recv() failed (104: Connection reset by peer) '
    'while reading response header from upstream, client: 127.0.0.1',
    '2026/11/22 03:00:46 [error] 4061#4061: *40 writev() failed (32: Broken pipe) while sending '
    'request to upstream, client: 127.0.0.1',
    '2026/11/22 03:00:47 [error] 4061#4061: *50 connect() failed (111: Connection refused) while '
    'connecting to upstream, client: 127.0.0.1',
    '2026/11/22 03:00:47 [notice] 4060#4060: signal process started',
]


def test_nginx_signatures_counted_by_kind() -> None:
    counts = count_nginx_signatures(NGINX_LINES)
    assert counts == {"prematurely_closed": 1, "reset_by_peer": 1, "broken_pipe": 1,
                      "connect_refused": 1}
    assert n_races(counts) == 3  # connect() refused is another cause


def test_haproxy_server_aborts() -> None:
    lines = [
        '127.0.0.1:1 [22/Nov/2026:03:03:19.895] f b/s 0/0/0/-1/3 502 209 - - SH-- 1/1/0/0/0 0/0 '
        '"POST / HTTP/1.1"',
        '127.0.0.1:2 [22/Nov/2026:03:03:19.895] f b/s 0/0/0/3/3 200 185 - - ---- 1/1/0/0/0 0/0 '
        '"POST / HTTP/1.1"',
    ]
    assert count_haproxy_signatures(lines) == {"SH": 1}
    # a request path that happens to look like a state must not count
    assert count_haproxy_signatures([
        '127.0.0.1:3 [22/Nov/2026:03:03:19.895] f b/s 0/0/0/3/3 200 185 - - ---- 1/1/0/0/0 0/0 '
        '"GET /SDKs HTTP/1.1"']) == {}
    assert count_nginx_signatures([]) == {}
