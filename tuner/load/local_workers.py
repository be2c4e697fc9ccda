"""Remote Locust workers started on this machine as processes of their own: the same path
as worker pods (each connects to the master over TCP, and the master syncs its clock), for
tests and benchmarks. A worker may be given a clock that runs behind (--tuner-delay-ms),
to measure what a skewed node does to a verdict."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tuner.lab.process import ManagedProcess


class LocalWorkers:
    """One worker process per entry of `delays_ms`, that worker's clock so far behind."""

    def __init__(self, delays_ms: Sequence[float], *, workdir: Path) -> None:
        self.delays_ms = list(delays_ms)
        self.workdir = workdir
        self.processes: list[ManagedProcess] = []

    def start(self, argv: list[str]) -> None:
        for i, delay_ms in enumerate(self.delays_ms):
            process = ManagedProcess([*argv, "--tuner-delay-ms", f"{delay_ms:g}"],
                                     name=f"locust-worker-{i}", log_dir=self.workdir)
            process.start()
            self.processes.append(process)

    def describe(self) -> str:
        return "; ".join(f"worker {i}: " + ("running" if p.exit_status() is None
                                            else p.describe_exit())
                         for i, p in enumerate(self.processes)) or "none started"

    def stop(self) -> None:
        for process in self.processes:
            process.stop()
