"""The experiment spec: a YAML file with the same fields as `tuner experiment`'s flags.

    proxy: nginx                    # nginx | haproxy | envoy
    upstream: node                  # node | uvicorn | gunicorn | hypercorn
    # upstream_cmd: "node app.js --port {port} --keep-alive-ms {idle_ms}"
    proxy_idle: [1s, 3s]            # the grid: proxy idle values x upstream idle values
    upstream_idle: [1s]
    repeats: 1
    max_seconds: 3m                 # per-trial budget; default: from the close (analysis/budget)
    max_requests: 0                 # per-trial budget, 0: none
    gaps: around_close              # or a list of durations: [1.99s, 2s, 2.01s]
    gap_half_width: 9ms             # sweep the close +- this (default: 9 ms below it to it)
    gap_steps: 7                    # default: 7, or 3 from a 4.5 s close
    sweep: bursts                   # one gap per burst; groups: every burst tries every gap
    methods: POST                   # or POST:3,GET:1
    path: /                         # what the load requests, e.g. /healthz
    host: shop.example              # the Host the lab's proxy sends the upstream (local
                                    # target); default: the upstream's 127.0.0.1:PORT
    burst_size: 30                  # default: 30, or 100 from a 4.5 s close (fewer periods)
    workers: 0                      # 0: one Locust process; N: Locust master + N workers
                                    # (processes beside it; kubernetes.workers: pods)
    parallel: 1                     # cells run side by side after the control, a lab each
    seed: 1
    db: results.db
    unsafe_after: 3                 # stopping rule, see tuner.analysis.stopping
    safe_after: 300
    control: true                   # first, a positive control trial that must race
    write_back:                     # where `tuner recommend -o configmap` / `tuner apply` write
      ingress_nginx: {namespace: ingress-nginx, name: ingress-nginx-controller}
      app: {namespace: shop, name: checkout-config, key: KEEP_ALIVE_TIMEOUT_MS, unit: ms}
    kubernetes:                     # --target kubernetes: see tuner/kube/target.py
      namespace: tuner-demo
      service_url: http://demo-app.tuner-demo.svc/
      deployment: demo-app
      workers: 2                    # the load from 2 Locust worker pods (tuner/kube/workers.py)

Design decision: parsing is pure (a dict in, a frozen `ExperimentSpec` out) and every error
names the key and the bad value, as `proxy_idle[1]: '10 parsecs' is not a duration`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.analysis.budget import LoadShape, load_shape
from tuner.analysis.stopping import StopRule
from tuner.durations import duration_field
from tuner.errors import ConfigError, TunerError
from tuner.load.methods import parse_method_mix
from tuner.load.request import parse_host, parse_path
from tuner.proxy_names import PROXY_NAMES

PROXIES = PROXY_NAMES
UPSTREAMS = ("node", "uvicorn", "gunicorn", "hypercorn")
AROUND_CLOSE = "around_close"


@dataclass(frozen=True)
class ExperimentSpec:
    proxy: str = "nginx"
    upstream: str = "node"
    upstream_cmd: str | None = None
    proxy_idle_s: tuple[float, ...] = (1.0, 3.0)
    upstream_idle_s: tuple[float, ...] = (1.0,)
    repeats: int = 1
    #: None: follow the upstream's measured close (tuner.analysis.budget)
    max_seconds: float | None = None
    max_requests: int = 0
    #: None: sweep around each trial's measured close; else these gaps, cycled
    gaps_s: tuple[float, ...] | None = None
    #: None: sweep from 9 ms below the close to the close (tuner.analysis.budget); a value:
    #: the close +- this
    gap_half_width_s: float | None = None
    #: None: from the close (tuner.analysis.budget.load_shape: 7, or 3 from a 4.5 s close)
    gap_steps: int | None = None
    #: "bursts": one gap per burst; "groups": every burst tries every gap
    #: (tuner.load.conduct). Not yet the default: in short runs here the groups sweep with
    #: 150 users caught fewer races (README, "Production timeouts")
    sweep: str = "bursts"
    methods: str = "POST"
    #: the request path the load (and the preflight) asks for, query included
    path: str = "/"
    #: the Host header the lab's proxy sends the upstream; None: the upstream's own address
    #: (127.0.0.1:PORT, tuner.lab.proxy). Stored specs of older versions have neither key
    #: and read as these defaults: they requested / too, but their nginx and HAProxy sent
    #: the upstream another Host (nginx `tuner_upstream`, HAProxy the client's).
    host: str | None = None
    #: None: from the close (tuner.analysis.budget.load_shape): 30, the load every verdict
    #: of the lab was measured with, or 100 from a 4.5 s close (a safe verdict after 3
    #: reused bursts instead of 10)
    burst_size: int | None = None
    workers: int = 0
    #: trials run at once after the control, each on a lab of its own (local target)
    parallel: int = 1
    seed: int = 1
    db: str = "results.db"
    stop: StopRule = field(default_factory=StopRule)
    #: run a positive control first (see tuner.analysis.judge); False gives up the proof
    #: that this load can show the race here
    control: bool = True
    #: TESTS ONLY: spread each burst over up to this many ms, to check that a loose load is
    #: measured as such and never judged safe
    loosen_ms: float = 0.0
    write_back: dict[str, Any] = field(default_factory=dict)
    #: --target kubernetes: where in the cluster (see tuner.kube.target)
    kubernetes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for the results store."""
        return dataclasses.asdict(self)

    @classmethod
    def from_stored(cls, data: Mapping[str, Any]) -> ExperimentSpec:
        values = dict(data)
        values["stop"] = StopRule(**values.get("stop", {}))
        for key in ("proxy_idle_s", "upstream_idle_s", "gaps_s"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    def shape(self, close_s: float) -> LoadShape:
        """The burst size and gap steps of a trial whose upstream closes at `close_s`."""
        return load_shape(close_s, burst_size=self.burst_size, gap_steps=self.gap_steps,
                          gap_half_width_s=self.gap_half_width_s)

    def cells(self) -> list[tuple[float, float]]:
        return [(p, u) for p in self.proxy_idle_s for u in self.upstream_idle_s]


def _bad(key: str, value: object, why: str) -> ConfigError:
    return ConfigError(f"{key}: {value!r} {why}")


def _durations(key: str, value: object) -> tuple[float, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise _bad(key, value, "must be a duration or a non-empty list of durations")
    values = tuple(duration_field(f"{key}[{i}]", item) for i, item in enumerate(items))
    for i, seconds in enumerate(values):
        if any(abs(seconds - earlier) < 1e-9 for earlier in values[:i]):
            raise _bad(f"{key}[{i}]", items[i], "repeats an earlier value of the list")
    return values


def _int(key: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(key, value, "must be a whole number")
    if value < minimum:
        raise _bad(key, value, f"must be at least {minimum}")
    return value


def _choice(key: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _bad(key, value, f"is not one of {', '.join(choices)}")
    return str(value)


_FIELDS = ("proxy", "upstream", "upstream_cmd", "proxy_idle", "upstream_idle", "repeats",
           "max_seconds", "max_requests", "gaps", "gap_half_width", "gap_steps", "sweep",
           "methods", "path", "host", "burst_size", "workers", "parallel", "seed", "db",
           "unsafe_after", "safe_after", "control", "loosen_ms", "write_back", "kubernetes")


def parse_spec(data: Mapping[str, Any], *, base: ExperimentSpec | None = None) -> ExperimentSpec:
    """Apply the fields of `data` (YAML or flags, same names) over `base` (or the defaults)."""
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown field; the fields are {', '.join(_FIELDS)}")
    spec = base or ExperimentSpec()
    changes: dict[str, Any] = {}
    stop = spec.stop
    for key, value in data.items():
        if value is None and key != "upstream_cmd":
            continue
        if key == "proxy":
            changes["proxy"] = _choice(key, value, PROXIES)
        elif key == "upstream":
            changes["upstream"] = _choice(key, value, UPSTREAMS)
        elif key == "sweep":
            changes["sweep"] = _choice(key, value, ("groups", "bursts"))
        elif key == "upstream_cmd":
            if value is not None and not isinstance(value, str):
                raise _bad(key, value, "must be a command line with {port} and {idle_s}")
            changes["upstream_cmd"] = value
        elif key in ("proxy_idle", "upstream_idle"):
            changes[f"{key}_s"] = _durations(key, value)
        elif key in ("max_seconds",):
            changes["max_seconds"] = duration_field(key, value)
        elif key == "gap_half_width":
            changes["gap_half_width_s"] = duration_field(key, value)
        elif key == "gaps":
            changes["gaps_s"] = None if value == AROUND_CLOSE else _durations(key, value)
        elif key in ("repeats", "burst_size", "gap_steps", "parallel"):
            changes[key] = _int(key, value, minimum=1)
        elif key in ("max_requests", "workers", "seed"):
            changes[key] = _int(key, value, minimum=0)
        elif key == "methods":
            changes["methods"] = _method_mix(key, value)
        elif key == "path":
            changes["path"] = parse_path(value, what=key)
        elif key == "host":
            changes["host"] = parse_host(value, what=key)
        elif key == "db":
            if not isinstance(value, str) or not value:
                raise _bad(key, value, "must be a file path")
            changes["db"] = value
        elif key == "unsafe_after":
            stop = dataclasses.replace(stop, unsafe_after_failures=_int(key, value, minimum=0))
        elif key == "write_back":
            from tuner.kube.objects import parse_write_back

            changes["write_back"] = parse_write_back(value)
        elif key == "kubernetes":
            from tuner.kube.target import parse_cluster_target

            changes["kubernetes"] = parse_cluster_target(value)
        elif key == "safe_after":
            stop = dataclasses.replace(stop, safe_after_requests=_int(key, value, minimum=0))
        elif key == "control":
            if not isinstance(value, bool):
                raise _bad(key, value, "must be true or false")
            changes["control"] = value
        elif key == "loosen_ms":
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise _bad(key, value, "must be a number of milliseconds, 0 or more")
            changes["loosen_ms"] = float(value)
    return dataclasses.replace(spec, **changes, stop=stop)


def _method_mix(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise _bad(key, value, "must be a method mix such as POST or POST:3,GET:1")
    parse_method_mix(value, what=key)
    return value.upper()


def load_spec(path: Path) -> ExperimentSpec:
    """Read a YAML spec file; errors name the file and the key."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"spec file {path} does not exist") from None
    except OSError as exc:  # a directory, no permission
        raise ConfigError(f"spec file {path} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"spec file {path} is not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start}); give the experiment's YAML spec") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the spec must be a mapping of fields, "
                          f"got {type(data).__name__}")
    try:
        return parse_spec(data)
    except TunerError as exc:
        raise ConfigError(f"{path}: {exc}") from None
