"""A network namespace of the test's own, reachable from this machine only: pod IPs.

The API server refuses loopback addresses in EndpointSlices (as it should: a data plane
cannot reach a pod there), so the scan's tests give their "pods" a real, non-loopback
address: a fresh network namespace joined to this one by a veth pair on a /30 of
10.253.0.0/16 no route uses yet. Nothing is routed off the machine: the only route added is
the /30 onto the veth, and deleting the namespace deletes the pair. Needs root (CAP_NET_ADMIN);
without it the tests that use it skip, saying so.
"""

from __future__ import annotations

import os
import random
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class PodNetwork:
    name: str
    #: the namespace's address: what the test's pods "have" as pod IP
    pod_ip: str

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside the namespace (ip netns exec replaces itself with it)."""
        return ["ip", "netns", "exec", self.name, *argv]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


def can_create() -> bool:
    return os.geteuid() == 0 and subprocess.run(
        ["ip", "netns", "list"], capture_output=True, timeout=10, check=False).returncode == 0


@contextmanager
def pod_network() -> Iterator[PodNetwork]:
    tag = uuid.uuid4().hex[:6]
    name, host_if, ns_if = f"tscan-{tag}", f"tsh{tag}", f"tsn{tag}"
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True,
                            timeout=10, check=True).stdout
    third = random.choice([n for n in range(1, 255) if f"10.253.{n}." not in routes])
    host_ip, pod_ip = f"10.253.{third}.1", f"10.253.{third}.2"
    _ip("netns", "add", name)
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", name)
        _ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", name, "addr", "add", f"{pod_ip}/30", "dev", ns_if)
        _ip("-n", name, "link", "set", ns_if, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        yield PodNetwork(name, pod_ip)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10,
                       check=False)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=10,
                       check=False)
