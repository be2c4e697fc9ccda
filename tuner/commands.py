"""The commands behind `tuner`: each takes parsed arguments, hands off to the library and
prints for people or as JSON. The parser and the error boundary are in `tuner.cli`.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tuner.durations import format_seconds
from tuner.errors import ConfigError, KubeError, LabError, LoadError, TunerError
from tuner.kube.gateways import GATEWAY_OUTPUTS
from tuner.lab import Lab
from tuner.lab.upstreams import upstream_from

if TYPE_CHECKING:
    from tuner.experiment.runner import ExperimentRun
    from tuner.experiment.spec import ExperimentSpec
    from tuner.findings import Findings
    from tuner.sidecar_auth import CallerCheck

EXIT_UNSAFE = 6
EXIT_INSUFFICIENT = 8
EXIT_INTERRUPTED = 130


def cmd_lab_up(args: argparse.Namespace) -> int:
    from tuner.lab.preflight import preflight
    from tuner.load.methods import parse_method_mix
    from tuner.load.request import parse_path

    upstream = upstream_from(args.upstream, args.upstream_cmd)
    parse_method_mix(args.methods, what="--methods")
    path = parse_path(args.path, what="--path")
    with Lab(proxy=args.proxy, upstream=upstream, proxy_idle_s=args.proxy_idle,
             upstream_idle_s=args.upstream_idle, upstream_host=args.host) as lab:
        info = lab.info()
        checked = preflight(lab, methods=args.methods, path=path)
        if args.json:
            print(json.dumps({**asdict(info), "path": path, "preflight": {
                "ok": checked.is_ok, "lines": list(checked.lines),
                "advice": list(checked.advice)}}), flush=True)
        else:
            print(f"proxy     {info.proxy} {info.proxy_version}  {info.proxy_url}  "
                  f"(idle toward upstream: {format_seconds(info.proxy_idle_s)})")
            print(f"upstream  {info.upstream}  {info.upstream_url}  "
                  f"({info.upstream_idle_option}: {format_seconds(info.upstream_idle_s)})")
            print(f"host      the proxy sends the upstream Host: {info.upstream_host}")
            print(f"try       curl -X {parse_method_mix(args.methods)[0]} {info.proxy_url}{path}")
            print(f"config    {info.proxy_config}")
            print(f"log       {info.proxy_error_log}")
            print(checked.text)
            for advice in checked.advice:
                print(f"warning   {advice}")
            if checked.advice:
                print("warning   `tuner experiment` refuses to run with this request: it "
                      "could measure nothing")
            if info.proxy_idle_s >= info.upstream_idle_s:
                print("warning   the proxy keeps idle connections at least as long as the "
                      "upstream's setting: expect intermittent 502s under bursty load")
            print("Up. Press Ctrl-C to stop.", flush=True)
        while True:
            problem = lab.problem()
            if problem is not None:
                raise LabError(f"the lab stopped on its own: {problem}")
            time.sleep(0.5)


def _clear_demo_store(db: Path) -> None:
    """Remove an earlier demo's store; refuse to touch any other file."""
    from tuner.demo import is_demo_store

    if not db.exists():
        return
    if not is_demo_store(db):
        raise ConfigError(f"{db} exists and is not a demo results store; choose another --db "
                          "(the demo replaces its store on every run)")
    for path in (db, db.with_name(db.name + "-journal")):
        path.unlink(missing_ok=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from tuner.demo import explain_demo, run_demo
    from tuner.output.text import render_trials

    _clear_demo_store(Path(args.db))
    say = (lambda _line: None) if args.json else (lambda line: print(line, flush=True))
    run = run_demo(db=args.db, say=say, proxy=args.proxy)
    if args.json:
        print(json.dumps(_experiment_document(run), indent=2))
    else:
        print("\n" + render_trials([t.trial for t in run.trials]) + "\n\n" + explain_demo(run))
    return 0


def _parse_headers(raw: list[str]) -> dict[str, str]:
    headers = {}
    for item in raw:
        name, sep, value = item.partition(":")
        if not sep or not name.strip() or any(c.isspace() for c in name.strip()):
            raise ConfigError(f"header {item!r} is not of the form 'Name: value'")
        if "\r" in value or "\n" in value:
            raise ConfigError(f"header {item!r} has a line break in its value; give each "
                              "header as its own -H 'Name: value'")
        headers[name.strip()] = value.strip()
    return headers


def cmd_probe(args: argparse.Namespace) -> int:
    from tuner.analysis.verdict import judge
    from tuner.probe import parse_target, probe

    target = parse_target(args.url, method=args.method, host_header=args.host_header,
                          headers=_parse_headers(args.headers), verify_tls=not args.insecure)
    show_progress = not args.json and sys.stderr.isatty()

    def progress(idle_s: float, n_open: int) -> None:
        print(f"\r  idle {idle_s:5.0f} s, {n_open} of {args.samples} connections still open ",
              end="", file=sys.stderr, flush=True)

    if not args.json:
        print(f"probing {args.url} with {args.samples} connections (up to "
              f"{format_seconds(args.max_idle)} idle), and more at staggered instants until "
              "the first close, to tell a timer from a sweep ...", flush=True)
    result = probe(target, n_samples=args.samples, max_idle_s=args.max_idle,
                   on_progress=progress if show_progress else None)
    if show_progress:
        print("\r" + " " * 60 + "\r", end="", file=sys.stderr)
    verdict = None
    if args.proxy_idle is not None:
        verdict = judge(proxy_idle_s=args.proxy_idle, upstream_close_s=result.earliest_close_s,
                        max_idle_s=args.max_idle, margin_s=args.margin,
                        closes_on_next_request=result.closes_on_next_request,
                        keeps_alive=result.keeps_alive, closes_by_sweep=result.closes_by_sweep,
                        sweep_period_s=result.sweep_period_s)
    if args.json:
        document = result.as_json()
        if verdict is not None:
            document["verdict"] = asdict(verdict)
        print(json.dumps(document, indent=2))
    else:
        from tuner.output.text import render_probe
        print(render_probe(result, verdict))
    return EXIT_UNSAFE if verdict is not None and verdict.status == "unsafe" else 0


def _experiment_spec(args: argparse.Namespace) -> ExperimentSpec:
    from tuner.experiment.spec import ExperimentSpec, load_spec, parse_spec

    spec = load_spec(Path(args.spec)) if args.spec else ExperimentSpec()
    flags = {"proxy": args.proxy, "upstream": args.upstream, "proxy_idle": args.proxy_idle,
             "upstream_idle": args.upstream_idle, "repeats": args.repeats,
             "max_seconds": args.max_seconds, "max_requests": args.max_requests,
             "gaps": args.gaps, "methods": args.methods, "path": args.path,
             "host": args.host, "burst_size": args.burst_size,
             "workers": args.workers, "seed": args.seed, "db": args.db,
             "control": args.control, "sweep": args.sweep,
             "parallel": args.parallel}
    if args.upstream_cmd is not None:
        flags["upstream_cmd"] = args.upstream_cmd
    given = {k: v for k, v in flags.items() if v is not None}
    if args.resume and (args.spec or set(given) - {"db"}):
        extra = ([args.spec] if args.spec else []) + [f"--{k.replace('_', '-')}"
                                                       for k in sorted(set(given) - {"db"})]
        raise ConfigError(f"--resume continues the stored experiment with its stored spec; "
                          f"drop {', '.join(extra)} (or start a new experiment with another "
                          "--db)")
    return parse_spec(given, base=spec)


def _experiment_document(run: ExperimentRun) -> dict[str, object]:
    return {"experiment_id": run.experiment_id, "db": str(run.db),
            "n_planned": run.n_planned,
            "trials": [dict(t.trial.to_json(), attempt=t.attempt) for t in run.trials]}


def cmd_experiment(args: argparse.Namespace) -> int:
    from tuner.experiment.runner import run_experiment
    from tuner.output.text import render_trials

    if args.target == "kubernetes" and args.resume:
        raise ConfigError("--resume: with --target kubernetes, resuming is automatic: the "
                          "ledger ConfigMap names the unfinished experiment; drop --resume")
    if args.target == "local" and (args.kubeconfig or args.context):
        raise ConfigError("--kubeconfig and --context go with --target kubernetes")
    spec = _experiment_spec(args)
    live = not args.json and sys.stderr.isatty()

    # the proxy lifetimes are measured in a thread of their own and say so while the
    # control's ticker redraws its line: one line at a time
    lines = threading.Lock()

    def say(line: str) -> None:
        with lines:
            if live:  # first clear the ticker's line
                print("\r\033[K", end="", file=sys.stderr, flush=True)
            # with --json, stdout holds the one JSON document; progress goes to stderr
            print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    def tick(line: str) -> None:
        with lines:
            print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)

    start: Callable[[], ExperimentRun]
    errors: tuple[type[TunerError], ...]
    if args.target == "kubernetes":
        from tuner.experiment.cluster_runner import ClusterRun, run_cluster_experiment

        ledger = spec.kubernetes.get("ledger_configmap", "tuner-ledger")
        hint = (f"the trials finished so far are in {spec.db}, and ledger ConfigMap "
                f"{ledger} names them: run the same command (or let the Job run again) to "
                "continue")
        errors = (LoadError, KubeError)

        def start() -> ExperimentRun:
            return run_cluster_experiment(spec, kubeconfig=args.kubeconfig,
                                          context=args.context, say=say,
                                          tick=tick if live else None)
    else:
        hint = (f"the trials finished so far are in {spec.db}; continue with\n"
                f"  tuner experiment --db {spec.db} --resume")
        errors = (LabError, LoadError)

        def start() -> ExperimentRun:
            return run_experiment(spec, resume=args.resume, say=say,
                                  tick=tick if live else None)
    try:
        run = start()
    except KeyboardInterrupt:
        print(f"\ninterrupted: {hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except errors as exc:
        print(f"error: {exc}\n{hint}", file=sys.stderr)
        return exc.exit_code
    cluster = run if args.target == "kubernetes" and isinstance(run, ClusterRun) else None
    if args.json:
        document = _experiment_document(run)
        if cluster is not None:
            document.update(written=[asdict(r) for r in cluster.written],
                            recommendation_problem=cluster.recommendation_problem,
                            notes=cluster.notes)
        print(json.dumps(document, indent=2))
    else:
        print(f"\nexperiment {run.experiment_id}: {len(run.trials)} of {run.n_planned} "
              f"trials in {run.db}\n")
        print(render_trials([t.trial for t in run.trials]))
        for note in cluster.notes if cluster else []:
            print(f"note: {note}")
    return EXIT_INSUFFICIENT if cluster and cluster.recommendation_problem else 0


def cmd_results(args: argparse.Namespace) -> int:
    from tuner.experiment.runner import ExperimentRun
    from tuner.experiment.spec import ExperimentSpec
    from tuner.experiment.trials import trial_order
    from tuner.output.text import render_trials
    from tuner.store import ResultsStore

    db = Path(args.db)
    if not db.exists():
        raise ConfigError(f"results store {db} does not exist; run `tuner experiment --db {db}`")
    with ResultsStore(db, create=False) as store:
        experiment = store.experiment(args.experiment_id)
        if experiment is None:
            ids = store.experiment_ids()
            raise ConfigError(f"{db} holds no experiment"
                              + (f" with id {args.experiment_id!r}; it holds "
                                 f"{', '.join(ids) or 'none'}" if args.experiment_id else ""))
        trials = store.trials(experiment["id"])
    spec = ExperimentSpec.from_stored(experiment["spec"])
    run = ExperimentRun(experiment["id"], db, spec, trials, len(trial_order(spec)))
    if args.json:
        document = _experiment_document(run)
        document.update(versions=experiment["versions"], host=experiment["host"],
                        spec=experiment["spec"])
        print(json.dumps(document, indent=2))
    else:
        print(f"experiment {run.experiment_id} on {experiment['host']}: {len(trials)} of "
              f"{run.n_planned} trials; versions: "
              + ", ".join(f"{k} {v}" for k, v in sorted(experiment["versions"].items())))
        print(render_trials([t.trial for t in trials]))
    return 0


def _findings(args: argparse.Namespace) -> Findings:
    from tuner.findings import load_findings

    if not 0 < args.target_rate < 1:
        raise ConfigError(f"--target-rate {args.target_rate} must be between 0 and 1")
    return load_findings(Path(args.db), margin_s=args.margin, proxy_idle_s=args.proxy_idle,
                        upstream_idle_s=args.upstream_idle, target_rate=args.target_rate)


def _objects(args: argparse.Namespace, findings: Findings, output: str | None = None
             ) -> list[dict[str, Any]]:
    """What `recommend -o ...` prints and `apply` writes: the ConfigMaps, or (-o
    destinationrule / backendtrafficpolicy) the Envoy family's object and the app's key."""
    from tuner.kube.gateways import parse_target_ref

    output = output or args.output
    if output not in GATEWAY_OUTPUTS:
        return findings.configmaps(name=args.name, namespace=args.namespace)
    return findings.gateway_objects(
        output, name=args.name, namespace=args.namespace, host=args.host,
        target_refs=[parse_target_ref(ref) for ref in args.target_ref or ()])


def cmd_apply(args: argparse.Namespace) -> int:
    from tuner.kube.apply import apply_configmaps
    from tuner.kube.client import connect

    objects = _objects(args, _findings(args))
    connection = connect(kubeconfig=args.kubeconfig, context=args.context)
    results = apply_configmaps(connection, objects, dry_run=args.dry_run)
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "results": [asdict(r) for r in results]},
                         indent=2))
    else:
        for result in results:
            print(f"{result.action:13} {result.kind.lower()} {result.namespace}/{result.name}")
            if result.diff and args.dry_run:
                print("\n".join(f"    {line}" for line in result.diff.splitlines()))
    return 0


