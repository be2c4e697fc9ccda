"""The `tuner` command: parse arguments, hand off at once, print for people or as JSON.

Only this module catches `TunerError`: it prints `error: ...` and exits with the error's
exit code. SIGTERM is turned into KeyboardInterrupt so every `with Lab(...)` block unwinds
and stops its processes, exactly as on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from tuner import __version__
from tuner.durations import EXAMPLES, format_seconds, parse_duration
from tuner.errors import ConfigError, LabError, LoadError, TunerError
from tuner.lab import BUILTIN_UPSTREAMS, PROXIES, Lab
from tuner.lab.upstreams import upstream_from

if TYPE_CHECKING:
    from tuner.experiment.runner import ExperimentRun
    from tuner.experiment.spec import ExperimentSpec
    from tuner.recommending import RecommendationReport

EXIT_UNSAFE = 6
EXIT_INSUFFICIENT = 8
EXIT_INTERRUPTED = 130

EXIT_CODES = """exit codes:
  0    success
  1    unexpected tuner error
  2    bad arguments or input (the message names the value)
  3    the lab failed: a program missing, a process that exited or never listened,
       a configuration the proxy rejected
  4    load generation failed
  5    a server could not be probed (unreachable, not HTTP/1.1)
  6    tuner probe --proxy-idle: the proxy's idle timeout is unsafe
  7    the results store cannot be used (not ours, newer schema, locked, disk full)
  8    tuner recommend: the data cannot support a recommendation (it says what would)
  9    tuner apply: the Kubernetes API refused (RBAC, missing namespace, invalid) or was
       unreachable
  130  interrupted (Ctrl-C or SIGTERM); everything started was stopped"""


def _duration(what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            return parse_duration(text, what=what)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = what  # argparse names the type in its messages
    return parse


def _add_lab_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--proxy", default="nginx", choices=sorted(PROXIES),
                        help="reverse proxy to run (default: nginx)")
    parser.add_argument("--upstream", default="node", metavar="NAME",
                        help=f"built-in upstream server: {', '.join(BUILTIN_UPSTREAMS)} "
                             "(default: node)")
    parser.add_argument("--upstream-cmd", metavar="COMMAND",
                        help="bring your own server instead: a shell command containing {port} "
                             "and {idle_s} or {idle_ms}, e.g. "
                             "'node app.js --port {port} --keep-alive-ms {idle_ms}'")
    parser.add_argument("--proxy-idle", type=_duration("--proxy-idle"), default=60.0,
                        metavar="DURATION",
                        help="how long the proxy keeps idle upstream connections "
                             "(nginx upstream keepalive_timeout; HAProxy pool-purge-delay); "
                             "default 60s")
    parser.add_argument("--upstream-idle", type=_duration("--upstream-idle"), default=5.0,
                        metavar="DURATION",
                        help="the upstream's idle keep-alive timeout, set through its own "
                             "option (Node keepAliveTimeout, uvicorn --timeout-keep-alive, ...); "
                             "default 5s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuner",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Find and fix the keep-alive timeout mismatches behind intermittent 502s.\n\n"
                    "A proxy that keeps an idle upstream connection longer than the upstream\n"
                    "does will, now and then, send a request into a connection the upstream\n"
                    "has just closed, and answer 502. The rule: the proxy's idle timeout must\n"
                    "be below the upstream's REAL idle close time, minus a margin.",
        epilog=f"durations: {EXAMPLES}\n\n{EXIT_CODES}")
    parser.add_argument("--version", action="version", version=f"tuner {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    lab = commands.add_parser("lab", help="run a real proxy in front of a real upstream locally",
                              description="The local lab: a real nginx or HAProxy in front of "
                                          "a real upstream server, on 127.0.0.1.")
    lab_commands = lab.add_subparsers(dest="lab_command", metavar="SUBCOMMAND", required=True)
    up = lab_commands.add_parser(
        "up", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="start the lab and keep it up until Ctrl-C",
        description="Start a proxy in front of an upstream on 127.0.0.1 (ports chosen by the "
                    "OS), with both idle timeouts set, print their URLs, and stay up until "
                    "Ctrl-C or SIGTERM; then stop every process and remove the lab's files.",
        epilog="examples:\n"
               "  tuner lab up --proxy nginx --upstream node --proxy-idle 60s --upstream-idle 2s\n"
               "  tuner lab up --proxy haproxy --upstream uvicorn --upstream-idle 5s --json\n"
               "  tuner lab up --upstream-cmd 'python3 -m http.server {port} # {idle_s}'\n\n"
               + EXIT_CODES)
    _add_lab_options(up)
    up.add_argument("--json", action="store_true",
                    help="print one JSON object with the URLs and settings")
    up.set_defaults(handler=cmd_lab_up)

    demo = commands.add_parser(
        "demo", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="a small real experiment: nginx in front of Node, around Node's real close",
        description="nginx in front of Node (keepAliveTimeout 1000 ms, which really closes\n"
                    "idle connections after about 2 s), nginx's upstream idle timeout at 1s,\n"
                    "2s and 3s: one race-hunting trial each (about a minute in all), then the\n"
                    "table of trials.",
        epilog=EXIT_CODES)
    demo.add_argument("--db", default="demo-results.db", metavar="PATH",
                      help="results store (default demo-results.db; replaced each run)")
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.set_defaults(handler=cmd_demo)

    probe = commands.add_parser(
        "probe", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="measure a server's real idle keep-alive close time",
        description="Measure when an HTTP/1.1 server really closes an idle keep-alive\n"
                    "connection: send one request on each of --samples connections in\n"
                    "parallel, then time how long each stays open after its response, and\n"
                    "whether it ends with FIN or RST. Headers and docs can lie (Node adds 1 s\n"
                    "to keepAliveTimeout); this measures. A further connection is reused just\n"
                    "before the measured close to check that it is still served.\n\n"
                    "Probe an upstream directly for the proxy -> upstream hop, or a proxy's\n"
                    "own address for its client-side idle timeout. Takes one idle period.",
        epilog="examples:\n"
               "  tuner probe http://127.0.0.1:3000/health\n"
               "  tuner probe http://10.0.3.7:8080/ --proxy-idle 60s     # is nginx's 60 s safe?\n"
               "  tuner probe https://api.internal/ping --insecure -H 'Authorization: Bearer x'\n"
               "  tuner probe http://127.0.0.1:8000/ --samples 10 --max-idle 2m --json\n\n"
               "margin: by default the larger of 1 s and 10 % of the close time: 1 s is\n"
               "Node's own buffer and covers FIN delay and event-loop lag; 10 % covers servers\n"
               "that sweep idle connections on a timer, and long timeouts.\n\n" + EXIT_CODES)
    probe.add_argument("url", metavar="URL", help="http:// or https:// URL to request")
    probe.add_argument("--samples", type=int, default=5, metavar="N",
                       help="connections measured in parallel (default 5)")
    probe.add_argument("--max-idle", type=_duration("--max-idle"), default=600.0,
                       metavar="DURATION",
                       help="give up waiting for a close after this long (default 10m)")
    probe.add_argument("--method", default="GET", help="request method (default GET)")
    probe.add_argument("--host", dest="host_header", metavar="HOST",
                       help="Host header (default: from the URL)")
    probe.add_argument("-H", "--header", dest="headers", action="append", default=[],
                       metavar="'NAME: VALUE'", help="extra request header; repeatable")
    probe.add_argument("--insecure", action="store_true",
                       help="https: do not verify the server's certificate")
    probe.add_argument("--proxy-idle", type=_duration("--proxy-idle"), metavar="DURATION",
                       help="judge this proxy idle timeout against the measured close")
    probe.add_argument("--margin", type=_duration("--margin"), metavar="DURATION",
                       help="safety margin (default: the larger of 1s and 10%%)")
    probe.add_argument("--json", action="store_true", help="print one JSON object")
    probe.set_defaults(handler=cmd_probe)

    experiment = commands.add_parser(
        "experiment", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="sweep proxy x upstream idle timeouts under race-hunting load",
        description="Run a grid of trials on the local lab: for each proxy idle x upstream\n"
                    "idle value (and repeat), in an order shuffled by the seed, set both\n"
                    "timeouts, probe the upstream's real close time, drive Locust's\n"
                    "synchronized bursts whose idle gaps straddle it, count the failures\n"
                    "and the proxy's error-log signatures, and record the trial in the\n"
                    "results store before the next one starts. A trial stops early once it\n"
                    "is decisively unsafe (3 race failures) or safe (200 reused requests, no\n"
                    "failure, every gap tried); else at its budget.\n\n"
                    "Flags override the spec file's fields of the same name.",
        epilog="examples:\n"
               "  tuner experiment --proxy nginx --upstream node --proxy-idle 1s,3s "
               "--upstream-idle 1s\n"
               "  tuner experiment spec.yaml --db results.db\n"
               "  tuner experiment --db results.db --resume     # after Ctrl-C or a crash\n\n"
               "verdicts: unsafe (race failures seen), safe (decisively none), inconclusive\n"
               "(budget ran out first), invalid (the lab failed: never a keep-alive result)\n\n"
               + EXIT_CODES)
    experiment.add_argument("spec", nargs="?", metavar="SPEC.yaml",
                            help="experiment spec (see tuner/experiment/spec.py for fields)")
    experiment.add_argument("--proxy", choices=sorted(PROXIES))
    experiment.add_argument("--upstream", metavar="NAME",
                            help=f"built-in upstream: {', '.join(BUILTIN_UPSTREAMS)}")
    experiment.add_argument("--upstream-cmd", metavar="COMMAND",
                            help="your own server: a command with {port} and {idle_s}/{idle_ms}")
    experiment.add_argument("--proxy-idle", metavar="D,D,...",
                            help="proxy idle timeouts of the grid, e.g. 500ms,10s")
    experiment.add_argument("--upstream-idle", metavar="D,D,...",
                            help="upstream idle timeouts of the grid, e.g. 1s,5s")
    experiment.add_argument("--repeats", type=int, metavar="N")
    experiment.add_argument("--max-seconds", metavar="DURATION", help="budget per trial")
    experiment.add_argument("--max-requests", type=int, metavar="N", help="budget per trial")
    experiment.add_argument("--gaps", metavar="D,D,...",
                            help="idle gaps to cycle (default: sweep around the measured close)")
    experiment.add_argument("--methods", metavar="MIX", help="e.g. POST or POST:3,GET:1")
    experiment.add_argument("--burst-size", type=int, metavar="N")
    experiment.add_argument("--workers", type=int, metavar="N",
                            help="Locust workers (master/worker mode); 0: one process")
    experiment.add_argument("--seed", type=int, metavar="N")
    experiment.add_argument("--db", metavar="PATH", help="results store (default results.db)")
    experiment.add_argument("--resume", action="store_true",
                            help="continue the newest experiment in --db, skipping finished "
                                 "trials")
    experiment.add_argument("--json", action="store_true", help="print one JSON object")
    experiment.add_argument("--target", choices=("local", "kubernetes"), default="local",
                            help="where the trials run (default: the local lab)")
    experiment.set_defaults(handler=cmd_experiment)

    results = commands.add_parser("results", help="list the trials of a results store",
                                  description="List the trials of the newest (or --id) "
                                              "experiment in a results store.",
                                  epilog=EXIT_CODES,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    results.add_argument("db", metavar="DB")
    results.add_argument("--id", dest="experiment_id", help="experiment id")
    results.add_argument("--json", action="store_true", help="print one JSON object")
    results.set_defaults(handler=cmd_results)

    rec = commands.add_parser(
        "recommend", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="recommend idle timeouts from a results store, with the evidence",
        description="Correlate the failure rate with the margin (upstream's real close minus\n"
                    "the proxy's idle timeout) over every trial of an experiment, and recommend\n"
                    "both directions: the largest safe proxy idle timeout for the upstream as\n"
                    "measured, and the smallest upstream idle setting for the proxy as\n"
                    "configured, with the evidence (0 failures in n; 95 %% upper bound) and the\n"
                    "unsafe settings' observed rates. Exact (Clopper-Pearson) intervals; a\n"
                    "monotone fit of the rate against the margin.",
        epilog="examples:\n"
               "  tuner recommend results.db\n"
               "  tuner recommend results.db --proxy-idle 60s --json\n"
               "  tuner recommend results.db -o configmap --namespace shop > cm.yaml\n\n"
               "margin: by default the larger of 1 s and 10 %% of the measured close.\n\n"
               + EXIT_CODES.replace("%", "%%"))
    _add_recommend_options(rec)
    rec.add_argument("-o", "--output", choices=("text", "json", "configmap"), default="text")
    rec.add_argument("--json", action="store_true", help="same as -o json")
    rec.set_defaults(handler=cmd_recommend)

    apply = commands.add_parser(
        "apply", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="write the recommended ConfigMaps to a cluster",
        description="Write the ConfigMaps `tuner recommend -o configmap` prints: the\n"
                    "recommendation, and the spec's write_back targets (the ingress-nginx\n"
                    "controller ConfigMap, an application ConfigMap key). Existing ConfigMaps\n"
                    "keep their other keys; a concurrent change (409) is re-read and retried.\n"
                    "Every object is validated before the first write.",
        epilog="examples:\n"
               "  tuner apply results.db --dry-run              # show the diff, write nothing\n"
               "  tuner apply results.db --context prod --namespace shop\n\n"
               "RBAC needed: get, create, update on configmaps in each target namespace\n"
               "(get on namespaces is used for a clearer error when one is missing).\n\n"
               + EXIT_CODES.replace("%", "%%"))
    _add_recommend_options(apply)
    apply.add_argument("--kubeconfig", metavar="PATH",
                       help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or the "
                            "in-cluster service account)")
    apply.add_argument("--context", metavar="NAME", help="kubeconfig context")
    apply.add_argument("--dry-run", action="store_true", help="show the diff, write nothing")
    apply.add_argument("--json", action="store_true", help="print one JSON object")
    apply.set_defaults(handler=cmd_apply)

    report = commands.add_parser(
        "report", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="write one self-contained HTML report of a results store",
        description="One HTML file with no external references: the recommendation, the\n"
                    "heatmap of failure rate over proxy idle x upstream idle, the failure\n"
                    "rate against the margin with exact intervals and the monotone fit, the\n"
                    "failing idle gaps, and the table of trials with their probe results.",
        epilog="example:\n  tuner report results.db -o report.html\n\n"
               + EXIT_CODES.replace("%", "%%"))
    _add_recommend_options(report)
    report.add_argument("-o", "--output", default="report.html", metavar="PATH",
                        help="HTML file to write (default report.html)")
    report.set_defaults(handler=cmd_report)

    sidecar = commands.add_parser(
        "sidecar", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="beside nginx: apply the tuning ConfigMap, count race signatures, serve metrics",
        description="Watch the tuning ConfigMap (a directory with one file per key, as\n"
                    "Kubernetes mounts it: upstream-keepalive-timeout, upstream-keepalive-\n"
                    "connections, keep-alive, generation), render nginx include files\n"
                    "(upstream-keepalive.conf inside `upstream {}`, client-keepalive.conf in\n"
                    "`http {}`), reload nginx with SIGHUP, tail its error log, and serve\n"
                    "/metrics (Prometheus) and /status (JSON; ?since=OFFSET for counters of\n"
                    "the log after a mark). An invalid tuning is never applied.",
        epilog="example (outside Kubernetes, with a local nginx):\n"
               "  tuner sidecar --tuning-dir ./tuning --render-dir /etc/nginx/tuner \\\n"
               "      --nginx-pid /run/nginx.pid --error-log /var/log/nginx/error.log \\\n"
               "      --nginx-conf /etc/nginx/nginx.conf --listen 127.0.0.1:9901\n\n"
               + EXIT_CODES.replace("%", "%%"))
    sidecar.add_argument("--tuning-dir", required=True, metavar="DIR")
    sidecar.add_argument("--render-dir", required=True, metavar="DIR")
    sidecar.add_argument("--nginx-pid", required=True, metavar="FILE")
    sidecar.add_argument("--error-log", required=True, metavar="FILE")
    sidecar.add_argument("--nginx-conf", metavar="FILE",
                         help="check each rendering with `nginx -t -c FILE` before reloading")
    sidecar.add_argument("--listen", default="127.0.0.1:9901", metavar="HOST:PORT")
    sidecar.add_argument("--poll", type=_duration("--poll"), default=0.5, metavar="DURATION")
    sidecar.set_defaults(handler=cmd_sidecar)
    return parser


def _add_recommend_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("db", metavar="DB")
    parser.add_argument("--margin", type=_duration("--margin"), metavar="DURATION")
    parser.add_argument("--proxy-idle", type=_duration("--proxy-idle"), metavar="DURATION",
                        help="the proxy idle timeout to protect (default: the largest in the "
                             "grid)")
    parser.add_argument("--upstream-idle", type=_duration("--upstream-idle"), metavar="DURATION",
                        help="which upstream setting of the grid (default: the smallest)")
    parser.add_argument("--target-rate", type=float, default=0.02, metavar="RATE",
                        help="the failure rate the evidence must bound, 95 %% (default 0.02)")
    parser.add_argument("--name", default="tuner-keepalive", help="ConfigMap name")
    parser.add_argument("--namespace", default="default", help="ConfigMap namespace")


def cmd_lab_up(args: argparse.Namespace) -> int:
    upstream = upstream_from(args.upstream, args.upstream_cmd)
    with Lab(proxy=args.proxy, upstream=upstream, proxy_idle_s=args.proxy_idle,
             upstream_idle_s=args.upstream_idle) as lab:
        info = lab.info()
        if args.json:
            print(json.dumps(asdict(info)), flush=True)
        else:
            print(f"proxy     {info.proxy} {info.proxy_version}  {info.proxy_url}  "
                  f"(idle toward upstream: {format_seconds(info.proxy_idle_s)})")
            print(f"upstream  {info.upstream}  {info.upstream_url}  "
                  f"({info.upstream_idle_option}: {format_seconds(info.upstream_idle_s)})")
            print(f"config    {info.proxy_config}")
            print(f"log       {info.proxy_error_log}")
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
    from tuner.render import render_trials

    _clear_demo_store(Path(args.db))
    say = (lambda _line: None) if args.json else (lambda line: print(line, flush=True))
    run = run_demo(db=args.db, say=say)
    if args.json:
        print(json.dumps(_experiment_document(run), indent=2))
    else:
        print("\n" + render_trials([t.record for t in run.trials]) + "\n\n" + explain_demo(run))
    return 0


def _parse_headers(raw: list[str]) -> dict[str, str]:
    headers = {}
    for item in raw:
        name, sep, value = item.partition(":")
        if not sep or not name.strip() or any(c.isspace() for c in name.strip()):
            raise ConfigError(f"header {item!r} is not of the form 'Name: value'")
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
              f"{format_seconds(args.max_idle)} idle) ...", flush=True)
    result = probe(target, n_samples=args.samples, max_idle_s=args.max_idle,
                   on_progress=progress if show_progress else None)
    if show_progress:
        print("\r" + " " * 60 + "\r", end="", file=sys.stderr)
    verdict = None
    if args.proxy_idle is not None:
        verdict = judge(proxy_idle_s=args.proxy_idle, upstream_close_s=result.effective_close_s,
                        max_idle_s=args.max_idle, margin_s=args.margin,
                        closes_on_next_request=result.closes_on_next_request,
                        keeps_alive=result.keeps_alive)
    if args.json:
        document = result.as_json()
        if verdict is not None:
            document["verdict"] = asdict(verdict)
        print(json.dumps(document, indent=2))
    else:
        from tuner.render import render_probe
        print(render_probe(result, verdict))
    return EXIT_UNSAFE if verdict is not None and verdict.status == "unsafe" else 0


def _experiment_spec(args: argparse.Namespace) -> ExperimentSpec:
    from tuner.experiment.spec import ExperimentSpec, load_spec, parse_spec

    spec = load_spec(Path(args.spec)) if args.spec else ExperimentSpec()
    flags = {"proxy": args.proxy, "upstream": args.upstream, "proxy_idle": args.proxy_idle,
             "upstream_idle": args.upstream_idle, "repeats": args.repeats,
             "max_seconds": args.max_seconds, "max_requests": args.max_requests,
             "gaps": args.gaps, "methods": args.methods, "burst_size": args.burst_size,
             "workers": args.workers, "seed": args.seed, "db": args.db}
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
            "trials": [dict(t.record, cell=t.cell) for t in run.trials]}


def cmd_experiment(args: argparse.Namespace) -> int:
    from tuner.experiment.runner import run_experiment
    from tuner.render import render_trials

    if args.target == "kubernetes":
        raise ConfigError("--target kubernetes: the cluster runner is not built yet; run the "
                          "experiment on the local lab and write its recommendation to the "
                          "cluster with `tuner apply` (README: Run it in your cluster)")
    spec = _experiment_spec(args)
    say = (lambda _line: None) if args.json else (lambda line: print(line, flush=True))
    tick = None
    if not args.json and sys.stderr.isatty():
        def tick(line: str) -> None:
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
    resume_hint = (f"the trials finished so far are in {spec.db}; continue with\n"
                   f"  tuner experiment --db {spec.db} --resume")
    try:
        run = run_experiment(spec, resume=args.resume, say=say, tick=tick)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {resume_hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (LabError, LoadError) as exc:
        print(f"error: {exc}\n{resume_hint}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(_experiment_document(run), indent=2))
    else:
        print(f"\nexperiment {run.experiment_id}: {len(run.trials)} of {run.n_planned} "
              f"trials in {run.db}\n")
        print(render_trials([t.record for t in run.trials]))
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from tuner.experiment.runner import ExperimentRun
    from tuner.experiment.spec import ExperimentSpec
    from tuner.render import render_trials
    from tuner.store import ResultsStore

    db = Path(args.db)
    if not db.exists():
        raise ConfigError(f"results store {db} does not exist; run `tuner experiment --db {db}`")
    with ResultsStore(db) as store:
        experiment = store.experiment(args.experiment_id)
        if experiment is None:
            ids = store.experiment_ids()
            raise ConfigError(f"{db} holds no experiment"
                              + (f" with id {args.experiment_id!r}; it holds "
                                 f"{', '.join(ids) or 'none'}" if args.experiment_id else ""))
        trials = store.trials(experiment["id"])
    spec = ExperimentSpec.from_stored(experiment["spec"])
    run = ExperimentRun(experiment["id"], db, spec, trials,
                        len(spec.cells()) * spec.repeats)
    if args.json:
        document = _experiment_document(run)
        document.update(versions=experiment["versions"], host=experiment["host"],
                        spec=experiment["spec"])
        print(json.dumps(document, indent=2))
    else:
        print(f"experiment {run.experiment_id} on {experiment['host']}: {len(trials)} of "
              f"{run.n_planned} trials; versions: "
              + ", ".join(f"{k} {v}" for k, v in sorted(experiment["versions"].items())))
        print(render_trials([t.record for t in trials]))
    return 0


def _report(args: argparse.Namespace) -> RecommendationReport:
    from tuner.recommending import build_report

    if not 0 < args.target_rate < 1:
        raise ConfigError(f"--target-rate {args.target_rate} must be between 0 and 1")
    return build_report(Path(args.db), margin_s=args.margin, proxy_idle_s=args.proxy_idle,
                        upstream_idle_s=args.upstream_idle, target_rate=args.target_rate)


def cmd_apply(args: argparse.Namespace) -> int:
    from tuner.kube.apply import apply_configmaps, connect

    objects = _report(args).configmaps(name=args.name, namespace=args.namespace)
    connection = connect(kubeconfig=args.kubeconfig, context=args.context)
    results = apply_configmaps(connection, objects, dry_run=args.dry_run)
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "results": [asdict(r) for r in results]},
                         indent=2))
    else:
        for result in results:
            print(f"{result.action:13} configmap {result.namespace}/{result.name}")
            if result.diff and args.dry_run:
                print("\n".join(f"    {line}" for line in result.diff.splitlines()))
    return 0


def cmd_sidecar(args: argparse.Namespace) -> int:
    from tuner.sidecar import Sidecar, SidecarPaths

    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--listen {args.listen!r} is not HOST:PORT, e.g. 127.0.0.1:9901")
    for flag, value in (("--tuning-dir", args.tuning_dir), ("--render-dir", args.render_dir)):
        if not Path(value).is_dir():
            raise ConfigError(f"{flag} {value} is not a directory")
    sidecar = Sidecar(SidecarPaths(
        tuning_dir=Path(args.tuning_dir), render_dir=Path(args.render_dir),
        nginx_pid=Path(args.nginx_pid), error_log=Path(args.error_log),
        nginx_conf=Path(args.nginx_conf) if args.nginx_conf else None), poll_s=args.poll)
    try:
        server = sidecar.serve(host, int(port))
    except OSError as exc:
        raise ConfigError(f"--listen {args.listen}: {exc.strerror or exc}") from exc
    print(f"sidecar serving http://{args.listen}/metrics and /status", flush=True)
    try:
        sidecar.run()
    finally:
        server.shutdown()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tuner.report import write_report

    built = _report(args)
    path = Path(args.output)
    write_report(built, path)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB): experiment "
          f"{built.experiment_id}, {len(built.records)} trials")
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from tuner.recommending import render_report

    report = _report(args)
    output = "json" if args.json else args.output
    if output == "json":
        print(json.dumps(report.as_json(), indent=2))
    elif output == "configmap":
        import yaml

        print(yaml.safe_dump_all(report.configmaps(name=args.name, namespace=args.namespace),
                                 sort_keys=False), end="")
    else:
        print(render_report(report))
    return EXIT_INSUFFICIENT if report.primary.status != "ok" else 0


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        code: int = args.handler(args)
        return code
    except TunerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: every process the tuner started has been stopped", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
