"""Run the race-hunting Locust load as a subprocess and read what it found.

Design decision: Locust never runs inside `tuner` (it patches the process with gevent on
import); it runs as `python -m locust` with our locust module, in a process group of its
own like every lab process, and hands its totals back as a JSON file it writes atomically.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tuner.analysis.stopping import StopRule
from tuner.errors import LoadError
from tuner.lab.process import ManagedProcess

#: time for Locust to start (and fork workers) and to stop, on top of a trial's budget
STARTUP_AND_STOP_S = 30.0


@dataclass(frozen=True)
class LocustPlan:
    host_url: str
    gaps_s: Sequence[float]
    burst_size: int = 30
    methods: str = "POST"
    path: str = "/"
    mode: str = "bursts"
    max_seconds: float = 40.0
    max_requests: int = 0
    workers: int = 0
    seed: int = 0
    stop: StopRule = field(default_factory=StopRule)


def locust_argv(plan: LocustPlan, *, results_path: Path) -> list[str]:
    """The Locust command line for `plan` (pure)."""
    module = resources.files("tuner.load").joinpath("locust_keepalive.py")
    argv = [sys.executable, "-m", "locust", "-f", str(module), "--headless",
            "--host", plan.host_url, "--only-summary", "--loglevel", "WARNING",
            "--tuner-gaps", ",".join(f"{g:.6f}".rstrip("0").rstrip(".") for g in plan.gaps_s),
            "--tuner-burst-size", str(plan.burst_size), "--tuner-methods", plan.methods,
            "--tuner-path", plan.path, "--tuner-mode", plan.mode,
            "--tuner-max-seconds", str(plan.max_seconds),
            "--tuner-max-requests", str(plan.max_requests),
            "--tuner-unsafe-after", str(plan.stop.unsafe_after_failures),
            "--tuner-safe-after", str(plan.stop.safe_after_requests),
            "--tuner-seed", str(plan.seed), "--tuner-results", str(results_path)]
    if plan.workers > 0:
        argv += ["--processes", str(plan.workers)]
    return argv


def run_locust(plan: LocustPlan, *, workdir: Path, name: str = "locust",
               on_tick: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Run one bounded Locust load; return its results document."""
    if importlib.util.find_spec("locust") is None:
        raise LoadError(f"Locust is not installed in this Python ({sys.executable}); install "
                        "it with `pip install locust` (or `pip install -e .`)")
    results_path = workdir / f"{name}-results.json"
    results_path.unlink(missing_ok=True)
    process = ManagedProcess(locust_argv(plan, results_path=results_path), name=name,
                             log_dir=workdir)
    process.start()
    deadline = time.monotonic() + plan.max_seconds + STARTUP_AND_STOP_S
    started = time.monotonic()
    try:
        while process.exit_status() is None:
            if time.monotonic() > deadline:
                raise LoadError(f"Locust did not stop within {plan.max_seconds:g}s + "
                                f"{STARTUP_AND_STOP_S:g}s; last lines:\n{process.stderr_tail()}")
            if on_tick is not None:
                on_tick(time.monotonic() - started)
            time.sleep(0.25)
    finally:
        process.stop()
    try:
        document: dict[str, Any] = json.loads(results_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        raise LoadError(f"Locust exited (status {process.exit_status()}) without results; "
                        f"last lines of its output:\n{process.stderr_tail(8)}") from None
    return document
