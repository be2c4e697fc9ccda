"""Upstream servers for the lab, each with its idle keep-alive timeout set through its own
real option, plus "bring your own" (`--upstream-cmd`).

Design decision: an `Upstream` is a pure description (how to build the command line for a
port and an idle timeout); `UpstreamServer` in `lab.py` is what runs it. Values a server
cannot take are refused here, before anything starts.
"""

from __future__ import annotations

import importlib.util
import shlex
import string
import sys
from dataclasses import dataclass
from importlib import resources

from tuner.durations import plain_seconds, whole_ms, whole_s
from tuner.errors import ConfigError, MissingProgramError
from tuner.lab.process import LOOPBACK, require_program


@dataclass(frozen=True)
class Upstream:
    """How to run one kind of upstream server."""

    name: str
    #: the real setting the idle timeout goes into, as its documentation names it
    idle_option: str
    #: the template for `--upstream-cmd`, None for built-in servers
    command_template: str | None = None

    def argv(self, *, port: int, idle_s: float) -> list[str]:
        """The command line that serves on 127.0.0.1:`port` with this idle timeout."""
        if self.command_template is not None:
            return ["/bin/sh", "-c", render_command(self.command_template, port=port,
                                                    idle_s=idle_s)]
        return _BUILTIN_ARGV[self.name](port, idle_s)

    def check_installed(self) -> None:
        """Raise MissingProgramError if the server's program is not installed."""
        if self.name == "node":
            require_program("node", package="nodejs")
        elif self.name in _PYTHON_SERVERS and importlib.util.find_spec(self.name) is None:
            raise MissingProgramError(
                f"{self.name} is not installed in this Python ({sys.executable}); "
                f"install it with `pip install {self.name}` or `pip install -e '.[lab]'`")


def _node_argv(port: int, idle_s: float) -> list[str]:
    app = resources.files("tuner.lab.apps").joinpath("node_server.js")
    keep_alive_ms = whole_ms(idle_s, server="Node server.keepAliveTimeout")
    return [require_program("node", package="nodejs"), str(app), str(port), str(keep_alive_ms)]


def _uvicorn_argv(port: int, idle_s: float) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "tuner.lab.apps.asgi:app", "--host", LOOPBACK,
            "--port", str(port), "--no-access-log", "--lifespan", "off",
            "--timeout-keep-alive", str(whole_s(idle_s, server="uvicorn --timeout-keep-alive"))]


def _gunicorn_argv(port: int, idle_s: float) -> list[str]:
    # gthread: the sync worker keeps no connection open, so it could never show the race.
    return [sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--workers", "1",
            "--threads", "16", "--bind", f"{LOOPBACK}:{port}",
            "--keep-alive", str(whole_s(idle_s, server="gunicorn --keep-alive")),
            "tuner.lab.apps.wsgi:app"]


def _hypercorn_argv(port: int, idle_s: float) -> list[str]:
    return [sys.executable, "-m", "hypercorn", "--bind", f"{LOOPBACK}:{port}",
            "--keep-alive", str(whole_s(idle_s, server="hypercorn --keep-alive")),
            "tuner.lab.apps.asgi:app"]


_BUILTIN_ARGV = {"node": _node_argv, "uvicorn": _uvicorn_argv, "gunicorn": _gunicorn_argv,
                 "hypercorn": _hypercorn_argv}
_PYTHON_SERVERS = ("uvicorn", "gunicorn", "hypercorn")

BUILTIN_UPSTREAMS: dict[str, Upstream] = {
    "node": Upstream("node", "server.keepAliveTimeout (milliseconds)"),
    "uvicorn": Upstream("uvicorn", "--timeout-keep-alive (whole seconds)"),
    "gunicorn": Upstream("gunicorn", "--keep-alive with gthread workers (whole seconds)"),
    "hypercorn": Upstream("hypercorn", "--keep-alive (whole seconds)"),
}

_PLACEHOLDERS = ("port", "idle_s", "idle_ms")


def get_upstream(name: str) -> Upstream:
    """The built-in upstream called `name`, or a ConfigError listing the choices."""
    try:
        return BUILTIN_UPSTREAMS[name]
    except KeyError:
        raise ConfigError(
            f"unknown upstream {name!r}; choose one of {', '.join(BUILTIN_UPSTREAMS)}, "
            "or bring your own with --upstream-cmd 'COMMAND {port} {idle_s}'") from None


def upstream_from(name: str, command: str | None) -> Upstream:
    """The user's own server when a command is given, else the built-in one called `name`."""
    return command_upstream(command) if command is not None else get_upstream(name)


def command_upstream(template: str) -> Upstream:
    """A user's own server: `template` must contain {port} and {idle_s} or {idle_ms}."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ConfigError(f"--upstream-cmd {template!r} is not a valid template: {exc}; "
                          "write literal braces as {{ and }}") from None
    unknown = fields - set(_PLACEHOLDERS)
    if unknown:
        raise ConfigError(f"--upstream-cmd {template!r} has unknown placeholder(s) "
                          f"{', '.join('{' + u + '}' for u in sorted(unknown))}; "
                          "use {port}, {idle_s} or {idle_ms}")
    if "port" not in fields:
        raise ConfigError(f"--upstream-cmd {template!r} has no {{port}}; the lab picks a free "
                          "port and your server must listen on 127.0.0.1:{port}")
    if not fields & {"idle_s", "idle_ms"}:
        raise ConfigError(f"--upstream-cmd {template!r} has neither {{idle_s}} nor {{idle_ms}}; "
                          "the lab must set your server's idle keep-alive timeout")
    try:
        shlex.split(template)
    except ValueError as exc:
        raise ConfigError(f"--upstream-cmd {template!r} cannot be parsed as a shell command: "
                          f"{exc}; check its quotes") from None
    option = "{idle_ms} (milliseconds)" if "idle_ms" in fields else "{idle_s} (seconds)"
    return Upstream("command", option, command_template=template)


def render_command(template: str, *, port: int, idle_s: float) -> str:
    """Fill a command template; {idle_ms} must be a whole number of milliseconds."""
    values: dict[str, object] = {"port": port, "idle_s": plain_seconds(idle_s)}
    if "{idle_ms}" in template:
        values["idle_ms"] = whole_ms(idle_s, server="--upstream-cmd {idle_ms}")
    return template.format(**values)
