"""`tuner experiment --target kubernetes`: run the trials of a spec in a cluster.

One trial:
  1. patch the tuning ConfigMap: the proxy's idle timeout, the app's idle setting, and a
     generation naming this trial;
  2. when the app's setting changed, restart its Deployment as `kubectl rollout restart`
     does (the app reads the key at start) and wait for the rollout;
  3. wait until every sidecar beside the proxy reports the trial's generation applied;
  4. ask one sidecar to probe the app beside it: its real idle close, which the gaps
     straddle (Node closes a second after its setting); the control trial then sets the
     proxy's idle timeout well above it, under a generation of its own, and waits again;
  5. mark every sidecar's error log, run the race-hunting Locust load against the Service
     (with `kubernetes.workers: N`, from N worker pods the runner's Locust master conducts:
     tuner.kube.workers), and take the signatures each sidecar counted since its mark;
  6. store the trial (results store on a volume) and its summary in the ledger ConfigMap.
At the end the baseline settings are restored, and the recommendation ConfigMap (plus the
spec's write_back targets) is written.

Design decision: the ledger ConfigMap, not a flag, decides about resuming. A Job whose pod
is evicted or hits an error is re-run by Kubernetes (backoffLimit) with the same spec and
volume; it finds the ledger of an unfinished experiment with the same spec and continues
it, and it restores the baseline the *first* run recorded, never the half-tuned settings
the cut-short run left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tuner import __version__
from tuner.errors import ConfigError, KubeError, KubeWaitTimeout
from tuner.experiment.runner import ExperimentRun
from tuner.experiment.spec import ExperimentSpec
from tuner.experiment.trials import (
    PROBE_SAMPLES,
    InvalidTrial,
    TrialKey,
    TrialPlan,
    control_proxy_idle_s,
    gaps_for,
    load_plan,
    measured_trial,
    new_trial,
    plan_trials,
    probe_max_idle_s,
    run_trials,
)
from tuner.kube.apply import ApplyResult, apply_configmaps, connect
from tuner.kube.cluster import Cluster, sidecar_get, sum_signatures
from tuner.kube.rollout import pod_fingerprint, sidecar_urls
from tuner.kube.target import ClusterTarget, cluster_target
from tuner.kube.workers import RunnerPod, WorkerJob, require_runner_pod, runner_image
from tuner.lab.process import held_signals
from tuner.load.locust_runner import LocustPlan, WorkerLauncher, load_deadline_s, run_locust
from tuner.store import ResultsStore, StoredTrial
from tuner.trial import Trial

#: Kubernetes gives a pod 30 s (the Job sets 60 s) between SIGTERM and SIGKILL: the
#: restore after an interruption or an error must fit, so no API call is retried after
#: this many seconds (each request is bounded by REQUEST_TIMEOUT), and it does not wait
#: for the rollout it starts
RESTORE_WITHIN_S = 20.0


@dataclass
class ClusterRun(ExperimentRun):
    #: the ConfigMaps written at the end, or why no recommendation could be written
    written: list[ApplyResult] = field(default_factory=list)
    recommendation_problem: str | None = None
    notes: list[str] = field(default_factory=list)


#: the spec's load fields before they followed the close (tuner.analysis.budget.load_shape)
_SHAPE_BEFORE_THE_CLOSE = {"burst_size": 30, "gap_steps": 7, "gap_half_width_s": 0.009}


def spec_digest(spec: ExperimentSpec) -> str:
    """What identifies "the same experiment" to a re-run Job (the db path aside). A shape
    left to the close (None) hashes as the fixed values it replaced (30 users, 7 gaps,
    +-9 ms), so a Job re-run with a newer image still finds its ledger and baseline."""
    document = {k: v for k, v in spec.as_dict().items() if k != "db"}
    for key, before in _SHAPE_BEFORE_THE_CLOSE.items():
        if document.get(key) is None:
            document[key] = before
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]


def _versions() -> dict[str, str]:
    versions = {"tuner": __version__, "python": platform.python_version(),
                "target": "kubernetes"}
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        versions["locust"] = importlib.metadata.version("locust")
    return versions


@dataclass(frozen=True)
class _Workers:
    """Worker pods for every trial's load: where their master is, and their image."""

    runner: RunnerPod
    image: str

    def plan(self, cluster: Cluster, plan: LocustPlan) -> tuple[LocustPlan, WorkerJob]:
        """`plan` with its users spread over the worker pods, and what starts them."""
        target = cluster.target
        remote = dataclasses.replace(plan, remote_workers=target.workers,
                                     master_bind_host=self.runner.ip)
        return remote, WorkerJob(
            cluster.connection, target, self.runner, image=self.image, call=cluster.call,
            deadline_s=load_deadline_s(remote))


