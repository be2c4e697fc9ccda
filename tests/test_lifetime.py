"""The proxy's real idle lifetime, measured against an upstream of ours that never closes:
real nginx and HAProxy processes on 127.0.0.1."""

from __future__ import annotations

from tuner.lab.lifetime import measure_lifetime, measure_lifetimes


def test_nginx_keeps_idle_connections_as_long_as_its_setting() -> None:
    measured = measure_lifetimes("nginx", [0.3, 0.6])
    for setting_s, lifetime in measured.items():
        assert lifetime.n_still_open == 0 and len(lifetime.lifetimes_s) >= 8
        assert lifetime.min_s is not None and lifetime.max_s is not None
        # keepalive_timeout is a timer: a few ms late at most, never early by more
        assert setting_s - 0.02 <= lifetime.min_s <= lifetime.max_s <= setting_s + 0.1


def test_haproxy_pool_purge_delay_is_not_a_lifetime() -> None:
    # every pool-purge-delay HAProxy closes about half of the idle connections above its
    # estimate of need: the last ones outlive the setting several times over
    lifetime = measure_lifetime("haproxy", 0.3)
    assert lifetime.max_s is not None
    assert lifetime.max_s >= 2 * 0.3, lifetime.lifetimes_s
