"""What an experiment found: its trials, the recommendation for each upstream setting, and
what its positive control showed, read from a results store (`load_findings`).

The analysis itself is pure (tuner.analysis.recommend); this module reads the store and
gives the findings their machine shapes (JSON, ConfigMaps). Text and HTML for people live in
tuner.output.
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
from tuner.kube.gateways import TargetRef, gateway_object
from tuner.kube.objects import (
    app_configmap,
    provenance,
    recommendation_configmaps,
    server_snippets,
)
from tuner.store import ResultsStore
from tuner.trial import Trial

WHOLE_SECOND_UPSTREAMS = ("uvicorn", "gunicorn", "hypercorn")


@dataclass(frozen=True)
class Findings:
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

    def gateway_objects(self, output: str, *, name: str, namespace: str, host: str | None,
                        target_refs: list[TargetRef]) -> list[dict[str, Any]]:
        """`-o destinationrule` / `-o backendtrafficpolicy`: the Envoy family's object with
        the recommended proxy idle timeout, then the app's ConfigMap key (write_back.app)."""
        rec = self.primary
        if rec.proxy_idle_s is None or rec.upstream_idle_s is None or rec.status != "ok":
            raise ConfigError("the data does not support a recommendation, so there is "
                              f"nothing to write: {rec.more_load}")
        generated_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        annotations = provenance(rec, experiment_id=self.experiment_id,
                                 generated_at=generated_at)
        objects = [gateway_object(output, proxy_idle_s=rec.proxy_idle_s, name=name,
                                  namespace=namespace, host=host, target_refs=target_refs,
                                  annotations=annotations)]
        if "app" in self.spec.write_back:
            objects.append(app_configmap(rec.upstream_idle_s, self.spec.write_back["app"],
                                         annotations=annotations))
        return objects


def load_findings(db: Path, *, margin_s: float | None, proxy_idle_s: float | None,
                 upstream_idle_s: float | None, target_rate: float,
                 experiment_id: str | None = None) -> Findings:
    if not db.exists():
        raise ConfigError(f"results store {db} does not exist; run `tuner experiment --db {db}`")
    with ResultsStore(db, create=False) as store:
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
    return Findings(experiment["id"], spec, recs, trials,
                                experiment["versions"], experiment["host"], control)
