"""`tuner experiment` (local target), before the first trial: check on a lab of its own that
the upstream serves the experiment's request and keeps the connection after it; refuse the
experiment otherwise, before any trial is stored (tuner.analysis.preflight says why).

Design decision: a short-lived lab of its own, built as the trials' labs are (same proxy,
upstream, Host), rather than the trials' first lab: the check then needs nothing of the
runner's lab pool, and costs one start of the upstream and the proxy (about a second, a
JVM's start for Tomcat) against trials of minutes.
"""

from __future__ import annotations

from collections.abc import Callable

from tuner.errors import PreflightRefused
from tuner.experiment.spec import ExperimentSpec
from tuner.lab import Lab
from tuner.lab.preflight import preflight
from tuner.lab.upstreams import upstream_from


def preflight_experiment(spec: ExperimentSpec, *, upstream_idle_s: float,
                         say: Callable[[str], None]) -> None:
    """Raise PreflightRefused (exit 2) unless the upstream serves `spec`'s request (each
    method of its mix, its path, its Host) on a kept connection, straight and through the
    proxy; say what it got otherwise."""
    with Lab(proxy=spec.proxy, upstream=upstream_from(spec.upstream, spec.upstream_cmd),
             proxy_idle_s=max(spec.proxy_idle_s), upstream_idle_s=upstream_idle_s,
             upstream_host=spec.host) as lab:
        result = preflight(lab, methods=spec.methods, path=spec.path)
    if not result.is_ok:
        assert result.problem is not None
        raise PreflightRefused(result.problem)
    say(result.text)