@dataclass
class _Deployed:
    """The app setting this run last restarted the Deployment with; None while unknown
    (before the first restart, and while one is under way)."""

    upstream_value: str | None

    def restart(self, cluster: Cluster, upstream_value: str | None) -> None:
        """Restart the app onto `upstream_value` (already in the ConfigMap)."""
        self.upstream_value = None  # unknown until the restart is through
        cluster.restart()
        self.upstream_value = upstream_value


def run_cluster_experiment(spec: ExperimentSpec, *, kubeconfig: str | None,
                           context: str | None, say: Callable[[str], None] = print,
                           tick: Callable[[str], None] | None = None,
                           poll_s: float = 1.0) -> ClusterRun:
    """Run (or continue, from the ledger) an experiment in the cluster."""
    if spec.proxy not in ("nginx", "envoy"):
        raise ConfigError(f"proxy: {spec.proxy!r}: in a cluster the tuner sidecar drives the "
                          "proxy, and it drives nginx and Envoy only; run HAProxy experiments "
                          "on the local lab")
    if spec.host is not None:
        raise ConfigError(f"host: {spec.host!r} sets the Host the lab's proxy sends the "
                          "upstream; in a cluster the proxy beside the app sends its own "
                          "(its configuration's): drop host for --target kubernetes")
    target = cluster_target(spec.kubernetes, upstream_idle_s=spec.upstream_idle_s,
                            proxy_idle_s=spec.proxy_idle_s)
    if target.workers and spec.workers:
        raise ConfigError(f"workers: {spec.workers} (processes beside the runner) and "
                          f"kubernetes.workers: {target.workers} (pods): choose one")
    runner = require_runner_pod(target, os.environ)
    connection = connect(kubeconfig=kubeconfig, context=context)
    cluster = Cluster(connection, target, say=say, poll_s=poll_s)
    tuning = cluster.read_tuning()
    cluster.check_deployment()
    workers = None
    if runner is not None:
        workers = _Workers(runner, runner_image(cluster.core, runner, host=cluster.host,
                                                context=cluster.context, call=cluster.call))
        say(f"the load comes from {target.workers} worker pods (image {workers.image}), "
            f"conducted by this pod's Locust master at {runner.ip}:"
            f"{target.worker_master_port}")
    ledger_cm = cluster.read_configmap(target.ledger_configmap, missing_ok=True)
    ledger = dict(ledger_cm.data or {}) if ledger_cm is not None else {}
    keys = (target.proxy_idle_key, target.upstream_idle_key, target.generation_key)
    db = Path(spec.db)
    notes: list[str] = []
    with ResultsStore(db) as store:
        digest = spec_digest(spec)
        stored = (store.experiment(ledger["experiment-id"])
                  if ledger.get("spec-digest") == digest and ledger.get("experiment-id")
                  else None)
        baseline = _baseline(ledger, tuning, keys, digest=digest, target=target, say=say)
        if stored is not None:
            experiment_id = stored["id"]
            if ledger.get("state") == "finished":
                say(f"experiment {experiment_id} already finished (ledger ConfigMap "
                    f"{target.ledger_configmap}); writing its recommendation again. Delete "
                    "that ConfigMap to start a new experiment")
        else:
            if ledger.get("experiment-id"):
                notes.append(f"the ledger named experiment {ledger['experiment-id']}, which "
                             f"{db} does not hold with this spec: a new experiment started")
            experiment_id = uuid.uuid4().hex[:12]
            store.add_experiment(experiment_id=experiment_id, created_at=time.time(),
                                 spec=spec.as_dict(), versions=_versions(),
                                 host=f"kubernetes {cluster.host} namespace "
                                      f"{target.namespace}")
        unfinished = ledger.get("state") == "running"
        plan = plan_trials(store, experiment_id, spec)
        if stored is not None and ledger.get("state") == "finished":
            plan.todo = []  # its invalid trials stay as they are: this is a re-run Job
        say(f"{'resuming ' if stored else ''}experiment {experiment_id} in namespace "
            f"{target.namespace}: {len(plan.order)} trials"
            f"{f', {plan.n_done} already recorded' if stored else ''}, results in {db}")
        stale = {key: None for key in ledger if key.startswith("trial-")} if not stored else {}
        # "running" until the baseline is back, even with nothing left to run: a run killed
        # while restoring leaves it so, and the next one restores
        cluster.patch_data(target.ledger_configmap, {
            **stale, "experiment-id": experiment_id, "spec-digest": digest,
            "state": "running" if plan.todo or unfinished else "finished",
            "baseline": json.dumps(baseline, sort_keys=True),
            "updated-at": _now()}, create=True)
        # Unknown, not the ConfigMap's value: a run cut short between patching the app key
        # and restarting leaves pods that do not run what the ConfigMap says. The first
        # trial (and a restore) therefore always restarts.
        deployed = _Deployed(None)
        if plan.todo or unfinished:
            _run_with_restore(cluster, spec, store, experiment_id, plan, baseline=baseline,
                              deployed=deployed, workers=workers, say=say, tick=tick)
        trials = store.trials(experiment_id)
    run = ClusterRun(experiment_id, db, spec, trials, len(plan.order), notes=notes)
    _write_recommendation(run, cluster, say=say)
    return run


