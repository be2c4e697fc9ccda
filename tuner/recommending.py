"""`tuner recommend`: read a results store, recommend, and render for people, JSON or
ConfigMaps. The analysis itself is pure (tuner.analysis.recommend); this module reads the
store and shapes the output.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.analysis.recommend import Recommendation, recommend
from tuner.durations import format_seconds
from tuner.errors import ConfigError
from tuner.experiment.spec import ExperimentSpec
from tuner.kube.objects import recommendation_configmaps
from tuner.store import ResultsStore

WHOLE_SECOND_UPSTREAMS = ("uvicorn", "gunicorn", "hypercorn")


@dataclass(frozen=True)
class RecommendationReport:
    experiment_id: str
    spec: ExperimentSpec
    recommendations: list[Recommendation]
    records: list[dict[str, Any]]
    versions: dict[str, str]
    host: str

    @property
    def primary(self) -> Recommendation:
        return self.recommendations[0]

    def as_json(self) -> dict[str, Any]:
        primary = dataclasses.asdict(self.primary)
        return {"experiment_id": self.experiment_id, "proxy": self.spec.proxy,
                "upstream": self.spec.upstream, **primary,
                "others": [dataclasses.asdict(r) for r in self.recommendations[1:]]}

    def configmaps(self, *, name: str, namespace: str) -> list[dict[str, Any]]:
        generated_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        return recommendation_configmaps(
            self.primary, name=name, namespace=namespace, experiment_id=self.experiment_id,
            generated_at=generated_at, proxy=self.spec.proxy, upstream=self.spec.upstream,
            write_back=self.spec.write_back)


def build_report(db: Path, *, margin_s: float | None, proxy_idle_s: float | None,
                 upstream_idle_s: float | None, target_rate: float,
                 experiment_id: str | None = None) -> RecommendationReport:
    if not db.exists():
        raise ConfigError(f"results store {db} does not exist; run `tuner experiment --db {db}`")
    with ResultsStore(db) as store:
        experiment = store.experiment(experiment_id)
        if experiment is None:
            raise ConfigError(f"{db} holds no experiment; run `tuner experiment --db {db}`")
        records = [t.record for t in store.trials(experiment["id"])]
    spec = ExperimentSpec.from_stored(experiment["spec"])
    if not records:
        raise ConfigError(f"experiment {experiment['id']} in {db} has no finished trial; "
                          f"continue it with `tuner experiment --db {db} --resume`")
    settings = sorted({float(r["upstream_idle_s"]) for r in records})
    if upstream_idle_s is not None:
        if not any(abs(s - upstream_idle_s) < 1e-9 for s in settings):
            raise ConfigError(f"--upstream-idle {format_seconds(upstream_idle_s)} was not in "
                              "the experiment; it had "
                              + ", ".join(format_seconds(s) for s in settings))
        settings = [upstream_idle_s] + [s for s in settings if abs(s - upstream_idle_s) > 1e-9]
    whole = spec.upstream in WHOLE_SECOND_UPSTREAMS and not spec.upstream_cmd
    recs = [recommend(records, upstream_idle_setting_s=s, margin_s=margin_s,
                      configured_proxy_idle_s=proxy_idle_s, whole_seconds=whole,
                      target_rate=target_rate) for s in settings]
    return RecommendationReport(experiment["id"], spec, recs, [dict(r) for r in records],
                                experiment["versions"], experiment["host"])


def render_report(report: RecommendationReport) -> str:
    spec = report.spec
    lines = [f"experiment {report.experiment_id}: {spec.proxy} -> {spec.upstream}"]
    for rec in report.recommendations:
        lines.append(f"\nupstream idle setting {format_seconds(rec.upstream_idle_setting_s)}")
        if rec.upstream_close_s is not None:
            lines.append(f"  measured close    {rec.upstream_close_s:.3f} s (setting "
                         f"{'+' if (rec.upstream_close_offset_s or 0) >= 0 else ''}"
                         f"{rec.upstream_close_offset_s or 0:.2f} s)")
        if rec.status == "ok" and rec.proxy_idle_s is not None:
            lines.append(f"  recommend         proxy idle timeout at most "
                         f"{format_seconds(rec.proxy_idle_s)} (margin "
                         f"{format_seconds(rec.margin_s)})")
        if rec.upstream_idle_s is not None:
            lines.append(f"  or, for the proxy's {format_seconds(rec.configured_proxy_idle_s)}: "
                         f"upstream idle setting at least {format_seconds(rec.upstream_idle_s)}")
        if rec.evidence is not None:
            lines.append(f"  evidence          {rec.evidence.text}")
        for bad in rec.unsafe:
            lines.append(f"  unsafe            proxy idle {format_seconds(bad['proxy_idle_s'])}: "
                         f"{bad['n_race']} race failures in {bad['n_reused']} reused requests "
                         f"({bad['rate']:.1%}, 95 % CI {bad['rate_low']:.1%}-"
                         f"{bad['rate_high']:.1%})")
        for block in rec.model:
            lines.append(f"  model             margin {block.margin_low_s:+.2f}.."
                         f"{block.margin_high_s:+.2f} s: {block.rate:.1%} "
                         f"[{block.rate_low:.1%}-{block.rate_high:.1%}] in {block.n_reused}")
        if rec.gaps:
            hits = [g for g in rec.gaps if g.n_race]
            lines.append("  failing gaps      " + (", ".join(
                f"close{g.offset_ms:+d} ms: {g.n_race}/{g.n_requests}" for g in hits)
                if hits else "none"))
        for cause in rec.other_causes:
            lines.append(f"  other cause       {cause}")
        if rec.status != "ok":
            lines.append(f"  INSUFFICIENT      {rec.more_load}")
    lines.append("\nmasks, not fixes:")
    for alt in report.primary.alternatives:
        lines.append(f"  {alt['proxy']}: {alt['setting']}  ({alt['effect']})")
    return "\n".join(lines)
