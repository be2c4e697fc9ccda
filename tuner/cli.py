"""The `tuner` command: the argument parser and the error boundary; the commands themselves
are in `tuner.commands`.

Only this module catches `TunerError`: it prints `error: ...` and exits with the error's
exit code. SIGTERM is turned into KeyboardInterrupt so every `with Lab(...)` block unwinds
and stops its processes, exactly as on Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TypeAlias

from tuner import __version__
from tuner.commands import (
    EXIT_INTERRUPTED,
    cmd_apply,
    cmd_demo,
    cmd_experiment,
    cmd_lab_up,
    cmd_probe,
    cmd_recommend,
    cmd_report,
    cmd_results,
    cmd_scan,
    cmd_sidecar,
)
from tuner.durations import EXAMPLES, parse_duration
from tuner.errors import ConfigError, TunerError
from tuner.kube.gateways import GATEWAY_OUTPUTS
from tuner.lab import BUILTIN_UPSTREAMS, PROXIES

#: the subparsers of `tuner`: one `_add_<command>` below adds each command
_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

EXIT_CODES = """exit codes:
  0    success
  1    unexpected tuner error
  2    bad arguments or input (the message names the value)
  3    the lab failed: a program missing, a process that exited or never listened,
       a configuration the proxy rejected
  4    load generation failed
  5    a server could not be probed (unreachable, not HTTP/1.1)
  6    tuner probe --proxy-idle: the proxy's idle timeout is unsafe; tuner scan
       --fail-on-exposed: a backend is exposed
  7    the results store cannot be used (not ours, newer schema, locked, disk full)
  8    tuner recommend (and experiment --target kubernetes): the data cannot support
       a recommendation (it says what would)
  9    tuner apply, scan, experiment --target kubernetes: the Kubernetes API refused (RBAC,
       a missing ConfigMap, Deployment or namespace, invalid) or stayed unreachable;
       or the baseline settings could not be restored (the ledger keeps them)
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
                             "(nginx upstream keepalive_timeout; HAProxy pool-purge-delay; Envoy "
                             "cluster common_http_protocol_options.idle_timeout); "
                             "default 60s")
    parser.add_argument("--upstream-idle", type=_duration("--upstream-idle"), default=5.0,
                        metavar="DURATION",
                        help="the upstream's idle keep-alive timeout, set through its own "
                             "option (Node keepAliveTimeout, uvicorn --timeout-keep-alive, ...); "
                             "default 5s")


def _add_request_options(parser: argparse.ArgumentParser, *, default_path: str | None) -> None:
    """--host and --path: the request the load repeats (tuner.load.request)."""
    parser.add_argument("--host", metavar="HOST",
                        help="the Host header the lab's proxy sends the upstream, e.g. "
                             "shop.example or localhost:8080 (default: the upstream's own "
                             "127.0.0.1:PORT; a name with _ is refused by strict servers "
                             "such as Tomcat, which answer 400 and close)")
    parser.add_argument("--path", default=default_path, metavar="PATH",
                        help="the request path, query included, e.g. /healthz (default /): "
                             "one your app serves; a 404 or 405 on a kept connection counts "
                             "as served, a 400 or 5xx does not")


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
    _add_lab(commands)
    _add_demo(commands)
    _add_probe(commands)
    _add_experiment(commands)
    _add_results(commands)
    _add_recommend(commands)
    _add_apply(commands)
    _add_report(commands)
    _add_sidecar(commands)
    _add_scan(commands)
    return parser


