"""`tuner scan`'s answer for people (a table), for programs (JSON) and for monitoring
(Prometheus text exposition format 0.0.4), from the same findings (pure)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from tuner.durations import format_seconds
from tuner.scan.audit import Finding

VERDICT_WORDS = {"unsafe": "EXPOSED", "safe": "safe", "inconclusive": "inconclusive",
                 "unknown": "unknown", "unprobed": "not probed"}


@dataclass(frozen=True)
class ScanReport:
    findings: list[Finding]
    namespaces: list[str] | None  # None: cluster-wide
    elapsed_s: float
    #: the longest idle period any probe waited (the scan's own limit)
    limit_s: float
    finished_at_unix_s: float
    unreadable: Mapping[str, str] = field(default_factory=dict)

    @property
    def n_exposed(self) -> int:
        return sum(f.is_exposed for f in self.findings)


def _seconds(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f} s" if signed else f"{value:.1f} s"


def render_table(report: ScanReport) -> str:
    header = ("ROUTE", "SERVICE", "POD", "DATA PLANE", "PROXY IDLE", "CLOSES", "SLACK",
              "VERDICT")
    rows = []
    for f in report.findings:
        closes = _seconds(f.upstream_close_s)
        if f.probe == "measured" and f.upstream_close_s is None:
            closes = f"> {format_seconds(f.probed_for_s or 0)}"
        elif f.probe != "measured":
            closes = f.probe
        rows.append((f.route, f.service, f.pod or "-", f.data_plane,
                     "-" if f.proxy_idle_s is None else format_seconds(f.proxy_idle_s),
                     closes, _seconds(f.slack_s, signed=True),
                     VERDICT_WORDS.get(f.verdict, f.verdict)))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    for f, row in zip(report.findings, rows, strict=True):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths,
                                                                 strict=True)).rstrip())
        lines.append(f"    idle timeout from: {f.idle_source}")
        if f.n_same_owner > 1:
            lines.append(f"    stands for {f.n_same_owner} pods of {f.owner} (--all-pods "
                         "probes each)")
        if f.verdict != "safe" or f.probe != "measured":
            lines.append(f"    {f.message}")
        if f.fix_proxy:
            lines.append(f"    fix, data plane: {f.fix_proxy}")
        if f.fix_app:
            lines.append(f"    fix, app: {f.fix_app}")
    counts = Counter(VERDICT_WORDS.get(f.verdict, f.verdict) for f in report.findings)
    scope = "all namespaces" if report.namespaces is None else \
        "namespaces " + ", ".join(report.namespaces)
    summary = ", ".join(f"{n} {word}" for word, n in sorted(counts.items())) or "no backends"
    lines.append("")
    lines.append(f"{len(report.findings)} backends in {scope}: {summary}; scanned in "
                 f"{report.elapsed_s:.1f} s (longest idle wait {report.limit_s:.1f} s)")
    for key, why in sorted(report.unreadable.items()):
        lines.append(f"not read: {key}: {why}")
    return "\n".join(lines)


def as_json(report: ScanReport) -> str:
    document = {
        "namespaces": report.namespaces,
        "elapsed_s": round(report.elapsed_s, 3),
        "limit_s": report.limit_s,
        "finished_at_unix_s": report.finished_at_unix_s,
        "n_exposed": report.n_exposed,
        "unreadable": dict(report.unreadable),
        "findings": [asdict(f) for f in report.findings],
    }
    return json.dumps(document, indent=2)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _labels(f: Finding) -> str:
    service_ns, _, service = f.service.partition("/")
    pairs = {"route_kind": f.route_kind, "route_namespace": f.route_namespace,
             "route": f.route_name, "namespace": service_ns, "service": service,
             "pod": f.pod, "data_plane": f.data_plane}
    return ",".join(f'{k}="{_escape(v)}"' for k, v in pairs.items())


def _metric(lines: list[str], name: str, kind: str, help_text: str,
            samples: Sequence[tuple[str, float]]) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        number = repr(float(value))  # exact, unlike :g (a unix time has ten digits)
        lines.append(f"{name}{{{labels}}} {number}" if labels else f"{name} {number}")


def as_prometheus(report: ScanReport) -> str:
    lines: list[str] = []
    fs = report.findings
    _metric(lines, "tuner_scan_exposed", "gauge",
            "1 if the data plane keeps idle upstream connections longer than the pod's "
            "measured idle close minus the margin (the keep-alive 502 race), else 0",
            [(_labels(f), float(f.is_exposed)) for f in fs])
    _metric(lines, "tuner_scan_verdict", "gauge",
            "1 for the scan's verdict on each backend (safe, unsafe, inconclusive, unknown, "
            "unprobed)",
            [(f'{_labels(f)},verdict="{f.verdict}",probe="{f.probe}"', 1.0) for f in fs])
    _metric(lines, "tuner_scan_proxy_idle_seconds", "gauge",
            "the data plane's upstream idle timeout for the route",
            [(_labels(f), f.proxy_idle_s) for f in fs if f.proxy_idle_s is not None])
    _metric(lines, "tuner_scan_upstream_close_seconds", "gauge",
            "the pod's measured idle keep-alive close time",
            [(_labels(f), f.upstream_close_s) for f in fs if f.upstream_close_s is not None])
    _metric(lines, "tuner_scan_slack_seconds", "gauge",
            "measured close minus the proxy's idle timeout (negative: the app closes first)",
            [(_labels(f), f.slack_s) for f in fs if f.slack_s is not None])
    _metric(lines, "tuner_scan_backends", "gauge", "backends scanned, by verdict",
            [(f'verdict="{verdict}"', float(n))
             for verdict, n in sorted(Counter(f.verdict for f in fs).items())])
    _metric(lines, "tuner_scan_duration_seconds", "gauge", "wall time of the last scan",
            [("", round(report.elapsed_s, 3))])
    _metric(lines, "tuner_scan_last_run_timestamp_seconds", "gauge",
            "when the last scan finished (unix time)", [("", report.finished_at_unix_s)])
    return "\n".join(lines) + "\n"
