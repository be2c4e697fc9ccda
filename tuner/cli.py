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
from types import FrameType

from tuner import __version__
from tuner.durations import EXAMPLES, format_seconds, parse_duration
from tuner.errors import ConfigError, LabError, TunerError
from tuner.lab import BUILTIN_UPSTREAMS, PROXIES, Lab, Upstream, command_upstream, get_upstream

EXIT_UNSAFE = 6
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


def _upstream_from(args: argparse.Namespace) -> Upstream:
    if args.upstream_cmd is not None:
        return command_upstream(args.upstream_cmd)
    return get_upstream(args.upstream)


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
        help="show the race on the local lab, then show it fixed",
        description="nginx (keepalive_timeout 60s) in front of Node (keepAliveTimeout 1000 ms):\n"
                    "measure Node's real close time, send synchronized bursts of POSTs whose\n"
                    "idle gaps straddle it, count the 502s and nginx's error-log signatures;\n"
                    "then reload nginx with a safe idle timeout and send the same load.",
        epilog=EXIT_CODES)
    demo.add_argument("--bursts", type=int, default=12, metavar="N",
                      help="bursts per setting (default 12, about 25 s each)")
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
    return parser


def cmd_lab_up(args: argparse.Namespace) -> int:
    upstream = _upstream_from(args)
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


def cmd_demo(args: argparse.Namespace) -> int:
    from tuner.demo import run_demo
    from tuner.render import render_demo

    if args.bursts < 1:
        raise ConfigError(f"--bursts must be at least 1, got {args.bursts}")
    say = (lambda _line: None) if args.json else (lambda line: print(line, flush=True))
    result = run_demo(n_bursts=args.bursts, say=say)
    print(json.dumps(result.as_json(), indent=2) if args.json else "\n" + render_demo(result))
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
