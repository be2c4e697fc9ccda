"""Durations: parse what people write ("500ms", "1m30s", "2") into float seconds, and
render seconds back in each server's own syntax.

Design decision: rendering never rounds. A value a server cannot take (1500 ms for
uvicorn's whole-second `--timeout-keep-alive`) is a `ConfigError` that says so, because a
silently rounded keep-alive timeout is exactly the kind of mismatch this tool exists to find.
"""

from __future__ import annotations

import math
import re

from tuner.errors import ConfigError

_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_BARE = re.compile(r"\d+(?:\.\d+)?")
# Float seconds carry binary noise (0.1 * 1000 = 100.00000000000001); a value within this
# many units of a whole number counts as whole.
_WHOLE_TOLERANCE = 1e-6

EXAMPLES = "500ms, 5s, 1m, 1m30s or bare seconds such as 2.5"


def parse_duration(text: str, *, what: str = "duration") -> float:
    """Parse `text` into seconds; zero and negative durations are errors."""
    raw = text.strip().lower()
    if _BARE.fullmatch(raw):
        seconds = float(raw)
    else:
        pos = 0
        seconds = 0.0
        for match in _PART.finditer(raw):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNIT_S[match.group(2)]
            pos = match.end()
        if pos != len(raw) or not raw:
            raise ConfigError(f"{what} {text!r} is not a duration; write {EXAMPLES}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{what} {text!r} must be greater than zero; write {EXAMPLES}")
    return seconds


def duration_field(key: str, value: object) -> float:
    """A duration given as a field of a spec (YAML or flags): a number of seconds or a string
    `parse_duration` takes. Errors name the key and the value."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{key}: {value!r} is not a duration; write {EXAMPLES}")
    if isinstance(value, str):
        return parse_duration(value, what=f"{key}:")
    if not math.isfinite(value):
        raise ConfigError(f"{key}: {value!r} is not a finite number of seconds; write "
                          f"{EXAMPLES}")
    if value <= 0:
        raise ConfigError(f"{key}: {value!r} must be greater than zero")
    return float(value)


def format_seconds(seconds: float) -> str:
    """Human form, shortest exact: 0.5 -> "500ms", 2.0 -> "2s", 90.0 -> "1m30s"."""
    ms = round(seconds * 1000)
    if abs(ms - seconds * 1000) > _WHOLE_TOLERANCE:
        return f"{plain_seconds(seconds)}s"
    if ms % 1000:
        return f"{ms}ms" if ms < 1000 else f"{plain_seconds(ms / 1000)}s"
    whole_s = ms // 1000
    if whole_s < 600:  # "66s" reads better than "1m6s" next to other timeouts
        return f"{whole_s}s"
    minutes, rest_s = divmod(whole_s, 60)
    if minutes and rest_s:
        return f"{minutes}m{rest_s}s"
    return f"{minutes}m" if minutes else f"{whole_s}s"


def whole_ms(seconds: float, *, server: str) -> int:
    """Seconds as whole milliseconds, or a ConfigError naming the server."""
    ms = round(seconds * 1000)
    if abs(ms - seconds * 1000) > _WHOLE_TOLERANCE or ms <= 0:
        raise ConfigError(
            f"{server} takes whole milliseconds; {plain_seconds(seconds * 1000)}ms is not one. "
            "Choose a value such as 1500ms."
        )
    return ms


def whole_s(seconds: float, *, server: str) -> int:
    """Seconds as a whole number, or a ConfigError naming the server."""
    whole = round(seconds)
    if abs(whole - seconds) > _WHOLE_TOLERANCE or whole <= 0:
        raise ConfigError(
            f"{server} takes whole seconds; {format_seconds(seconds)} is not one "
            "and would be rounded. Choose a whole number of seconds such as "
            f"{max(1, math.floor(seconds))}s or {math.ceil(seconds)}s."
        )
    return whole


def nginx_time(seconds: float) -> str:
    """nginx time syntax: "2s" for whole seconds, "1500ms" otherwise."""
    ms = whole_ms(seconds, server="nginx")
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def haproxy_time(seconds: float) -> str:
    """HAProxy time syntax; milliseconds are its native unit."""
    ms = whole_ms(seconds, server="HAProxy")
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def plain_seconds(seconds: float) -> str:
    """A number of seconds without a unit, shortest form: 2.0 -> "2", 0.25 -> "0.25"."""
    return f"{seconds:.6f}".rstrip("0").rstrip(".")


def envoy_duration(seconds: float) -> str:
    """Envoy's JSON form of a protobuf Duration: "1.500s"; whole milliseconds, as the other
    proxies take (Envoy would take nanoseconds, but a grid finer than 1 ms means nothing)."""
    ms = whole_ms(seconds, server="Envoy")
    return f"{ms // 1000}.{ms % 1000:03d}s"