#: the generation the runner writes: experiment id, trial index, attempt
_OUR_GENERATION = re.compile(r"[0-9a-f]{12}-\d{3}-\d+(-control)?")


def _baseline(ledger: Mapping[str, str], tuning: Mapping[str, str],
              keys: tuple[str, ...], *, digest: str, target: ClusterTarget,
              say: Callable[[str], None]) -> dict[str, str | None]:
    """The settings to restore at the end: what an unfinished run of this same spec
    recorded, else the tuning ConfigMap as it is now, unless that is itself a trial's."""
    if ledger.get("state") == "running" and ledger.get("baseline"):
        if ledger.get("spec-digest") == digest:
            say(f"the ledger ConfigMap {target.ledger_configmap} shows a run of this spec "
                "that was cut short; the baseline it recorded will be restored")
            recorded: dict[str, str | None] = json.loads(ledger["baseline"])
            return recorded
        say(f"warning: the ledger ConfigMap {target.ledger_configmap} shows an unfinished "
            f"run of another spec, whose baseline was {ledger['baseline']}; it is not "
            "restored (its keys may not be this spec's)")
    generation = tuning.get(target.generation_key, "")
    if _OUR_GENERATION.fullmatch(generation.strip()):
        raise ConfigError(
            f"ConfigMap {target.namespace}/{target.tuning_configmap} is at generation "
            f"{generation!r}, a trial of an earlier tuner run that never restored it, and no "
            f"ledger of this spec says what it was before. Set "
            f"{', '.join(k for k in keys if k != target.generation_key)} to the values to "
            f"keep and {target.generation_key} to 0, then run again")
    return {key: tuning.get(key) for key in keys}


def _run_with_restore(cluster: Cluster, spec: ExperimentSpec, store: ResultsStore,
                      experiment_id: str, plan: TrialPlan, *, baseline: Mapping[str, str | None],
                      deployed: _Deployed, workers: _Workers | None,
                      say: Callable[[str], None], tick: Callable[[str], None] | None) -> None:
    target = cluster.target

    def recorded(index: int, stored: StoredTrial) -> None:
        trial = stored.trial
        summary = {"verdict": trial.verdict, "n_requests": trial.n_requests,
                   "n_failed": trial.n_failed, "n_502": trial.n_502,
                   "generation": trial.generation, "invalid_reason": trial.invalid_reason,
                   "cell": stored.cell, "repeat": stored.repeat, "attempt": stored.attempt,
                   "n_load_processes": trial.n_load_processes,
                   "clock_offsets_ms": dict(trial.clock_offsets_ms)}
        cluster.patch_data(target.ledger_configmap, {
            f"trial-{index:03d}": json.dumps(summary, sort_keys=True), "updated-at": _now()})

    def run_one(key: TrialKey) -> Trial:
        index = plan.order.index(key)
        attempt = plan.attempts.get((key.cell, key.repeat), 0)
        return cluster_trial(cluster, spec, key,
                             generation=f"{experiment_id}-{index:03d}-{attempt}",
                             deployed=deployed, workdir=workdir, workers=workers, tick=tick)

    finished = False
    stopped_by = "an error"
    with tempfile.TemporaryDirectory(prefix="tuner-locust-") as tmp:
        workdir = Path(tmp)
        try:
            run_trials(store, experiment_id, plan, spec=spec, say=say, recorded=recorded,
                       new=lambda key: new_trial(spec, key, upstream=spec.upstream),
                       run_one=run_one)
            finished = True
        except KeyboardInterrupt as exc:
            stopped_by = f"{exc or 'SIGINT'}"
            cluster.hard_deadline = time.monotonic() + RESTORE_WITHIN_S
            raise
        except KubeError as exc:
            stopped_by = str(exc)
            cluster.hard_deadline = time.monotonic() + RESTORE_WITHIN_S
            raise
        finally:
            with held_signals():  # a second SIGTERM must not cut the restore short
                restored = _restore(cluster, baseline, deployed=deployed, say=say)
                if not restored:
                    stopped_by = f"the baseline was not restored ({stopped_by})"
                _close_ledger(cluster, finished=finished and restored,
                              stopped_by=stopped_by, say=say)
    if not restored:
        raise KubeError(f"the trials are done, but the baseline of ConfigMap "
                        f"{target.tuning_configmap} was not restored (see above); the ledger "
                        "keeps it, and the next run restores it")
    try:  # outside held_signals: this wait may be long, and SIGTERM may end it
        cluster.wait_rollout()
    except KubeWaitTimeout as exc:
        say(f"the baseline is in ConfigMap {target.tuning_configmap}, but the app's rollout "
            f"did not complete: {exc}")


