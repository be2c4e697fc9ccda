"""Run the race-hunting Locust load as a subprocess and read what it found.

Design decision: Locust never runs inside `tuner` (it patches the process with gevent on
import); it runs as `python -m locust` with our locust module, in a process group of its
own like every lab process, and hands its totals back as a JSON file it writes atomically.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from tuner.analysis.stopping import StopRule
from tuner.errors import Cancelled, ConfigError, LoadError
from tuner.lab.process import LOOPBACK, ManagedProcess, held_signals, pick_free_port
from tuner.load.methods import parse_method_mix

#: time for Locust to start (and fork workers) and to stop, on top of a trial's budget
STARTUP_AND_STOP_S = 30.0
#: how long a master waits for its remote workers to connect (pods to be scheduled, their
#: image to start), on top of that
REMOTE_WORKERS_WAIT_S = 120.0


@dataclass(frozen=True)
class LocustPlan:
    host_url: str
    gaps_s: Sequence[float]
    burst_size: int = 30
    methods: str = "POST"
    path: str = "/"
    mode: str = "bursts"
    #: "bursts": one gap per burst; "groups": every burst tries every gap (tuner.load.conduct)
    sweep: str = "bursts"
    max_seconds: float = 40.0
    max_requests: int = 0
    #: Locust workers forked on this machine (`--processes`)
    workers: int = 0
    #: Locust workers started elsewhere (pods: tuner.kube.workers; tests: LocalWorkers),
    #: which connect to the master on `master_bind_host`
    remote_workers: int = 0
    master_bind_host: str = LOOPBACK
    #: the master measures each worker's clock offset (tuner.load.clocks); off only to
    #: measure what skew does without it
    clock_sync: bool = True
    seed: int = 0
    stop: StopRule = field(default_factory=StopRule)
    #: TESTS ONLY: spread each burst over up to this many ms (see ExperimentSpec.loosen_ms)
    loosen_ms: float = 0.0
    #: further Locust options, passed as they are (e.g. ("--loglevel", "DEBUG"))
    locust_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Refuse here what Locust would only log and ignore (see locust_keepalive)."""
        if not self.gaps_s or min(self.gaps_s) <= 0:
            raise ConfigError(f"gaps {list(self.gaps_s)}: a non-empty list of positive seconds")
        parse_method_mix(self.methods)
        if self.mode not in ("bursts", "steady"):
            raise ConfigError(f"mode {self.mode!r} is not bursts or steady")
        if self.sweep not in ("groups", "bursts"):
            raise ConfigError(f"sweep {self.sweep!r} is not groups or bursts")
        if self.sweep == "groups" and self.burst_size < len(self.gaps_s):
            raise ConfigError(f"burst_size {self.burst_size} is below the {len(self.gaps_s)} "
                              "gaps: every gap needs a group of at least one user; raise "
                              f"burst_size to {len(self.gaps_s)} or more, or sweep one gap "
                              "per burst")
        if self.burst_size < 1 or self.workers < 0 or self.max_seconds <= 0:
            raise ConfigError(f"burst_size {self.burst_size} must be >= 1, workers "
                              f"{self.workers} >= 0, max_seconds {self.max_seconds:g} > 0")
        if self.workers and self.remote_workers:
            raise ConfigError(f"workers {self.workers} and remote workers "
                              f"{self.remote_workers}: one kind of worker per run")


class WorkerLauncher(Protocol):
    """Starts the remote workers of one run, given a worker's command line (less the
    options that are the launcher's own, such as --tuner-delay-ms), and stops them."""

    def start(self, argv: list[str]) -> None: ...

    def stop(self) -> None:
        """Quick and never raising: it runs on the way out of an interrupted load, with
        signals held."""
        ...

    def describe(self) -> str:
        """What the workers are doing, for an error message; never raises."""
        ...


def _module_path() -> str:
    return str(resources.files("tuner.load").joinpath("locust_keepalive.py"))


def _load_args(plan: LocustPlan) -> list[str]:
    """The options every Locust process of the run takes: the target and the load."""
    # Locust sends nothing at all to a --host with a path, even a bare "/" (measured:
    # http://127.0.0.1:PORT/ gave 0 requests, without the slash 240): the URL's path goes
    # in front of the request path instead
    url = urlsplit(plan.host_url)
    path = url.path.rstrip("/") + plan.path + (f"?{url.query}" if url.query else "")
    argv = ["--host", f"{url.scheme}://{url.netloc}", "--loglevel", "WARNING",
            "--tuner-gaps", ",".join(f"{g:.6f}".rstrip("0").rstrip(".") for g in plan.gaps_s),
            "--tuner-burst-size", str(plan.burst_size), "--tuner-methods", plan.methods,
            "--tuner-path", path, "--tuner-mode", plan.mode, "--tuner-sweep", plan.sweep,
            "--tuner-max-seconds", str(plan.max_seconds),
            "--tuner-max-requests", str(plan.max_requests),
            "--tuner-unsafe-after", str(plan.stop.unsafe_after_failures),
            "--tuner-safe-after", str(plan.stop.safe_after_requests),
            "--tuner-seed", str(plan.seed),
            "--tuner-clock-sync", "on" if plan.clock_sync else "off"]
    if plan.loosen_ms:
        argv += ["--tuner-loosen-ms", f"{plan.loosen_ms:g}"]
    return argv


