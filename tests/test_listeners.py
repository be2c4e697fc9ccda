"""Every listener `tuner` starts, reviewed: the lab's proxies and upstreams and Locust's
master bind loopback only; the sidecar listens on loopback unless told otherwise, and then
never without a caller check. Listening sockets are read from /proc, as the kernel has them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tuner.cli import build_parser
from tuner.lab import Lab, get_upstream
from tuner.load.locust_runner import LocustPlan, locust_argv

from .conftest import TUNER, descendants


def listening_addresses(pids: set[int]) -> set[str]:
    """host:port of every TCP socket in LISTEN state that one of `pids` holds open."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:  # it exited meanwhile
            continue
        inodes |= {link[8:-1] for link in links if link.startswith("socket:[")}
    found = set()
    for table, is_v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                address, port = fields[1].rsplit(":", 1)
                found.add(f"{_address(address, is_v6)}:{int(port, 16)}")
    return found


def _address(hex_address: str, is_v6: bool) -> str:
    raw = bytes.fromhex(hex_address)
    if not is_v6:
        return ".".join(str(b) for b in reversed(raw))
    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]  # host-order 32-bit words
    return "[" + ":".join(b"".join(words)[i:i + 2].hex() for i in range(0, 16, 2)) + "]"


@pytest.mark.parametrize(("proxy", "upstream"), [("nginx", "node"), ("haproxy", "uvicorn"),
                                                 ("nginx", "gunicorn"),
                                                 ("haproxy", "hypercorn")])
def test_the_lab_listens_on_loopback_only(proxy: str, upstream: str) -> None:
    before = descendants(os.getpid())
    with Lab(proxy=proxy, upstream=get_upstream(upstream), proxy_idle_s=60,
             upstream_idle_s=5):
        started = descendants(os.getpid()) - before
        addresses = listening_addresses(started)
    assert len(addresses) >= 2, addresses  # the proxy and the upstream at least
    assert {address.rpartition(":")[0] for address in addresses} == {"127.0.0.1"}, addresses


def test_locusts_master_binds_loopback_on_a_port_of_its_own() -> None:
    plan = LocustPlan(host_url="http://127.0.0.1:8080", gaps_s=[1.0], workers=2)
    argv = locust_argv(plan, results_path=Path("r"), master_port=40123)
    assert argv[argv.index("--master-bind-host") + 1] == "127.0.0.1"
    assert argv[argv.index("--master-bind-port") + 1] == "40123"
    assert argv[argv.index("--master-port") + 1] == "40123"  # where its workers connect
    single = locust_argv(LocustPlan(host_url="http://127.0.0.1:8080", gaps_s=[1.0]),
                         results_path=Path("r"))
    assert "--processes" not in single  # one process: no master, nothing listens


def test_the_sidecar_listens_on_loopback_unless_told_and_then_checks_callers(
        tmp_path: Path) -> None:
    args = build_parser().parse_args(["sidecar", "--tuning-dir", ".", "--render-dir", ".",
                                      "--nginx-pid", "p", "--error-log", "e"])
    assert args.listen == "127.0.0.1:9901"
    base = [*TUNER, "sidecar", "--tuning-dir", str(tmp_path), "--render-dir", str(tmp_path),
            "--nginx-pid", "p", "--error-log", "e"]
    for extra, message in [
            (["--listen", "0.0.0.0:1", "--allow-unauthenticated"],
             "--allow-unauthenticated with --listen 0.0.0.0:1: anyone who reaches"),
            (["--listen", "[::]:1", "--allow-unauthenticated"], "with --listen [::]:1"),
            (["--listen", "0.0.0.0:1"], "say who may call /probe and /status?since with "
                                        "exactly one of --caller-service-account"),
            (["--allow-unauthenticated", "--token-file", "t"],
             "got --token-file and --allow-unauthenticated")]:
        done = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and message in done.stderr, (extra, done.stderr)