def cluster_trial(cluster: Cluster, spec: ExperimentSpec, key: TrialKey, *,
                  generation: str, deployed: _Deployed, workdir: Path,
                  workers: _Workers | None = None,
                  tick: Callable[[str], None] | None = None) -> Trial:
    """One trial in the cluster, measured, not yet judged. A wait that runs out raises
    InvalidTrial (the trial is recorded as failed, with the reason); an API refusal raises
    KubeError (the experiment stops: every further trial would be refused too)."""
    target = cluster.target
    trial = new_trial(spec, key, upstream=spec.upstream).with_(generation=generation)
    upstream_value = target.upstream_value(key.upstream_idle_s)
    # the control's proxy setting follows the close, measured below: until then, the
    # grid's largest
    proxy_idle_s = max(spec.proxy_idle_s) if key.control else key.proxy_idle_s
    changes = {target.proxy_idle_key: target.proxy_value(proxy_idle_s),
               target.generation_key: generation}
    restart = deployed.upstream_value != upstream_value
    if restart:
        changes[target.upstream_idle_key] = upstream_value
    cluster.patch_data(target.tuning_configmap, changes)
    if restart:
        deployed.restart(cluster, upstream_value)
    try:
        cluster.wait_rollout()
        # one listing gives both the sidecars and what "the pods did not change" compares
        pods = cluster.list_pods()
        urls = sidecar_urls(pods, target.sidecar_port)
        cluster.wait_generation(urls, generation)
        max_idle_s = probe_max_idle_s(key.upstream_idle_s)
        measured = sidecar_get(urls[0], "/probe", timeout_s=max_idle_s + 60,
                               token=cluster.sidecar_token(), samples=PROBE_SAMPLES,
                               max_idle=f"{max_idle_s:g}s")
        close_s = measured.get("earliest_close_s")
        trial = trial.with_(upstream_close_s=close_s,
                            upstream_advertised_s=measured.get("advertised_s"),
                            close_kind=measured.get("close_kind"), n_pods=len(urls),
                            closes_by_sweep=measured.get("closes_by_sweep"),
                            sweep_period_s=measured.get("sweep_period_s"))
        if key.control:
            if close_s is None:
                raise InvalidTrial("the app never closed an idle connection: there is no "
                                   "race for a control to show", trial)
            generation = f"{generation}-control"
            trial = trial.with_(proxy_idle_s=control_proxy_idle_s(close_s),
                                generation=generation)
            cluster.patch_data(target.tuning_configmap, {
                target.proxy_idle_key: target.proxy_value(trial.proxy_idle_s),
                target.generation_key: generation})
            cluster.wait_generation(urls, generation)
        gaps_s = gaps_for(spec, close_s, max_idle_s=max_idle_s)
        try:  # a load that cannot reach a verdict at this close: this trial is invalid
            plan = load_plan(spec, target.service_url, gaps_s, close_s=close_s,
                             control=key.control)
        except ConfigError as exc:
            raise InvalidTrial(str(exc), trial) from None
        marks = {url: int(sidecar_get(url, "/status", token=cluster.sidecar_token())[
            "log_offset"]) for url in urls}
    except KubeWaitTimeout as exc:
        raise InvalidTrial(str(exc), trial) from exc
    except InvalidTrial as exc:
        raise InvalidTrial(str(exc), trial) from None
    launcher: WorkerLauncher | None = None
    master_host = "127.0.0.1"
    if workers is not None:
        plan, launcher = workers.plan(cluster, plan)
        master_host = workers.runner.ip
    results = run_locust(
        plan, workdir=workdir, launcher=launcher, master_host=master_host,
        master_port=target.worker_master_port if launcher is not None else None,
        on_tick=(lambda s: tick(f"    load running {s:4.0f} s")) if tick else None)
    statuses, problem = [], None
    for url, mark in marks.items():
        try:
            status = sidecar_get(url, "/status", token=cluster.sidecar_token(), since=mark)
        except KubeWaitTimeout as exc:
            problem = (f"the sidecar at {url} went away during the trial ({exc}): its pod "
                       "restarted, and what its proxy saw is lost")
            continue
        statuses.append(status)
        if status.get("generation") != generation:
            problem = (f"the sidecar at {url} moved from generation {generation} to "
                       f"{status.get('generation')!r} during the trial: something else "
                       f"changed ConfigMap {target.tuning_configmap}")
    before, after = pod_fingerprint(pods), pod_fingerprint(cluster.list_pods())
    if after != before:
        problem = (f"the pods changed during the trial (before: {sorted(before)}; after: "
                   f"{sorted(after)}): a new or restarted pod's proxy log is not counted")
    return measured_trial(trial, gaps_s=gaps_s, results=results,
                          signatures=sum_signatures(statuses), problem=problem)


