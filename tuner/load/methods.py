"""The method mix of the race-hunting load (pure): "POST:3,GET:1" -> weighted methods."""

from __future__ import annotations

from tuner.errors import ConfigError

#: what the load sends; a typo such as PSOT would otherwise run a whole experiment
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "LOCK")


def parse_method_mix(text: str, *, what: str = "methods") -> list[str]:
    """"POST:3,GET:1" -> ["POST", "POST", "POST", "GET"]; a ConfigError names the value."""
    mix: list[str] = []
    for part in text.split(","):
        method, _, weight = part.strip().partition(":")
        if method.upper() not in METHODS or (weight and not weight.isdigit()):
            mix = []
            break
        mix += [method.upper()] * (int(weight) if weight else 1)
    if not mix:
        raise ConfigError(f"{what}: {text!r} is not a method mix such as POST or POST:3,GET:1 "
                          f"(methods: {', '.join(METHODS)}; weights are whole numbers, at "
                          "least one above 0)")
    return mix
