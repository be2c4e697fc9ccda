"""The request the race-hunting load repeats, beside its method mix (tuner.load.methods): the
path it asks for and the Host header the upstream sees (pure).

Design decision: the Host is set by the lab's proxy toward the upstream, not by the client,
so every client of the lab (Locust, the preflight, curl) reaches the upstream with the same
Host. Values are checked here to a charset that is safe to write into nginx, HAProxy and
Envoy configurations verbatim (no quote, space, `;`, `$` or `#` can reach them).
"""

from __future__ import annotations

import re

from tuner.errors import ConfigError

#: a host name or IPv4 address (RFC 3986 reg-name, restricted to unreserved characters), or
#: a bracketed IPv6 literal, with an optional port. `_` is allowed: RFC 3986 permits it, and
#: the preflight, not this check, tells whether the upstream accepts it (Tomcat does not).
_HOST = re.compile(r"(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{1,5}))?")
#: RFC 3986 path and query characters (pchar, "/" and "?"); no fragment, no space
_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@%/?]*")
#: paths the lab's proxies answer themselves (tuner.lab.proxy.GENERATION_PATH)
RESERVED_PREFIX = "/__tuner/"


def parse_host(value: object, *, what: str = "host") -> str:
    """A Host header value such as `127.0.0.1:8080`, `shop.example` or `[::1]:80`."""
    if not isinstance(value, str) or not _HOST.fullmatch(value):
        raise ConfigError(
            f"{what}: {value!r} is not a Host header value: give a host name or address with "
            "an optional port, such as localhost, shop.example or 127.0.0.1:8080 (letters, "
            "digits and . _ ~ -, or [IPv6])")
    match = _HOST.fullmatch(value)
    assert match is not None
    port = match.group("port")
    if port is not None and not 0 < int(port) < 65536:
        raise ConfigError(f"{what}: {value!r} has port {port}; a port is 1-65535")
    return value


def parse_path(value: object, *, what: str = "path") -> str:
    """A request path with an optional query, such as `/healthz` or `/api/orders?x=1`."""
    if not isinstance(value, str) or not _PATH.fullmatch(value):
        raise ConfigError(
            f"{what}: {value!r} is not a request path: it must start with / and hold only "
            "URL characters (no space or #), such as / or /healthz or /api/orders?dry=1")
    if value.startswith(RESERVED_PREFIX):
        raise ConfigError(f"{what}: {value!r} is the lab's own ({RESERVED_PREFIX}...): the "
                          "proxy answers it without the upstream; choose a path of your app")
    return value