def _restore(cluster: Cluster, baseline: Mapping[str, str | None], *, deployed: _Deployed,
             say: Callable[[str], None]) -> bool:
    """Put the tuning ConfigMap back as it was, and restart the app onto it (without
    waiting: after a SIGTERM there is no time). Never raises: it runs while another
    exception may be on its way out; it says what to do by hand, and returns False."""
    target = cluster.target
    restart = deployed.upstream_value != baseline.get(target.upstream_idle_key)
    try:
        cluster.patch_data(target.tuning_configmap, baseline)
        if restart:
            deployed.restart(cluster, baseline.get(target.upstream_idle_key))
        say(f"restored the baseline of ConfigMap {target.tuning_configmap}"
            + (f" and restarted Deployment {target.deployment}" if restart else ""))
        return True
    except KubeError as exc:
        by_hand = json.dumps({"data": dict(baseline)})
        say(f"could NOT restore the baseline: {exc}\n  restore it by hand:\n"
            f"    kubectl -n {target.namespace} patch configmap {target.tuning_configmap} "
            f"--type merge -p '{by_hand}'"
            + (f"\n    kubectl -n {target.namespace} rollout restart deployment/"
               f"{target.deployment}" if restart else "")
            + f"\n  (or run the Job again: ledger ConfigMap {target.ledger_configmap} keeps "
              "the baseline)")
        return False


def _close_ledger(cluster: Cluster, *, finished: bool, stopped_by: str,
                  say: Callable[[str], None]) -> None:
    changes = {"state": "finished", "updated-at": _now()} if finished else {
        "last-stop": f"{_now()} {stopped_by}"[:1000], "updated-at": _now()}
    try:
        cluster.patch_data(cluster.target.ledger_configmap, changes)
    except KubeError as exc:
        say(f"could not update the ledger ConfigMap: {exc}")


def _write_recommendation(run: ClusterRun, cluster: Cluster, *,
                          say: Callable[[str], None]) -> None:
    from tuner.findings import load_findings

    target = cluster.target
    findings = load_findings(run.db, margin_s=None, proxy_idle_s=None, upstream_idle_s=None,
                          target_rate=0.02, experiment_id=run.experiment_id)
    try:
        objects = findings.configmaps(name=target.recommendation_configmap,
                                    namespace=target.namespace)
    except ConfigError as exc:
        run.recommendation_problem = str(exc)
        say(f"no recommendation written: {exc}")
        return
    connection = cluster.connection
    run.written = cluster.call("write the recommendation", lambda: apply_configmaps(
        connection, objects, dry_run=False))
    for result in run.written:
        say(f"{result.action} ConfigMap {result.namespace}/{result.name}")
    # a write_back into the app's key of the tuning ConfigMap reaches the app only when it
    # starts again: restart it, or the ConfigMap and the running pods disagree
    if any(o["metadata"]["namespace"] == target.namespace
           and o["metadata"]["name"] == target.tuning_configmap
           and target.upstream_idle_key in o["data"] for o in objects[1:]):
        cluster.restart()
        say(f"restarted Deployment {target.deployment} onto the recommended "
            f"{target.upstream_idle_key}")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
