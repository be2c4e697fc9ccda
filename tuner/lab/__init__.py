"""The local lab: real proxies (nginx, HAProxy, Envoy) in front of real upstreams on 127.0.0.1."""

from tuner.lab.lab import PROXIES, Lab, LabInfo, UpstreamServer
from tuner.lab.upstreams import BUILTIN_UPSTREAMS, Upstream, command_upstream, get_upstream

__all__ = ["BUILTIN_UPSTREAMS", "PROXIES", "Lab", "LabInfo", "Upstream", "UpstreamServer",
           "command_upstream", "get_upstream"]