def _scan_proxy_idle(values: list[str]) -> dict[str, float]:
    """--proxy-idle [CLASS=]DURATION, repeatable: class name ("" for any) -> seconds."""
    from tuner.durations import parse_duration

    given: dict[str, float] = {}
    for value in values:
        name, _, duration = value.rpartition("=")
        given[name.strip()] = parse_duration(duration, what=f"--proxy-idle {value!r}:")
    return given


def _valid_namespace_ref(value: str) -> str:
    from tuner.kube.objects import check_name

    namespace, slash, name = value.partition("/")
    if not slash or not namespace or not name or "/" in name:
        raise ConfigError(f"--ingress-nginx-configmap {value!r} is not NAMESPACE/NAME, e.g. "
                          "ingress-nginx/ingress-nginx-controller")
    check_name("--ingress-nginx-configmap namespace", namespace, max_length=63)
    check_name("--ingress-nginx-configmap name", name)
    return value


def cmd_scan(args: argparse.Namespace) -> int:
    from tuner.kube.client import connect
    from tuner.kube.objects import check_name
    from tuner.output.scan import as_json, as_prometheus, render_table
    from tuner.scan.listing import current_namespace
    from tuner.scan.run import ScanSettings, scan

    for namespace in args.namespaces or []:
        check_name("-n/--namespace", namespace, max_length=63)
    settings = ScanSettings(
        namespaces=args.namespaces, max_idle_s=args.max_idle,
        answer_timeout_s=args.answer_timeout, concurrency=args.concurrency,
        n_samples=args.samples, all_pods=args.all_pods, margin_s=args.margin,
        proxy_idle_s=_scan_proxy_idle(args.proxy_idle),
        ingress_nginx_configmap=_valid_namespace_ref(args.ingress_nginx_configmap))
    if args.samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {args.samples}")
    if args.concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.push is not None:
        push = urlsplit(args.push)
        if push.scheme not in ("http", "https") or not push.hostname:
            raise ConfigError(f"--push {args.push!r} is not an http(s) URL of a Pushgateway, "
                              "e.g. http://pushgateway:9091/metrics/job/tuner-scan")
    connection = connect(kubeconfig=args.kubeconfig, context=args.context)
    report = scan(connection, settings,
                  fallback_namespace=current_namespace(args.kubeconfig, args.context))
    exposition = as_prometheus(report)
    if args.output == "json":
        print(as_json(report))
    elif args.output == "prometheus":
        print(exposition, end="")
    else:
        print(render_table(report))
    if args.push is not None:
        _push_metrics(args.push, exposition)
    return EXIT_UNSAFE if args.fail_on_exposed and report.n_exposed else 0


