"""`tuner scan`: every Service behind the cluster's proxies, audited in one idle period.

Layers, top to bottom:
    listing.py      I/O: read the API objects (one Snapshot), forbidden reads named
    discovery.py    PURE: routes -> backend Services -> EndpointSlices -> pods
    dataplanes.py   PURE: each route's data plane, its upstream idle timeout, and the source
    probing.py      I/O: probe every pod at once (bounded), each outcome classified
    audit.py        PURE: the finding per pod: verdict (analysis.verdict.judge) and the fixes
Output (table, JSON, Prometheus text) is tuner/output/scan.py.
"""