def _add_lab(commands: _Commands) -> None:
    lab = commands.add_parser("lab", help="run a real proxy in front of a real upstream locally",
                              description="The local lab: a real nginx, HAProxy or Envoy in "
                                          "front of a real upstream server, on 127.0.0.1. It "
                                          "binds loopback only: nothing it starts listens on "
                                          "another interface.")
    lab_commands = lab.add_subparsers(dest="lab_command", metavar="SUBCOMMAND", required=True)
    up = lab_commands.add_parser(
        "up", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="start the lab and keep it up until Ctrl-C",
        description="Start a proxy in front of an upstream on 127.0.0.1 (ports chosen by the\n"
                    "OS), with both idle timeouts set, print their URLs, and stay up until\n"
                    "Ctrl-C or SIGTERM; then stop every process and remove the lab's files.\n\n"
                    "Loopback only: the proxy and the built-in upstreams bind 127.0.0.1 and\n"
                    "nothing else, so no other machine can reach the lab (Locust's master,\n"
                    "with workers, binds 127.0.0.1 too). An --upstream-cmd server must listen\n"
                    "on 127.0.0.1:{port}; the lab waits for that address, but cannot stop\n"
                    "your command from binding others as well.\n\n"
                    "The proxy sends the upstream the Host of --host (default: the upstream's\n"
                    "own 127.0.0.1:PORT). Once up, the lab checks, as `tuner experiment` does\n"
                    "before its first trial, that the upstream serves the load's request: one\n"
                    "request per method of --methods to --path, straight to the upstream and\n"
                    "through the proxy; it prints the statuses and the Connection, Keep-Alive\n"
                    "and Server headers, and warns (but stays up) when the upstream refuses the\n"
                    "request or closes the connection after answering.",
        epilog="examples:\n"
               "  tuner lab up --proxy nginx --upstream node --proxy-idle 60s --upstream-idle 2s\n"
               "  tuner lab up --proxy haproxy --upstream uvicorn --upstream-idle 5s --json\n"
               "  tuner lab up --proxy envoy --upstream node --proxy-idle 1h --upstream-idle 1s\n"
               "  tuner lab up --upstream-cmd 'python3 -m http.server {port} # {idle_s}'\n"
               "  tuner lab up --upstream-cmd 'java -jar app.jar --server.port={port} "
               "--server.tomcat.keep-alive-timeout={idle_ms}ms' \\\n"
               "      --host localhost --path /healthz --methods GET\n\n"
               + EXIT_CODES)
    _add_lab_options(up)
    up.add_argument("--methods", default="POST", metavar="MIX",
                    help="the method mix the preflight checks, as for `tuner experiment` "
                         "(default POST)")
    _add_request_options(up, default_path="/")
    up.add_argument("--json", action="store_true",
                    help="print one JSON object with the URLs and settings")
    up.set_defaults(handler=cmd_lab_up)


def _add_demo(commands: _Commands) -> None:
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
    demo.add_argument("--proxy", default="nginx", choices=sorted(PROXIES),
                      help="the proxy in front of Node (default: nginx)")
    demo.set_defaults(handler=cmd_demo)


def _add_probe(commands: _Commands) -> None:
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