def _push_metrics(url: str, exposition: str) -> None:
    import httpx

    try:
        response = httpx.put(url, content=exposition.encode(), timeout=10.0,
                             headers={"Content-Type": "text/plain; version=0.0.4"})
    except httpx.HTTPError as exc:
        raise TunerError(f"--push {url}: {exc!r}; is the Pushgateway there?") from exc
    if response.status_code >= 300:
        raise TunerError(f"--push {url}: the Pushgateway answered {response.status_code}: "
                         f"{response.text[:200]}")


def cmd_sidecar(args: argparse.Namespace) -> int:
    from tuner.sidecar import Sidecar, SidecarPaths, TuningDir, TuningSource

    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen {args.listen!r} is not HOST:PORT (a port 0-65535), e.g. "
                          "127.0.0.1:9901")
    if args.app_url is not None:
        app_url = urlsplit(args.app_url)
        if app_url.scheme != "http" or not app_url.hostname:
            raise ConfigError(f"--app-url {args.app_url!r} is not an http:// URL of the app "
                              "beside nginx, e.g. http://127.0.0.1:3000/")
    if (args.tuning_dir is None) == (args.configmap is None):
        raise ConfigError("give exactly one tuning source: --tuning-dir DIR (the ConfigMap "
                          "mounted as a volume) or --configmap NAMESPACE/NAME (watched through "
                          "the Kubernetes API)")
    if args.tuning_dir is not None and args.watch_timeout is not None:
        raise ConfigError("--watch-timeout goes with --configmap, not --tuning-dir")
    if args.tuning_dir is not None and args.caller_service_account is None and (
            args.kubeconfig or args.context):
        raise ConfigError("--kubeconfig, --context and --watch-timeout go with --configmap "
                          "(or --caller-service-account), not --tuning-dir alone")
    if args.watch_timeout is not None and args.watch_timeout < 1:
        raise ConfigError(f"--watch-timeout {args.watch_timeout:g}s is too short: the API "
                          "counts a watch's timeout in whole seconds; give 1s or more")
    for flag, value in (("--tuning-dir", args.tuning_dir), ("--render-dir", args.render_dir)):
        if value is not None and not Path(value).is_dir():
            raise ConfigError(f"{flag} {value} is not a directory")
    watch = None
    source: TuningSource
    if args.configmap is not None:
        from tuner.kube.client import connect
        from tuner.kube.watch import WATCH_TIMEOUT_S, ConfigMapWatch, parse_configmap_ref

        namespace, name = parse_configmap_ref(args.configmap)
        source = watch = ConfigMapWatch(
            connect(kubeconfig=args.kubeconfig, context=args.context), namespace, name,
            timeout_s=args.watch_timeout or WATCH_TIMEOUT_S)
    else:
        source = TuningDir(Path(args.tuning_dir))
    sidecar: Sidecar
    if args.envoy_admin is not None:
        sidecar = _envoy_sidecar(args, source)
    else:
        missing = [flag for flag, value in (("--render-dir", args.render_dir),
                                            ("--nginx-pid", args.nginx_pid),
                                            ("--error-log", args.error_log)) if value is None]
        if missing:
            raise ConfigError(f"beside nginx the sidecar needs {', '.join(missing)} (or, beside "
                              "Envoy, --envoy-admin URL --envoy-cds FILE --app-port PORT)")
        sidecar = Sidecar(SidecarPaths(
            render_dir=Path(args.render_dir),
            nginx_pid=Path(args.nginx_pid), error_log=Path(args.error_log),
            nginx_conf=Path(args.nginx_conf) if args.nginx_conf else None,
            app_url=args.app_url), poll_s=args.poll, source=source)
    callers = _sidecar_callers(args, host)
    try:
        server = sidecar.serve(host.strip("[]"), int(port), callers=callers)
    except OSError as exc:
        raise ConfigError(f"--listen {args.listen}: {exc.strerror or exc}") from exc
    listen = f"{host}:{server.address[1]}"  # the port the OS chose for port 0
    print(f"sidecar serving http://{listen}/metrics and /status; tuning from "
          f"{f'ConfigMap {args.configmap} (watched)' if watch else args.tuning_dir}; /probe "
          f"and /status?since answer {callers.describe()}", flush=True)
    try:
        if watch is not None:
            watch.start()
        sidecar.run()
    finally:
        if watch is not None:
            watch.stop()
        server.stop()
    return 0


