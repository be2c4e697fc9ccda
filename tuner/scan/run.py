"""The scan from start to answer: read, discover, plan, probe, judge (I/O glue).

Nothing here decides anything: discovery, data planes and verdicts are the pure modules';
this wires them to the API reads and the probes, and times the whole.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tuner.errors import KubeForbidden
from tuner.kube.client import Connection
from tuner.output.scan import ScanReport
from tuner.scan import audit
from tuner.scan.dataplanes import idle_setting
from tuner.scan.discovery import (
    default_ingress_class,
    pod_targets,
    routes_from_httproutes,
    routes_from_ingresses,
)
from tuner.scan.listing import read_snapshot
from tuner.scan.probing import ProbeJob, probe_all, probe_url


@dataclass(frozen=True)
class ScanSettings:
    #: None: every namespace the account may list, cluster-wide
    namespaces: Sequence[str] | None
    #: the longest any pod is watched for its idle close
    max_idle_s: float = 120.0
    #: connect and answer timeout of each probe connection
    answer_timeout_s: float = 5.0
    #: pods probed at once (each holds n_samples + 1 connections)
    concurrency: int = 32
    n_samples: int = 2
    all_pods: bool = False
    margin_s: float | None = None
    #: --proxy-idle: class name ("" for any unknown class) -> seconds
    proxy_idle_s: Mapping[str, float] | None = None
    ingress_nginx_configmap: str = "ingress-nginx/ingress-nginx-controller"


def scan(connection: Connection, settings: ScanSettings, *,
         fallback_namespace: str | None = None) -> ScanReport:
    """Audit every backend. With no namespaces named and no right to list cluster-wide,
    falls back to `fallback_namespace` (the context's) and says so in `unreadable`."""
    started = time.monotonic()
    namespaces = list(settings.namespaces) if settings.namespaces is not None else None
    try:
        snapshot = read_snapshot(connection, namespaces=namespaces,
                                 ingress_nginx_configmap=settings.ingress_nginx_configmap)
    except KubeForbidden as exc:
        if namespaces is not None or fallback_namespace is None:
            raise
        namespaces = [fallback_namespace]
        snapshot = read_snapshot(connection, namespaces=namespaces,
                                 ingress_nginx_configmap=settings.ingress_nginx_configmap)
        snapshot.unreadable["all namespaces"] = (
            f"{str(exc).split(';')[0]}: scanned only namespace {fallback_namespace!r} (name "
            "more with -n, or use the cluster-wide overlay)")
    routes = [*routes_from_ingresses(snapshot.ingresses,
                                     default_class=default_ingress_class(
                                         snapshot.ingress_classes)),
              *routes_from_httproutes(snapshot.httproutes, snapshot.gateways)]
    targets, gaps = pod_targets(routes, snapshot, all_pods=settings.all_pods)
    plans = [audit.plan(target, idle_setting(target.route, snapshot,
                                             proxy_idle_s=settings.proxy_idle_s),
                        max_idle_s=settings.max_idle_s, margin_s=settings.margin_s)
             for target in targets]
    jobs = [ProbeJob(key=i, url=probe_url(p.target.address, p.target.port,
                                          p.target.route.path, scheme=p.scheme),
                     host_header=p.host_header, max_idle_s=p.max_idle_s,
                     verify_tls=p.scheme != "https")  # pod IPs are not in the certificate
            for i, p in enumerate(plans) if not p.skip]
    outcomes = {o.key: o for o in probe_all(jobs, concurrency=settings.concurrency,
                                            n_samples=settings.n_samples,
                                            answer_timeout_s=settings.answer_timeout_s)}
    findings = [audit.finding(p, outcomes.get(i), margin_s=settings.margin_s)
                for i, p in enumerate(plans)]
    findings += [audit.gap_finding(gap, idle_setting(gap.route, snapshot,
                                                     proxy_idle_s=settings.proxy_idle_s))
                 for gap in gaps]
    findings.sort(key=lambda f: (f.route_namespace, f.route, f.service, f.pod))
    return ScanReport(findings=findings, namespaces=namespaces,
                      elapsed_s=time.monotonic() - started,
                      limit_s=max((job.max_idle_s for job in jobs), default=0.0),
                      finished_at_unix_s=round(time.time(), 3),
                      unreadable=dict(snapshot.unreadable))
