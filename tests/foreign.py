"""Real foreign upstream servers for the tests: embedded Apache Tomcat 11 (what Spring Boot
runs) and Go net/http, built by scripts/foreign/build (once per machine; `make test` builds
them before pytest), as `--upstream-cmd` templates with {port} and {idle_ms}.

A failed build raises with the build's own stderr: these servers are part of what CI proves,
so their absence must fail the run, never skip it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tuner.lab.process import LOOPBACK, ManagedProcess, http_get, pick_free_port
from tuner.lab.upstreams import command_upstream

BUILD = Path(__file__).resolve().parent.parent / "scripts" / "foreign" / "build"
#: a cold build downloads Tomcat from Maven Central; a warm one prints at once
BUILD_TIMEOUT_S = 900

_templates: dict[str, str] = {}


class ForeignBuildError(RuntimeError):
    """scripts/foreign/build failed or printed no template for a server."""


def _build() -> dict[str, str]:
    """The templates, from one run of scripts/foreign/build per session."""
    if not _templates:
        try:
            done = subprocess.run([str(BUILD)], capture_output=True, text=True,
                                  timeout=BUILD_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise ForeignBuildError(f"{BUILD} did not finish within {BUILD_TIMEOUT_S} s; "
                                    f"its stderr so far:\n{exc.stderr or ''}") from None
        if done.returncode != 0:
            raise ForeignBuildError(f"{BUILD} failed (exit status {done.returncode}); "
                                    f"its stderr:\n{done.stderr}")
        found = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
        missing = {"tomcat", "go"} - found.keys()
        if missing:
            raise ForeignBuildError(f"{BUILD} printed no template for {', '.join(sorted(missing))}"
                                    f"; it printed:\n{done.stdout}\nstderr:\n{done.stderr}")
        _templates.update(found)
    return _templates


def tomcat_cmd() -> str:
    """`--upstream-cmd` template for embedded Tomcat 11 (NIO, keepAliveTimeout={idle_ms})."""
    return _build()["tomcat"]


def go_cmd() -> str:
    """`--upstream-cmd` template for Go net/http (http.Server.IdleTimeout={idle_ms}ms)."""
    return _build()["go"]


@contextmanager
def serving(template: str, *, name: str, log_dir: Path, idle_s: float) -> Iterator[int]:
    """Run the server of an `--upstream-cmd` `template` (idle timeout `idle_s`) on a free
    port, ready; its port. Always stopped; a server that died meanwhile fails the test."""
    port = pick_free_port()
    server = ManagedProcess(command_upstream(template).argv(port=port, idle_s=idle_s),
                            name=name, log_dir=log_dir)
    server.start()
    try:
        # Any HTTP answer means ready (Tomcat binds its port before it serves).
        server.wait_ready(lambda: http_get(port, "/healthz") is not None, timeout_s=60,
                          what=f"answer HTTP on {LOOPBACK}:{port}")
        yield port
        assert server.exit_status() is None, server.describe_exit()
    finally:
        server.stop()
