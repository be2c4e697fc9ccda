from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tuner.durations import (
    format_seconds,
    haproxy_time,
    nginx_time,
    parse_duration,
    plain_seconds,
    whole_ms,
    whole_s,
)
from tuner.errors import ConfigError


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("5s", 5.0), ("1m", 60.0), ("1m30s", 90.0), ("2", 2.0), ("2.5", 2.5),
    ("1h", 3600.0), (" 1500MS ", 1.5), ("0.25s", 0.25),
])
def test_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "0", "0s", "-1s", "5 s", "5sec", "ms", "1m-30s", "1e3",
                                  "nan", "30s1m0"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(text, what="--proxy-idle")
    assert "--proxy-idle" in str(info.value)
    assert repr(text) in str(info.value)


@given(st.integers(min_value=1, max_value=10**8))
@example(1000)
@example(1)
@example(60_000)
@example(90_000)
def test_format_round_trips_whole_milliseconds(ms: int) -> None:
    assert parse_duration(format_seconds(ms / 1000)) == pytest.approx(ms / 1000)


def test_server_syntax() -> None:
    assert nginx_time(60) == "60s"
    assert nginx_time(1.5) == "1500ms"
    assert haproxy_time(0.25) == "250ms"
    assert whole_ms(0.1, server="Node") == 100  # binary noise in 0.1 must not matter
    assert whole_s(5.0, server="uvicorn") == 5
    assert plain_seconds(2.0) == "2"
    assert plain_seconds(0.25) == "0.25"


def test_values_a_server_cannot_take_are_errors_not_rounded() -> None:
    with pytest.raises(ConfigError, match=r"uvicorn takes whole seconds; 1.5s is not one"):
        whole_s(1.5, server="uvicorn")
    with pytest.raises(ConfigError, match="whole milliseconds"):
        nginx_time(0.0005)
