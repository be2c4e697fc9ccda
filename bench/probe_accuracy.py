"""Benchmark: `tuner probe`'s wall time and accuracy against a single raw socket.

For each server and idle timeout T, the probe (5 samples) and an independent reference
measurement (one blocking socket, timed from the end of its response to recv() == b"") run
side by side against the same server in the same moment. Prints elapsed / T, where T is the
measured close time (nobody can see a close at T in less than T), and the error.
Targets (issue 3): elapsed <= 1.2 x T + 1 s; |idle_close_s - reference| <= 50 ms.

    .venv/bin/python bench/probe_accuracy.py                 # T = 1, 5, 15, 60 s
    .venv/bin/python bench/probe_accuracy.py --timeouts 1,5  # quicker
"""

from __future__ import annotations

import argparse
import http.client
import socket
import threading
import time

from tuner.lab import Lab, get_upstream
from tuner.probe import parse_target, probe


def reference_close_s(port: int, result: list[float]) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    with sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        response.read()
        answered = time.monotonic()
        sock.settimeout(600)
        while sock.recv(4096):
            pass
        result.append(time.monotonic() - answered)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeouts", default="1,5,15,60",
                        help="upstream idle settings in whole seconds (default 1,5,15,60)")
    parser.add_argument("--servers", default="node,uvicorn,hypercorn,gunicorn")
    args = parser.parse_args()
    print(f"{'server':10} {'setting':>7} {'reference':>9} {'probe':>9} {'error':>8} "
          f"{'elapsed':>8} {'elapsed/T':>9}  targets")
    for server in args.servers.split(","):
        for setting_s in (float(t) for t in args.timeouts.split(",")):
            with Lab(proxy="nginx", upstream=get_upstream(server), proxy_idle_s=60,
                     upstream_idle_s=setting_s) as lab:
                assert lab.upstream is not None
                reference: list[float] = []
                thread = threading.Thread(target=reference_close_s,
                                          args=(lab.upstream.port, reference))
                thread.start()
                result = probe(parse_target(f"{lab.upstream.url}/"), n_samples=5,
                               max_idle_s=setting_s * 3 + 5)
                thread.join()
            close_s = result.idle_close_s
            if close_s is None or not reference:
                print(f"{server:10} {setting_s:7g} no close measured")
                continue
            error_ms = abs(close_s - reference[0]) * 1000
            ratio = result.elapsed_s / close_s
            ok = result.elapsed_s <= 1.2 * close_s + 1 and error_ms <= 50
            print(f"{server:10} {setting_s:6g}s {reference[0]:8.3f}s {close_s:8.3f}s "
                  f"{error_ms:6.1f}ms {result.elapsed_s:7.2f}s {ratio:9.3f}  "
                  f"{'met' if ok else 'MISSED'}", flush=True)


if __name__ == "__main__":
    main()
