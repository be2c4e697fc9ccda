"""Managed child processes: one process group each, ready checks, guaranteed teardown.

Design decision: every server runs in a session (process group) of its own, so stopping it
signals the whole tree (nginx workers, gunicorn workers, a shell's children). On Linux each
direct child also gets PR_SET_PDEATHSIG=SIGTERM, so even a `kill -9` of `tuner` takes the
proxies and built-in upstreams down with it (a proxy master stops its own workers); the
children of an `--upstream-cmd` shell are only reached through the process group, which
needs `tuner` alive.
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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from tuner.errors import LabError, MissingProgramError, ProcessStartError

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


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not glibc Linux: no parent-death signal, teardown still by group
        return None


# Loaded here, in the parent: loading a library between fork and exec is not safe.
_LIBC = _load_libc()


def _die_with_parent(parent_pid: int) -> None:  # pragma: no cover - runs in the child
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while the block runs (teardown must finish: a second
    Ctrl-C in the middle of it would leave a process running); they arrive afterwards."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


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
        parent_pid = os.getpid()
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self._popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=self.cwd,
                env=self.env, start_new_session=True,
                preexec_fn=lambda: _die_with_parent(parent_pid),
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
        if not _wait_group_gone(pgid, timeout_s=grace_s):
            raise LabError(f"{self.name} (process group {pgid}) still has processes "
                           f"{grace_s:g}s after SIGKILL; list them with `ps -g {pgid}`")


def _group_alive(pgid: int) -> bool:
    """True while a process of group `pgid` runs. Zombies do not count: an orphaned
    worker waits as a zombie until its new parent (init, or a subreaper) reaps it."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields after the command: state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _wait_group_gone(pgid: int, *, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return True
        time.sleep(0.02)
    return False


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
