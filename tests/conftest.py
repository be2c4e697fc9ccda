"""Shared fixtures: real servers on 127.0.0.1, always stopped."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hypothesis import settings

from tuner.lab import get_upstream
from tuner.lab.lab import UpstreamServer
from tuner.lab.process import ManagedProcess, http_get, is_listening, pick_free_port
from tuner.lab.proxy import children
from tuner.sidecar import parse_tuning, render_nginx

from .real_cluster import RealCluster, real_cluster

# Hypothesis fails an example that takes over 200 ms by default: on 2 shared cores, with the
# suite's nginx, Node and Kubernetes processes beside it, a pure property test's example can
# take longer. The properties are what the tests check, not their speed.
settings.register_profile("shared-cores", deadline=None)
settings.load_profile("shared-cores")

# A test run started in the background of a non-interactive shell (`make test &`, a CI
# runner's script) inherits SIGINT ignored, and so would every tuner it starts: the Ctrl-C
# tests' SIGINT then did nothing (seen here: a fresh-clone run failed 5 tests so, and a
# sixth on the pipes of the labs they left running). A handler
# here is reset to the default in every child at exec, so each child takes Ctrl-C again.
signal.signal(signal.SIGINT, signal.default_int_handler)

TUNER = [sys.executable, "-m", "tuner.cli"]

_PR_SET_CHILD_SUBREAPER = 36


def pytest_configure(config: pytest.Config) -> None:
    # Orphans (a worker whose master died) are re-parented to the nearest subreaper; making
    # the test process one keeps them visible to `descendants`, so a leak cannot hide.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1)


def descendants(pid: int) -> set[int]:
    """All live descendant pids of `pid`, from /proc (Linux)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may contain spaces; the fields after ") " are fixed
        fields = stat.rsplit(") ", 1)[1].split()
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        children = {child for child, parent in parents.items() if parent in frontier}
        frontier = children - found
        found |= children
    return found


def alive(pids: set[int]) -> set[int]:
    """The pids in `pids` that are still running (zombies count as gone)."""
    left = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            left.add(pid)
    return left


def wait_for(is_true: Callable[[], object], *, timeout_s: float, what: str,
             interval_s: float = 0.02) -> None:
    """Poll `is_true` until it holds; fail naming `what` after `timeout_s`. Tests wait for a
    condition this way, never by sleeping a guessed time and then asserting."""
    deadline = time.monotonic() + timeout_s
    while not is_true():
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout_s:g}s")
        time.sleep(interval_s)


@pytest.fixture
def no_leftover_children() -> Iterator[None]:
    """Fail the test if it leaves a child process of this test process running."""
    before = descendants(os.getpid())
    yield
    leftover = alive(descendants(os.getpid()) - before)
    assert not leftover, f"processes left running: {sorted(leftover)}"


#: the tuning a pod starts with: nginx's includes are rendered from it before nginx starts
FIRST_TUNING = {"generation": "1", "upstream-keepalive-timeout": "60",
                "upstream-keepalive-connections": "128", "keep-alive": "600"}


@dataclass
class Pod:
    """nginx + Node + `tuner sidecar`, wired as in manifests/overlays/demo."""

    workdir: Path
    render_dir: Path
    nginx_url: str
    sidecar_url: str
    #: the app (Node): a test restarts it as a new pod of its Deployment would start
    app: UpstreamServer
    sidecar_port: int
    nginx_pid: int
    #: nginx's workers as last seen, and the sidecar's reload count they belong to
    workers_seen: set[int]
    reloads_seen: int
    #: the `tuner sidecar` process (its stderr shows any traceback)
    sidecar_process: ManagedProcess | None = None

    def status(self, since: int | None = None) -> dict[str, object]:
        query = f"?since={since}" if since is not None else ""
        document: dict[str, object] = httpx.get(f"{self.sidecar_url}/status{query}").json()
        return document

    def wait_generation(self, generation: str, timeout_s: float = 10) -> dict[str, object]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.status()
            if status["generation"] == generation:
                self.wait_workers(status, timeout_s=timeout_s)
                return status
            time.sleep(0.1)
        pytest.fail(f"the sidecar never applied generation {generation}: {self.status()}")

    def wait_workers(self, status: Mapping[str, object], *, timeout_s: float = 10) -> None:
        """After the sidecar's reloads up to `status`, wait until nginx runs only workers
        started since: an old worker in its graceful shutdown keeps the old settings on the
        connections it holds, and before nginx has handled the SIGHUP an old worker still
        takes new connections."""
        reloads = int(str(status["reloads"]))
        if reloads == self.reloads_seen:
            return
        old = self.workers_seen
        wait_for(lambda: (workers := children(self.nginx_pid)) and not workers & old,
                 timeout_s=timeout_s, what=f"nginx workers other than {sorted(old)} alone")
        self.workers_seen, self.reloads_seen = children(self.nginx_pid), reloads