def _add_experiment(commands: _Commands) -> None:
    experiment = commands.add_parser(
        "experiment", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="sweep proxy x upstream idle timeouts under race-hunting load",
        description="Run a grid of trials on the local lab: for each proxy idle x upstream\n"
                    "idle value (and repeat), in an order shuffled by the seed, set both\n"
                    "timeouts, probe the upstream's real close time, drive Locust's\n"
                    "synchronized bursts whose idle gaps straddle it, count the failures\n"
                    "and the proxy's error-log signatures, and record the trial in the\n"
                    "results store before the next one starts. A trial stops early once it\n"
                    "is decisively unsafe (3 race failures) or safe (300 reused requests, no\n"
                    "failure, every gap tried); else at its budget.\n\n"
                    "Flags override the spec file's fields of the same name.",
        epilog="examples:\n"
               "  tuner experiment --proxy nginx --upstream node --proxy-idle 1s,3s "
               "--upstream-idle 1s\n"
               "  tuner experiment spec.yaml --db results.db\n"
               "  tuner experiment --db results.db --resume     # after Ctrl-C or a crash\n"
               "  tuner experiment spec.yaml --target kubernetes --db /results/results.db\n"
               "  tuner experiment --upstream-cmd 'java -jar app.jar --server.port={port} "
               "--server.tomcat.keep-alive-timeout={idle_ms}ms' \\\n"
               "      --proxy-idle 1s,3s --upstream-idle 2s --path /healthz --methods POST\n\n"
               "the preflight (local target), before the first trial: one request per method\n"
               "of --methods to --path with the Host the proxy sends (--host; default the\n"
               "upstream's own 127.0.0.1:PORT), straight to the upstream and through the\n"
               "proxy. The experiment is refused (exit 2, nothing run) with the statuses, the\n"
               "Connection, Keep-Alive and Server headers and what to do, when the upstream\n"
               "does not serve the request (a 400 or 421, often the Host; a 5xx; no answer)\n"
               "or closes the connection after answering: no idle connection is then left to\n"
               "race. A 404 or 405 on a kept connection exercises it as a 200 does: served.\n\n"
               "--target kubernetes (README: Run it in your cluster): per trial, patch the\n"
               "tuning ConfigMap, restart the app's Deployment when its setting changes and\n"
               "wait for the rollout, wait for every sidecar to apply the trial, probe the\n"
               "app through a sidecar, load the Service, read the sidecars' counters. A\n"
               "ledger ConfigMap makes a re-run Job resume; the baseline is restored at the\n"
               "end, on SIGTERM and on errors; then the recommendation ConfigMap is written.\n"
               "A rollout or sidecar that never gets there fails its trial (invalid), with\n"
               "the reason; an unreachable API server is retried for api_retry_limit.\n\n"
               "the control: the first trial sets the proxy's idle timeout well above the\n"
               "upstream's measured close, the same load; it must race. If it does not, the\n"
               "load cannot show the race on this machine, and no trial is called safe.\n\n"
               "verdicts: unsafe (a race seen by the client or in the proxy's log, or the\n"
               "proxy keeps connections at or past the measured close, whatever the count),\n"
               "safe (no race in 300 reused requests over every gap, tight bursts, and a\n"
               "control that raced), inconclusive (short of that, with the reason), invalid\n"
               "(the lab failed, or most answers were neither served nor the race, e.g. 400s:\n"
               "never a keep-alive result)\n\n"
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
    experiment.add_argument("--sweep", choices=("groups", "bursts"),
                            help="bursts (default): one gap per burst; groups: every burst "
                                 "tries every gap, one group of users per gap")
    experiment.add_argument("--methods", metavar="MIX",
                            help="the load's method mix, e.g. POST (default: nginx retries "
                                 "idempotent methods and so hides races) or POST:3,GET:1")
    _add_request_options(experiment, default_path=None)
    experiment.add_argument("--burst-size", type=int, metavar="N",
                            help="users per burst (default: 30; 100 when the upstream closes "
                                 "at 4.5 s or later, with 3 gaps instead of 7: a safe verdict "
                                 "then needs 3 reused bursts, not 10)")
    experiment.add_argument("--workers", type=int, metavar="N",
                            help="Locust workers (master/worker mode); 0: one process")
    experiment.add_argument("--parallel", type=int, metavar="K",
                            help="run K cells side by side after the control, each on a lab "
                                 "of its own (default 1; 2 suits 2 cores at long closes; "
                                 "Ctrl-C stops every running cell at once)")
    experiment.add_argument("--seed", type=int, metavar="N")
    experiment.add_argument("--no-control", dest="control", action="store_false",
                            default=None,
                            help="skip the positive control; you give up the proof that the "
                                 "load can show the race here, and a safe verdict then rests "
                                 "on the count alone")
    experiment.add_argument("--db", metavar="PATH", help="results store (default results.db)")
    experiment.add_argument("--resume", action="store_true",
                            help="continue the newest experiment in --db, skipping finished "
                                 "trials")
    experiment.add_argument("--json", action="store_true", help="print one JSON object")
    experiment.add_argument("--target", choices=("local", "kubernetes"), default="local",
                            help="where the trials run: the local lab (default), or the "
                                 "cluster the spec's kubernetes: section names")
    experiment.add_argument("--kubeconfig", metavar="PATH",
                            help="--target kubernetes: kubeconfig (default: $KUBECONFIG, "
                                 "~/.kube/config, or the in-cluster service account)")
    experiment.add_argument("--context", metavar="NAME",
                            help="--target kubernetes: kubeconfig context")
    experiment.set_defaults(handler=cmd_experiment)


def _add_results(commands: _Commands) -> None:
    results = commands.add_parser("results", help="list the trials of a results store",
                                  description="List the trials of the newest (or --id) "
                                              "experiment in a results store.",
                                  epilog=EXIT_CODES,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    results.add_argument("db", metavar="DB")
    results.add_argument("--id", dest="experiment_id", help="experiment id")
    results.add_argument("--json", action="store_true", help="print one JSON object")
    results.set_defaults(handler=cmd_results)


def _add_recommend(commands: _Commands) -> None:
    rec = commands.add_parser(
        "recommend", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="recommend idle timeouts from a results store, with the evidence",
        description="Correlate the failure rate with the margin (upstream's real close minus\n"
                    "the proxy's idle timeout) over every trial of an experiment, and recommend\n"
                    "both directions: the largest safe proxy idle timeout for the upstream as\n"
                    "measured, and the smallest upstream idle setting for the proxy as\n"
                    "configured, with the evidence (0 failures in n; 95 % upper bound) and the\n"
                    "unsafe settings' observed rates. Exact (Clopper-Pearson) intervals; a\n"
                    "monotone fit of the rate against the margin.",
        epilog="examples:\n"
               "  tuner recommend results.db\n"
               "  tuner recommend results.db --proxy-idle 60s --json\n"
               "  tuner recommend results.db -o configmap --namespace shop > cm.yaml\n"
               "  tuner recommend results.db -o destinationrule --namespace shop "
               "--host checkout.shop.svc.cluster.local\n"
               "  tuner recommend results.db -o backendtrafficpolicy --namespace shop "
               "--target-ref HTTPRoute/checkout\n\n"
               "margin: by default the larger of 1 s and 10 % of the measured close.\n\n"
               + EXIT_CODES)
    _add_recommend_options(rec)
    rec.add_argument("-o", "--output", default="text",
                     choices=("text", "json", "configmap", *GATEWAY_OUTPUTS),
                     help="text, json, the ConfigMaps (configmap), or the Envoy family's "
                          "object with the app's ConfigMap key: an Istio DestinationRule "
                          "(destinationrule, needs --host) or an Envoy Gateway "
                          "BackendTrafficPolicy (backendtrafficpolicy, needs --target-ref)")
    _add_gateway_options(rec)
    rec.add_argument("--json", action="store_true", help="same as -o json")
    rec.set_defaults(handler=cmd_recommend)


def _add_apply(commands: _Commands) -> None:
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
               "RBAC needed (your kubeconfig's user; the Job does not apply): get, create,\n"
               "patch on configmaps in each target namespace; with -o destinationrule the\n"
               "same on destinationrules.networking.istio.io, with -o backendtrafficpolicy\n"
               "on backendtrafficpolicies.gateway.envoyproxy.io (get on namespaces is used\n"
               "for a clearer error when one is missing).\n\n"
               + EXIT_CODES)
    _add_recommend_options(apply)
    apply.add_argument("-o", "--output", default="configmap",
                       choices=("configmap", *GATEWAY_OUTPUTS),
                       help="what to write: the ConfigMaps (default), or an Istio "
                            "DestinationRule / Envoy Gateway BackendTrafficPolicy with the app's "
                            "ConfigMap key, merged into an existing object's other fields")
    _add_gateway_options(apply)
    apply.add_argument("--kubeconfig", metavar="PATH",
                       help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or the "
                            "in-cluster service account)")
    apply.add_argument("--context", metavar="NAME", help="kubeconfig context")
    apply.add_argument("--dry-run", action="store_true", help="show the diff, write nothing")
    apply.add_argument("--json", action="store_true", help="print one JSON object")
    apply.set_defaults(handler=cmd_apply)


def _add_report(commands: _Commands) -> None:
    report = commands.add_parser(
        "report", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="write one self-contained HTML report of a results store",
        description="One HTML file with no external references: the recommendation, the\n"
                    "heatmap of failure rate over proxy idle x upstream idle, the failure\n"
                    "rate against the margin with exact intervals and the monotone fit, the\n"
                    "failing idle gaps, and the table of trials with their probe results.",
        epilog="example:\n  tuner report results.db -o report.html\n\n"
               + EXIT_CODES)
    _add_recommend_options(report)
    report.add_argument("-o", "--output", default="report.html", metavar="PATH",
                        help="HTML file to write (default report.html)")
    report.set_defaults(handler=cmd_report)


def _add_sidecar(commands: _Commands) -> None:
    sidecar = commands.add_parser(
        "sidecar", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="beside nginx: apply the tuning ConfigMap, count race signatures, serve metrics",
        description="Apply the tuning ConfigMap (keys upstream-keepalive-timeout, upstream-\n"
                    "keepalive-connections, keep-alive, generation) to the nginx beside it.\n"
                    "It comes from exactly one of two sources:\n"
                    "  --tuning-dir DIR      the ConfigMap mounted as a volume (a file per key),\n"
                    "                        polled; the kubelet updates a mount after 60-90 s\n"
                    "  --configmap NS/NAME   the ConfigMap watched through the Kubernetes API:\n"
                    "                        a change arrives in under a second (RBAC: get and\n"
                    "                        watch on that ConfigMap)\n"
                    "It renders nginx include files (upstream-keepalive.conf inside\n"
                    "`upstream {}`, client-keepalive.conf in `http {}`), reloads nginx with\n"
                    "SIGHUP, tails its error log, and serves /metrics (Prometheus) and /status\n"
                    "(JSON; ?since=OFFSET for counters of the log after a mark). An invalid\n"
                    "tuning is never applied, and a source that cannot be read (API down,\n"
                    "forbidden, ConfigMap missing) keeps the last good one: /status says why.\n\n"
                    "/metrics and /status are open; /probe (which opens connections to the\n"
                    "app) and /status's mark and ?since answer one caller, named by exactly\n"
                    "one of --caller-service-account, --token-file or --allow-unauthenticated.\n"
                    "Every endpoint is bounded: /probe takes samples 1-10 and max_idle up to\n"
                    "1h, one probe at a time (else 429 with Retry-After); a malformed query is\n"
                    "a 400 naming the value; 8 worker threads, and a request head must arrive\n"
                    "within 5 s, so slow clients cannot hold the server (tunings are applied\n"
                    "on a thread of their own).",
        epilog="examples:\n"
               "  # outside Kubernetes, with a local nginx and a directory of one file per key\n"
               "  tuner sidecar --tuning-dir ./tuning --render-dir /etc/nginx/tuner \\\n"
               "      --nginx-pid /run/nginx.pid --error-log /var/log/nginx/error.log \\\n"
               "      --nginx-conf /etc/nginx/nginx.conf --listen 127.0.0.1:9901 \\\n"
               "      --allow-unauthenticated\n"
               "  # in the pod (manifests/overlays/demo): watch the ConfigMap through the API\n"
               "  tuner sidecar --configmap tuner-demo/tuner-tuning \\\n"
               "      --render-dir /etc/nginx/tuner --nginx-pid /tmp/nginx.pid \\\n"
               "      --error-log /var/log/nginx/error.log --app-url http://127.0.0.1:3000/ \\\n"
               "      --listen 0.0.0.0:9901 --caller-service-account tuner-demo/tuner\n\n"
               + EXIT_CODES)
    source = sidecar.add_argument_group("tuning source (exactly one)")
    source.add_argument("--tuning-dir", metavar="DIR",
                        help="the tuning ConfigMap mounted as a directory, read every --poll")
    source.add_argument("--configmap", metavar="NAMESPACE/NAME",
                        help="the tuning ConfigMap, watched through the Kubernetes API")
    sidecar.add_argument("--kubeconfig", metavar="PATH",
                         help="with --configmap: kubeconfig file (default: $KUBECONFIG, "
                              "~/.kube/config, or the pod's service account)")
    sidecar.add_argument("--context", metavar="NAME", help="with --configmap: kubeconfig context")
    sidecar.add_argument("--watch-timeout", type=_duration("--watch-timeout"), metavar="DURATION",
                         help="with --configmap: the API server ends each watch after this, and "
                              "the sidecar re-watches from the last resourceVersion (default "
                              "60s, at least 1s)")
    sidecar.add_argument("--render-dir", metavar="DIR", help="beside nginx (required there)")
    sidecar.add_argument("--nginx-pid", metavar="FILE", help="beside nginx (required there)")
    sidecar.add_argument("--error-log", metavar="FILE", help="beside nginx (required there)")
    envoy = sidecar.add_argument_group(
        "beside Envoy instead of nginx (tuner/sidecar_envoy.py): the idle timeout goes into "
        "the CDS file Envoy watches, races are counted from its admin stats")
    envoy.add_argument("--envoy-admin", metavar="URL",
                       help="Envoy's admin endpoint in the pod, e.g. http://127.0.0.1:9902")
    envoy.add_argument("--envoy-cds", metavar="FILE",
                       help="the CDS file of Envoy's bootstrap (cds_config.path_config_source)")
    envoy.add_argument("--app-port", type=int, metavar="PORT",
                       help="the app's port in the pod: cluster 'app' goes to 127.0.0.1:PORT")
    sidecar.add_argument("--nginx-conf", metavar="FILE",
                         help="check each rendering with `nginx -t -c FILE` before reloading")
    sidecar.add_argument("--app-url", metavar="URL",
                         help="the app beside nginx in the pod (e.g. http://127.0.0.1:3000/), "
                              "for GET /probe")
    sidecar.add_argument("--listen", default="127.0.0.1:9901", metavar="HOST:PORT",
                         help="where to serve (default 127.0.0.1:9901: loopback only; in a pod "
                              "0.0.0.0:9901, fenced by the NetworkPolicy and the caller check)")
    callers = sidecar.add_argument_group("who may call /probe and /status?since (exactly one)")
    callers.add_argument("--caller-service-account", metavar="NAMESPACE/NAME",
                         help="only bearer tokens of this ServiceAccount (the tuner Job's), "
                              "checked with the API's TokenReview (RBAC: create on "
                              "tokenreviews); uses --kubeconfig/--context")
    callers.add_argument("--token-audience", default="tuner-sidecar", metavar="AUDIENCE",
                         help="with --caller-service-account: the audience the token must be "
                              "issued for (default tuner-sidecar, as the Job's projected token; "
                              "'' accepts API tokens, which the sidecar could replay)")
    callers.add_argument("--token-file", metavar="PATH",
                         help="only the bearer token in this file (a shared secret; re-read "
                              "when it changes)")
    callers.add_argument("--allow-unauthenticated", action="store_true",
                         help="anyone who can connect (the local lab); refused unless --listen "
                              "is a loopback address")
    sidecar.add_argument("--poll", type=_duration("--poll"), default=0.5, metavar="DURATION")
    sidecar.set_defaults(handler=cmd_sidecar)


def _add_gateway_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", metavar="HOST",
                        help="-o destinationrule: the app's host, as the DestinationRule's "
                             "spec.host (e.g. checkout.shop.svc.cluster.local)")
    parser.add_argument("--target-ref", action="append", metavar="KIND/NAME",
                        help="-o backendtrafficpolicy: what the policy applies to, e.g. "
                             "HTTPRoute/checkout or Gateway/eg (repeatable)")