def _sidecar_callers(args: argparse.Namespace, host: str) -> CallerCheck:
    """Who may call /probe and /status?since: exactly one of the three ways."""
    import ipaddress

    from tuner.sidecar_auth import AnyCaller, ServiceAccountCaller, SharedToken

    given = [flag for flag, value in (
        ("--caller-service-account", args.caller_service_account),
        ("--token-file", args.token_file),
        ("--allow-unauthenticated", args.allow_unauthenticated or None)) if value is not None]
    if args.caller_service_account is None and args.token_audience != "tuner-sidecar":
        raise ConfigError("--token-audience goes with --caller-service-account")
    if len(given) != 1:
        raise ConfigError(
            "say who may call /probe and /status?since with exactly one of "
            "--caller-service-account NAMESPACE/NAME (in a cluster: the tuner Job's, checked "
            "with TokenReview), --token-file PATH (a shared secret) or "
            "--allow-unauthenticated (with a loopback --listen only)"
            + (f"; got {' and '.join(given)}" if given else ""))
    if args.allow_unauthenticated:
        try:
            is_loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
        except ValueError:
            is_loopback = host == "localhost"
        if not is_loopback:
            raise ConfigError(
                f"--allow-unauthenticated with --listen {args.listen}: anyone who reaches "
                "that address could make the sidecar open connections to the app; listen on "
                "127.0.0.1 (or ::1), or give --caller-service-account or --token-file")
        return AnyCaller()
    if args.token_file is not None:
        path = Path(args.token_file)
        if not path.is_file() or not path.read_bytes().strip():
            raise ConfigError(f"--token-file {path} is not a file with a token in it")
        return SharedToken(path)
    from tuner.kube.client import connect
    from tuner.kube.tokenreview import token_reviewer
    from tuner.kube.watch import parse_configmap_ref

    namespace, name = parse_configmap_ref(args.caller_service_account,
                                          flag="--caller-service-account")
    reviewer = token_reviewer(connect(kubeconfig=args.kubeconfig, context=args.context),
                              audience=args.token_audience)
    return ServiceAccountCaller(reviewer, namespace=namespace, name=name,
                                audience=args.token_audience)


