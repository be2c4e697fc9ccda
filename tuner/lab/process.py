"""Managed child processes: one process group each, ready checks, guaranteed teardown.

Design decision: every server runs in a session (process group) of its own, so stopping it
signals the whole tree (nginx workers, gunicorn workers, a shell's children). On Linux each
child also gets PR_SET_PDEATHSIG=SIGTERM, so even a `kill -9` of `tuner` takes its servers
down with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tuner.errors import MissingProgramError, ProcessStartError

LOOPBACK = "127.0.0.1"
_PR_SET_PDEATHSIG = 1


def pick_free_port(host: str = LOOPBACK) -> int:
    """A TCP port the OS says is free now on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def require_program(program: str, *, package: str) -> str:
    """Absolute path of `program`, or a MissingProgramError naming the Debian package."""
    found = shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin")
    if found is None:
        raise MissingProgramError(
            f"{program} is not installed; install it with `apt-get install {package}` "
            "(or run `make demo`, which installs it)"
        )
    return found


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def tail(path: Path, n_lines: int = 5) -> str:
    """The last `n_lines` non-empty lines of a text file, or "" if there is none."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-n_lines:])


class ManagedProcess:
    """A child process in its own process group, with stdout/stderr in files."""

    def __init__(self, argv: Sequence[str], *, name: str, log_dir: Path, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.name = name
        self.cwd = cwd
        self.env = env
        self.stdout_path = log_dir / f"{name}.stdout"
        self.stderr_path = log_dir / f"{name}.stderr"
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._popen is not None, "process not started"
        return self._popen.pid

    def start(self) -> None:
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self._popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=self.cwd,
                env=self.env, start_new_session=True, preexec_fn=_die_with_parent,
            )

    def exit_status(self) -> int | None:
        """None while running, else the exit status (negative: killed by that signal)."""
        return None if self._popen is None else self._popen.poll()

    def stderr_tail(self, n_lines: int = 5) -> str:
        return tail(self.stderr_path, n_lines) or tail(self.stdout_path, n_lines)

    def describe_exit(self) -> str:
        status = self.exit_status()
        what = f"exited (status {status})" if status is not None else "is running"
        last = self.stderr_tail()
        return f"{self.name} {what}; last lines of its output:\n{last}" if last else (
            f"{self.name} {what} and printed nothing")

    def wait_ready(self, is_ready: Callable[[], bool], *, timeout_s: float, what: str) -> None:
        """Poll `is_ready` until true; fail fast, with the process's stderr, if it exits."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.exit_status() is not None:
                raise ProcessStartError(f"{self.describe_exit()}\n(waiting for it to {what})")
            if is_ready():
                return
            if time.monotonic() > deadline:
                raise ProcessStartError(
                    f"{self.name} did not {what} within {timeout_s:g}s; command: "
                    f"{' '.join(self.argv)}\n{self.stderr_tail()}")
            time.sleep(0.02)

    def signal(self, signum: int) -> None:
        """Send `signum` to the process itself (not its group)."""
        if self.exit_status() is None:
            os.kill(self.pid, signum)

    def stop(self, *, grace_s: float = 5.0) -> None:
        """SIGTERM the whole process group, then SIGKILL whatever is left after `grace_s`."""
        if self._popen is None:
            return
        pgid = self._popen.pid  # start_new_session: the group id is the leader's pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout=grace_s)
        # The leader may be gone while its workers linger: always sweep the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout=grace_s)
        _wait_group_gone(pgid, timeout_s=grace_s)


def _wait_group_gone(pgid: int, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


def is_listening(port: int, host: str = LOOPBACK) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(port: int, path: str, *, host: str = LOOPBACK) -> tuple[int, str] | None:
    """GET `path` on a fresh connection: (status, body), or None if nothing answered HTTP."""
    conn = http.client.HTTPConnection(host, port, timeout=2)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