def _add_scan(commands: _Commands) -> None:
    scan = commands.add_parser(
        "scan", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="audit every Service behind the cluster's proxies, no load",
        description="Find every backend of the cluster's Ingresses and Gateway API HTTPRoutes\n"
                    "(Service -> EndpointSlices -> pods, one pod per owner), read each data\n"
                    "plane's upstream idle timeout and where it comes from (ingress-nginx,\n"
                    "Istio, Envoy Gateway, NGINX Gateway Fabric), probe every pod's real idle\n"
                    "close at once, and judge each pair. Sends no load: one request per\n"
                    "probe connection. Takes about the longest idle period it must watch.",
        epilog="examples:\n"
               "  tuner scan --kubeconfig .cluster/kubeconfig\n"
               "  tuner scan -n shop -n payments --json\n"
               "  tuner scan --proxy-idle traefik=90s -o prometheus\n"
               "  tuner scan -o prometheus --push http://pushgateway:9091/metrics/job/tuner-scan\n\n"
               "RBAC needed (read-only): list on ingresses, services, endpointslices and pods\n"
               "in each namespace; optionally httproutes, gateways, destinationrules,\n"
               "backendtrafficpolicies, upstreamsettingspolicies, get on the ingress-nginx\n"
               "ConfigMap, and (cluster-wide only) ingressclasses and gatewayclasses.\n"
               "manifests/scan has them.\n\n" + EXIT_CODES)
    scan.add_argument("-n", "--namespace", dest="namespaces", action="append",
                      metavar="NAMESPACE",
                      help="scan this namespace; repeatable (default: all it may read)")
    scan.add_argument("--all-pods", action="store_true",
                      help="probe every pod, not one per owner (ReplicaSet, StatefulSet...)")
    scan.add_argument("--proxy-idle", dest="proxy_idle", action="append", default=[],
                      metavar="[CLASS=]DURATION",
                      help="the upstream idle timeout of a class the scan does not know "
                           "(or of every class, without CLASS=); repeatable")
    scan.add_argument("--max-idle", type=_duration("--max-idle"), default=120.0,
                      metavar="DURATION",
                      help="watch a pod's idle connections at most this long (default 2m)")
    scan.add_argument("--answer-timeout", type=_duration("--answer-timeout"), default=5.0,
                      metavar="DURATION",
                      help="give up on a pod that does not connect or answer within this "
                           "(default 5s)")
    scan.add_argument("--concurrency", type=int, default=32, metavar="N",
                      help="pods probed at once (default 32)")
    scan.add_argument("--samples", type=int, default=2, metavar="N",
                      help="connections measured per pod (default 2)")
    scan.add_argument("--margin", type=_duration("--margin"), metavar="DURATION",
                      help="safety margin (default: the larger of 1s and 10%%)")
    scan.add_argument("--ingress-nginx-configmap", default="ingress-nginx/ingress-nginx-controller",
                      metavar="NAMESPACE/NAME",
                      help="the ingress-nginx controller's ConfigMap (its --configmap flag)")
    scan.add_argument("-o", "--output", choices=("table", "json", "prometheus"),
                      default="table", help="table (default), json or prometheus text")
    scan.add_argument("--json", action="store_const", dest="output", const="json",
                      help="same as -o json")
    scan.add_argument("--push", metavar="URL",
                      help="also PUT the Prometheus text to this Pushgateway URL")
    scan.add_argument("--fail-on-exposed", action="store_true",
                      help="exit 6 when a backend is exposed")
    scan.add_argument("--kubeconfig", metavar="PATH",
                      help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or the "
                           "in-cluster service account)")
    scan.add_argument("--context", metavar="NAME", help="kubeconfig context")
    scan.set_defaults(handler=cmd_scan)


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
    parser.add_argument("--name", default="tuner-keepalive",
                        help="name of the ConfigMap (or DestinationRule, BackendTrafficPolicy)")
    parser.add_argument("--namespace", default="default",
                        help="its namespace (default: default)")


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
