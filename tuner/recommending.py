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

from tuner.analysis.judge import Control
from tuner.analysis.recommend import Recommendation, recommend
from tuner.durations import format_seconds
from tuner.errors import ConfigError
from tuner.experiment.spec import ExperimentSpec
from tuner.kube.objects import recommendation_configmaps, server_snippets
from tuner.store import ResultsStore
from tuner.trial import Trial

WHOLE_SECOND_UPSTREAMS = ("uvicorn", "gunicorn", "hypercorn")


@dataclass(frozen=True)
class RecommendationReport:
    experiment_id: str
    spec: ExperimentSpec
    recommendations: list[Recommendation]
    trials: list[Trial]
    versions: dict[str, str]
    host: str
    control: Control

    @property
    def primary(self) -> Recommendation:
        return self.recommendations[0]

    @property
    def upstream(self) -> str:
        """The upstream as measured: a command of the user's is not the built-in server."""
        return "command" if self.spec.upstream_cmd else self.spec.upstream

    def settings(self) -> dict[str, str]:
        """What to set on each side, in its own syntax (empty without a recommendation)."""
        rec = self.primary
        if rec.status != "ok" or rec.proxy_idle_s is None or rec.upstream_idle_s is None:
            return {}
        return server_snippets(rec.proxy_idle_s, rec.upstream_idle_s, self.upstream,
                               proxy=self.spec.proxy,
                               proxy_lifetime_ratio=rec.proxy_lifetime_ratio)

    def as_json(self) -> dict[str, Any]:
        primary = dataclasses.asdict(self.primary)
        return {"experiment_id": self.experiment_id, "proxy": self.spec.proxy,
                "upstream": self.upstream, **primary, "settings": self.settings(),
                "control_raced": self.control.raced,
                "others": [dataclasses.asdict(r) for r in self.recommendations[1:]]}

    def configmaps(self, *, name: str, namespace: str) -> list[dict[str, Any]]:
        generated_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        return recommendation_configmaps(
            self.primary, name=name, namespace=namespace, experiment_id=self.experiment_id,
            generated_at=generated_at, proxy=self.spec.proxy, upstream=self.upstream,
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
        trials = [stored.trial for stored in store.trials(experiment["id"])]
    spec = ExperimentSpec.from_stored(experiment["spec"])
    if not trials:
        raise ConfigError(f"experiment {experiment['id']} in {db} has no finished trial; "
                          f"continue it with `tuner experiment --db {db} --resume`")
    settings = sorted({t.upstream_idle_s for t in trials if not t.control})
    if upstream_idle_s is not None:
        if not any(abs(s - upstream_idle_s) < 1e-9 for s in settings):
            raise ConfigError(f"--upstream-idle {format_seconds(upstream_idle_s)} was not in "
                              "the experiment; it had "
                              + ", ".join(format_seconds(s) for s in settings))
        settings = [upstream_idle_s] + [s for s in settings if abs(s - upstream_idle_s) > 1e-9]
    whole = spec.upstream in WHOLE_SECOND_UPSTREAMS and not spec.upstream_cmd
    controls = [t for t in trials if t.control]
    control = Control.of(controls[-1] if controls else None, skipped=not spec.control)
    recs = [recommend(trials, upstream_idle_setting_s=s, margin_s=margin_s,
                      configured_proxy_idle_s=proxy_idle_s, whole_seconds=whole,
                      target_rate=target_rate, control=control) for s in settings]
    return RecommendationReport(experiment["id"], spec, recs, trials,
                                experiment["versions"], experiment["host"], control)


def render_answer(report: RecommendationReport) -> list[str]:
    """The first screen: what to set on each side, in its own syntax, and why to trust it."""
    rec = report.primary
    lines = []
    settings = report.settings()
    if settings:
        lines.append("set (either side is enough; both gives the margin twice):")
        lines += [f"  {key.removesuffix('-snippet'):<10} {value}"
                  for key, value in settings.items()]
    else:
        lines.append(f"NO RECOMMENDATION ({rec.status}): {rec.more_load}")
    if rec.evidence is not None:
        lines.append(f"evidence: {rec.evidence.text}")
    if rec.bound_note:
        lines.append(f"note: {rec.bound_note}")
    lines.append(f"control: {report.control.text}")
    return lines


def render_report(report: RecommendationReport) -> str:
    spec = report.spec
    lines = [f"experiment {report.experiment_id}: {spec.proxy} -> {report.upstream}", "",
             *render_answer(report)]
    for rec in report.recommendations:
        lines.append(f"\nupstream idle setting {format_seconds(rec.upstream_idle_setting_s)}")
        if rec.upstream_close_s is not None:
            lines.append(f"  measured close    {rec.upstream_close_s:.3f} s (setting "
                         f"{'+' if (rec.upstream_close_offset_s or 0) >= 0 else ''}"
                         f"{rec.upstream_close_offset_s or 0:.2f} s)")
        if rec.proxy_lifetime_ratio > 1.01:
            lines.append(f"  proxy keeps       idle connections up to "
                         f"{rec.proxy_lifetime_ratio:.2f}x its setting (measured)")
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
            if "by_margin" in bad:
                lines.append(f"  unsafe            proxy idle "
                             f"{format_seconds(bad['proxy_idle_s'])}: {bad['by_margin']}")
                continue
            hidden = (f", {bad['n_hidden']} of them hidden from the client by the proxy's "
                      "retries" if bad["n_hidden"] else "")
            lines.append(f"  unsafe            proxy idle {format_seconds(bad['proxy_idle_s'])}: "
                         f"{bad['n_race']} races in {bad['n_reused']} reused requests "
                         f"({bad['rate']:.1%}, 95 % CI {bad['rate_low']:.1%}-"
                         f"{bad['rate_high']:.1%}){hidden}")
        if rec.n_hidden_races:
            lines.append(f"  hidden races      {rec.n_hidden_races} races the proxy retried on a "
                         "fresh connection: the client saw a success, at the cost of a second "
                         "round trip and a replayed request; a POST or PATCH there fails")
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
            lines.append(f"  {rec.status.upper():<17} {rec.more_load}")
    lines.append("\nmasks, not fixes:")
    for alt in report.primary.alternatives:
        lines.append(f"  {alt['proxy']}: {alt['setting']}  ({alt['effect']})")
    return "\n".join(lines)