def locust_argv(plan: LocustPlan, *, results_path: Path, master_port: int = 5557) -> list[str]:
    """The Locust command line for `plan` (pure); with workers, its master listens on
    `plan.master_bind_host`:`master_port` (Locust's default is every interface, port 5557)."""
    argv = [sys.executable, "-m", "locust", "-f", _module_path(), "--headless",
            "--only-summary", *_load_args(plan), "--tuner-results", str(results_path)]
    if plan.remote_workers > 0:
        # nothing is sent before every worker is there, and not forever
        argv += ["--master", "--expect-workers", str(plan.remote_workers),
                 "--expect-workers-max-wait", f"{REMOTE_WORKERS_WAIT_S:g}",
                 "--master-bind-host", plan.master_bind_host,
                 "--master-bind-port", str(master_port)]
    elif plan.workers > 0:
        # the workers are forked on this machine: nothing else may join as a worker
        argv += ["--processes", str(plan.workers), "--master-bind-host", LOOPBACK,
                 "--master-bind-port", str(master_port), "--master-port", str(master_port)]
    return argv + list(plan.locust_args)


def worker_argv(plan: LocustPlan, *, master_host: str, master_port: int) -> list[str]:
    """The command line of one remote worker of `plan` (pure): this interpreter and this
    module's path, which a worker pod of the runner's own image has too."""
    return [sys.executable, "-m", "locust", "-f", _module_path(), "--worker",
            "--master-host", master_host, "--master-port", str(master_port),
            *_load_args(plan), *plan.locust_args]


def load_deadline_s(plan: LocustPlan) -> float:
    """The longest one load of `plan` may take, start-up and stop included: its budget,
    Locust's start and stop, and the wait for remote workers."""
    return plan.max_seconds + STARTUP_AND_STOP_S + (
        REMOTE_WORKERS_WAIT_S if plan.remote_workers else 0.0)


def run_locust(plan: LocustPlan, *, workdir: Path, name: str = "locust",
               on_tick: Callable[[float], None] | None = None,
               cancel: threading.Event | None = None,
               launcher: WorkerLauncher | None = None, master_host: str = LOOPBACK,
               master_port: int | None = None) -> dict[str, Any]:
    """Run one bounded Locust load; return its results document. `cancel`: set by the main
    thread when the run is interrupted; Locust is then stopped within a quarter second
    (a load in a worker thread never sees Ctrl-C itself). With `plan.remote_workers`,
    `launcher` starts them, aimed at `master_host`:`master_port` (default: a free port
    here), and stops them when the load ends."""
    if plan.remote_workers and launcher is None:
        raise ConfigError(f"{plan.remote_workers} remote workers and nothing to start them")
    if importlib.util.find_spec("locust") is None:
        raise LoadError(f"Locust is not installed in this Python ({sys.executable}); install "
                        "it with `pip install locust` (or `pip install -e .`)")
    results_path = workdir / f"{name}-results.json"
    results_path.unlink(missing_ok=True)
    if master_port is None:
        master_port = pick_free_port() if plan.workers or plan.remote_workers else 5557
    argv = locust_argv(plan, results_path=results_path, master_port=master_port)
    process = ManagedProcess(argv, name=name, log_dir=workdir)
    process.start()
    deadline = time.monotonic() + load_deadline_s(plan)
    started = time.monotonic()
    workers_state = ""
    try:
        if launcher is not None and plan.remote_workers:
            launcher.start(worker_argv(plan, master_host=master_host, master_port=master_port))
        while process.exit_status() is None:
            if time.monotonic() > deadline:
                raise LoadError(f"Locust did not stop within {plan.max_seconds:g}s + "
                                f"{load_deadline_s(plan) - plan.max_seconds:g}s; its log: "
                                f"{process.stderr_path}")
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"the load on {plan.host_url} was stopped: the run was "
                                "interrupted")
            if on_tick is not None:
                on_tick(time.monotonic() - started)
            time.sleep(0.25)
    finally:
        with held_signals():
            process.stop()
            if launcher is not None and plan.remote_workers:
                if process.exit_status() not in (0, 1) or not results_path.exists():
                    workers_state = launcher.describe()  # before they are gone
                launcher.stop()
    status = process.exit_status()
    try:
        document: dict[str, Any] = json.loads(results_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        document = {}
    # Locust exits 1 when requests failed (expected here) and 2 on an unhandled error.
    if not document or status not in (0, 1):
        problems = [line for line in process.stderr_path.read_text(errors="replace")
                    .splitlines() if "rror" in line or "tuner:" in line][-3:]
        raise LoadError(f"Locust exited (status {status}) without usable results: "
                        + ("; ".join(problems) or "no error line") +
                        (f"; its {plan.remote_workers} workers: {workers_state}"
                         if plan.remote_workers else "")
                        + f"; its whole log: {process.stderr_path}")
    return document
