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

EXIT_INTERRUPTED = 130

EXIT_CODES = """exit codes:
  0    success
  1    unexpected tuner error
  2    bad arguments or input (the message names the value)
  3    the lab failed: a program missing, a process that exited or never listened,
       a configuration the proxy rejected
  4    load generation failed
  5    a server could not be probed
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
    from tuner.demo import render_demo, run_demo

    if args.bursts < 1:
        raise ConfigError(f"--bursts must be at least 1, got {args.bursts}")
    say = (lambda _line: None) if args.json else (lambda line: print(line, flush=True))
    result = run_demo(n_bursts=args.bursts, say=say)
    print(json.dumps(result.as_json(), indent=2) if args.json else "\n" + render_demo(result))
    return 0


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
