"""The reverse proxies `tuner` knows, by the name every command and spec uses.

The one list: the lab (tuner.lab.lab.PROXIES) maps each to its class and checks it covers
exactly these, and the spec and the CLI offer these. Pure: importing it starts nothing.
"""

PROXY_NAMES = ("nginx", "haproxy", "envoy")