def _envoy_sidecar(args: argparse.Namespace, source: Any) -> Any:
    """`tuner sidecar --envoy-admin URL --envoy-cds FILE --app-port PORT` (tuner.sidecar_envoy)."""
    from tuner.sidecar_envoy import EnvoyPaths, EnvoySidecar

    admin = urlsplit(args.envoy_admin)
    if admin.scheme != "http" or not admin.hostname:
        raise ConfigError(f"--envoy-admin {args.envoy_admin!r} is not an http:// URL of "
                          "Envoy's admin endpoint, e.g. http://127.0.0.1:9902")
    if args.envoy_cds is None or args.app_port is None:
        raise ConfigError("beside Envoy the sidecar needs --envoy-cds FILE (the CDS file its "
                          "bootstrap watches) and --app-port PORT (the app's port in the pod)")
    if not Path(args.envoy_cds).parent.is_dir():
        raise ConfigError(f"--envoy-cds {args.envoy_cds}: its directory does not exist")
    if not 0 < args.app_port < 65536:
        raise ConfigError(f"--app-port {args.app_port} is not a port 1-65535")
    return EnvoySidecar(EnvoyPaths(admin_url=args.envoy_admin, cds_path=Path(args.envoy_cds),
                                   app_port=args.app_port, app_url=args.app_url),
                        poll_s=args.poll, source=source)


def cmd_report(args: argparse.Namespace) -> int:
    from tuner.output.html import write_report

    path = Path(args.output)
    if path.is_dir():
        raise ConfigError(f"-o {path} is a directory; give the HTML file to write, e.g. "
                          f"{path / 'report.html'}")
    if not path.parent.is_dir():
        raise ConfigError(f"-o {path}: directory {path.parent} does not exist; create it or "
                          "choose another path")
    built = _findings(args)
    try:
        write_report(built, path)
    except OSError as exc:
        raise ConfigError(f"-o {path}: cannot write the report there ({exc.strerror or exc}); "
                          "choose another path") from exc
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB): experiment "
          f"{built.experiment_id}, {len(built.trials)} trials")
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from tuner.output.text import render_findings

    findings = _findings(args)
    output = "json" if args.json else args.output
    if output == "json":
        print(json.dumps(findings.as_json(), indent=2))
    elif output in ("configmap", *GATEWAY_OUTPUTS):
        import yaml

        print(yaml.safe_dump_all(_objects(args, findings, output), sort_keys=False), end="")
    else:
        print(render_findings(findings))
    return EXIT_INSUFFICIENT if findings.primary.status != "ok" else 0
