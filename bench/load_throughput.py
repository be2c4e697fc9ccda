"""Benchmark: load generation through nginx, Locust (1 process, N workers) vs wrk.

All three POST the same body to the same lab (nginx 60s in front of Node 5s), one after
the other in this run, each for --seconds with --connections concurrent connections;
printed as requests per second and as a ratio to wrk (Debian's package: `apt-get install wrk`).

    .venv/bin/python bench/load_throughput.py [--seconds 15] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tuner.lab import Lab, get_upstream

HERE = Path(__file__).parent


def locust_rps(url: str, *, seconds: float, users: int, workers: int) -> float:
    argv = [sys.executable, "-m", "locust", "-f", str(HERE / "locust_throughput.py"),
            "--headless", "--host", url, "-u", str(users), "-r", "100",
            "-t", f"{seconds:g}s", "--json", "--skip-log", "--stop-timeout", "2"]
    if workers:
        argv += ["--processes", str(workers)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    # with --processes every process prints its own JSON document; the master's has the stats
    decoder, documents, at = json.JSONDecoder(), [], 0
    text = out.stdout
    while at < len(text):
        if text[at].isspace():
            at += 1
            continue
        document, at = decoder.raw_decode(text, at)
        documents.append(document)
    stats = max(documents, key=lambda d: sum(e["num_requests"] for e in d))
    total = sum(entry["num_requests"] for entry in stats)
    first = min(entry["start_time"] for entry in stats)
    last = max(entry["last_request_timestamp"] for entry in stats)
    return total / max(1e-9, last - first)


def wrk_rps(url: str, *, seconds: float, connections: int) -> float | None:
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    out = subprocess.run([wrk, "-t2", f"-c{connections}", f"-d{seconds:g}s",
                          "-s", str(HERE / "wrk_post.lua"), url + "/"],
                         capture_output=True, text=True, timeout=seconds + 30)
    match = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    return float(match.group(1)) if match else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with Lab(proxy="nginx", upstream=get_upstream("node"), proxy_idle_s=60,
             upstream_idle_s=5) as lab:
        assert lab.proxy is not None
        url = lab.proxy.url
        wrk = wrk_rps(url, seconds=args.seconds, connections=args.connections)
        single = locust_rps(url, seconds=args.seconds, users=args.connections, workers=0)
        multi = locust_rps(url, seconds=args.seconds, users=args.connections,
                           workers=args.workers)
    print(f"{'generator':>22} {'req/s':>9} {'vs wrk':>7}")
    for name, rps in (("wrk", wrk), ("locust, 1 process", single),
                      (f"locust, {args.workers} workers", multi)):
        ratio = f"{rps / wrk:.3f}" if rps and wrk else "-"
        print(f"{name:>22} {rps or 0:9.0f} {ratio:>7}")
    if wrk is None:
        print("wrk is not installed: apt-get install wrk")


if __name__ == "__main__":
    main()