@contextmanager
def start_pod(tmp_path: Path, source_args: Sequence[str], *,
              first_tuning: Mapping[str, str] = FIRST_TUNING,
              app_idle_s: float = 1.0,
              caller_args: Sequence[str] = ("--allow-unauthenticated",)) -> Iterator[Pod]:
    """Start Node (keepAliveTimeout `app_idle_s`), nginx (including files rendered from
    `first_tuning`) and the sidecar with `source_args` as its tuning source (and any further
    flags) and `caller_args` saying who may call /probe; always stop them."""
    render = tmp_path / "render"
    render.mkdir()
    for name, text in render_nginx(parse_tuning(first_tuning)).items():
        (render / name).write_text(text)
    upstream = UpstreamServer(get_upstream("node"), workdir=tmp_path, port=pick_free_port())
    upstream.start(app_idle_s)
    port = pick_free_port()
    user = "user root root;" if os.geteuid() == 0 else ""
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""{user}
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {tmp_path}; proxy_temp_path {tmp_path};
    access_log off;
    include {render}/client-keepalive.conf;
    upstream app {{
        server 127.0.0.1:{upstream.port};
        include {render}/upstream-keepalive.conf;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://app; proxy_http_version 1.1;
                      proxy_set_header Connection ""; }}
    }}
}}
""")
    nginx_binary = shutil.which("nginx") or "/usr/sbin/nginx"
    nginx = ManagedProcess([nginx_binary, "-g", "daemon off;", "-c", str(conf),
                            "-e", str(tmp_path / "error.log")], name="nginx", log_dir=tmp_path)
    nginx.start()
    sidecar_port = pick_free_port()
    sidecar = ManagedProcess(
        [*TUNER, "sidecar", *source_args, "--render-dir", str(render),
         "--nginx-pid", str(tmp_path / "nginx.pid"), "--error-log", str(tmp_path / "error.log"),
         "--nginx-conf", str(conf), "--listen", f"127.0.0.1:{sidecar_port}", "--poll", "100ms",
         "--app-url", f"http://127.0.0.1:{upstream.port}/", *caller_args],
        name="sidecar", log_dir=tmp_path)
    sidecar.start()
    try:
        nginx.wait_ready(lambda: is_listening(port), timeout_s=10, what="listen")
        sidecar.wait_ready(lambda: http_get(sidecar_port, "/status") is not None, timeout_s=20,
                           what="serve /status")
        wait_for(lambda: children(nginx.pid), timeout_s=10, what="nginx workers")
        # workers first, then the reload count: a reload in between leaves the old workers
        # marked as current, and a later wait then only waits less, never forever
        workers = children(nginx.pid)
        answer = http_get(sidecar_port, "/status")
        assert answer is not None
        yield Pod(tmp_path, render, f"http://127.0.0.1:{port}",
                  f"http://127.0.0.1:{sidecar_port}", upstream, sidecar_port, nginx.pid,
                  workers, int(json.loads(answer[1])["reloads"]), sidecar)
    finally:
        sidecar.stop()
        nginx.stop()
        upstream.stop()


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    """A real control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
    Kubernetes v1.34.4) for the whole session, started on first use; RBAC enforced."""
    with real_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


def signal_and_wait(process: subprocess.Popen[str], signum: int, *,
                    timeout_s: float = 20) -> str:
    """Send `signum` and wait for the exit; its stderr. If it does not stop, SIGTERM (the
    CLI's clean stop), then SIGKILL, so a failing test leaves nothing running behind it
    (a lab left so once failed a later, unrelated test on its leaked pipes)."""
    process.send_signal(signum)
    try:
        return process.communicate(timeout=timeout_s)[1] or ""
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        raise


def lab_up_text(args: Sequence[str]) -> str:
    """`tuner lab up ARGS`'s human output up to its "Up." line, then Ctrl-C (and wait)."""
    process = subprocess.Popen([*TUNER, "lab", "up", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    lines: list[str] = []
    try:
        while not lines or not lines[-1].startswith("Up."):
            line = process.stdout.readline()
            assert line, f"output ended early: {lines}"
            lines.append(line.strip())
    finally:
        signal_and_wait(process, signal.SIGINT)
    return "\n".join(lines)
