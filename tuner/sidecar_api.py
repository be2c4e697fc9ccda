"""The sidecar's HTTP endpoints, each bounded in the work it does and the caller it answers.

    /metrics   open (Prometheus scrapes it): counters and settings; no query parameters
    /status    open: the generation applied, the settings, errors, counters since start;
               for the caller the Job is (tuner.sidecar_auth): also `log_offset` (the mark),
               and with ?since=OFFSET the signatures counted in the log after that mark
    /probe     the Job only: `tuner probe` of the app beside it, ?samples=N&max_idle=DURATION

Design decision: every value a caller can send is capped, and a value over a cap is a 400
that names it, never silently clamped. The caps and why:
  samples <= 10      each sample is one connection to the app, held open for up to
                     max_idle (plus one to check reuse): 11 at most, against an app that also
                     serves nginx's pool (128 in the demo). The runner asks for 3, `tuner
                     probe` defaults to 5; more samples add nothing on the loopback in a pod.
                     Besides them the probe answers up to `MAX_PROBE_STAGGERED` (60)
                     staggered connections, one request each, until the first close, to tell
                     a timer from a sweep: enough to read a sweep of up to 7 s at any phase
                     (tuner.probe's schedule), fewer than the 150 of `tuner probe`. An app
                     thus sees at most 10 + 1 + 60 probe connections.
  max_idle <= 1h     how long the probe waits for the app to close; the runner asks for
                     3 x the app's setting + 25 s, and the longest setting it meets is a GCP
                     backend's (> 600 s, probed for ~31 min). It bounds time, not connections.
  one probe at once  a second gets 429 with Retry-After (the first one's time left).
  a total deadline   max_idle + 30 s for the whole probe, however slowly the app answers.
  since              counts at most 16 MiB of log after the mark, streamed 256 KiB at a time;
                     more is a 503 (the trial's counts cannot be taken), never a partial count.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from tuner.analysis.signatures import count_nginx_signatures
from tuner.boundedhttp import Request, Response
from tuner.durations import parse_duration
from tuner.errors import ConfigError, ProbeError, TunerError
from tuner.sidecar_auth import CHALLENGE, CallerCheck

MAX_PROBE_SAMPLES = 10
MAX_PROBE_IDLE_S = 3600.0  # 1h, as the messages say
DEFAULT_PROBE_SAMPLES = 3
#: staggered connections of one probe (see the module doc)
MAX_PROBE_STAGGERED = 60
DEFAULT_PROBE_IDLE_S = 60.0
#: beyond max_idle, what the probe's connects, first answers and reuse check may take
PROBE_SLACK_S = 30.0
MAX_SINCE_BYTES = 16 * 1024 * 1024
_CHUNK_BYTES = 256 * 1024
#: a query value longer than this is refused before it is parsed
_MAX_VALUE_CHARS = 32


def parse_query(query: str, allowed: Mapping[str, Callable[[str], Any]], *,
                endpoint: str) -> dict[str, Any]:
    """The query string's parameters, each converted by its function in `allowed`; a
    ConfigError naming the parameter for anything else (pure)."""
    found: dict[str, Any] = {}
    if not query:
        return found
    for part in query.split("&"):
        raw_name, has_value, raw_value = part.partition("=")
        try:
            name = unquote(raw_name, errors="strict")
            value = unquote(raw_value, errors="strict")
        except UnicodeDecodeError:
            raise ConfigError(f"{endpoint}: {part[:40]!r} is not percent-encoded UTF-8"
                              ) from None
        if name not in allowed:
            takes = ", ".join(allowed) or "no parameters"
            raise ConfigError(f"{endpoint}: unknown parameter {name[:40]!r}; it takes {takes}")
        if name in found:
            raise ConfigError(f"{endpoint}: {name} given twice")
        if not has_value or not value:
            raise ConfigError(f"{endpoint}: {name} has no value")
        if len(value) > _MAX_VALUE_CHARS or not value.isprintable():
            raise ConfigError(f"{endpoint}: {name}={value[:_MAX_VALUE_CHARS]!r}... is not a "
                              f"value (at most {_MAX_VALUE_CHARS} printable characters)")
        found[name] = allowed[name](value)
    return found


def _samples(value: str) -> int:
    if not (value.isascii() and value.isdigit()):
        raise ConfigError(f"samples={value!r} is not a whole number; ask for 1-"
                          f"{MAX_PROBE_SAMPLES}")
    samples = int(value)
    if not 1 <= samples <= MAX_PROBE_SAMPLES:
        raise ConfigError(f"samples={samples} is outside 1-{MAX_PROBE_SAMPLES}: each sample "
                          "holds one connection to the app for up to max_idle; ask for "
                          f"at most {MAX_PROBE_SAMPLES}")
    return samples


def _max_idle(value: str) -> float:
    seconds = parse_duration(value, what="max_idle")
    if not 0 < seconds <= MAX_PROBE_IDLE_S:
        raise ConfigError(f"max_idle={value} is outside (0, 1h]: the probe holds its "
                          "connections to the app that long; ask for at most 1h")
    return seconds


def _offset(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or len(value) > 19:
        raise ConfigError(f"since={value!r} is not a log offset (a whole number of bytes, "
                          "the log_offset of an earlier /status)")
    return int(value)


def count_since(path: Path, mark: int, *, max_bytes: int = MAX_SINCE_BYTES
                ) -> Counter[str] | None:
    """The signatures in the complete lines written after `mark`, read in chunks; None when
    more than `max_bytes` were written since. A log that shrank below `mark` was rotated
    and is read from its start (as tuner.lab.errorlog.ErrorLog)."""
    counts: Counter[str] = Counter()
    try:
        with open(path, "rb") as log:
            end = log.seek(0, 2)
            start = 0 if end < mark else mark
            if end - start > max_bytes:
                return None
            log.seek(start)
            carry = b""  # a line begun in the previous chunk (at most max_bytes)
            while log.tell() < end:
                chunk = log.read(min(_CHUNK_BYTES, end - log.tell()))
                if not chunk:  # truncated meanwhile
                    break
                complete, _, carry = (carry + chunk).rpartition(b"\n")
                counts.update(count_nginx_signatures(
                    line for line in complete.decode(errors="replace").split("\n") if line))
    except FileNotFoundError:
        pass
    return counts


def _json(status: int, document: Mapping[str, Any], *headers: tuple[str, str]) -> Response:
    return Response(status, json.dumps(document).encode(), "application/json", headers)


class SidecarAPI:
    """Routes a request to its endpoint; `state` is a tuner.sidecar.SidecarState."""

    def __init__(self, *, state: Any, error_log: Path, app_url: str | None,
                 callers: CallerCheck) -> None:
        self.state = state
        self.error_log = error_log
        self.app_url = app_url
        self.callers = callers
        self._probing = threading.Lock()
        #: time.monotonic() by which the running probe ends (its deadline)
        self._probe_ends = 0.0

    def handle(self, request: Request) -> Response:
        url = urlsplit(request.target)
        try:
            if url.path == "/metrics":
                parse_query(url.query, {}, endpoint="/metrics")
                return Response(200, self.state.metrics().encode(),
                                "text/plain; version=0.0.4")
            if url.path == "/status":
                return self._status(request, parse_query(url.query, {"since": _offset},
                                                         endpoint="/status"))
            if url.path == "/probe":
                return self._probe_app(request, url.query)
        except ConfigError as exc:
            return _json(400, {"error": str(exc)})
        return _json(404, {"error": f"no {url.path[:64]!r} here; try /metrics, /status or "
                                    "/probe"})

    def _status(self, request: Request, query: Mapping[str, Any]) -> Response:
        authorization = request.headers.get("Authorization")
        # without a token and without ?since, a refusal only leaves the mark out (no API
        # call is made for a request with no token)
        verdict = self.callers.check(authorization)
        if not verdict.is_allowed and (authorization is not None or "since" in query):
            return self._refused(verdict.status, verdict.reason, "/status?since")
        is_caller = verdict.is_allowed
        document = self.state.status()
        if is_caller:
            document["log_offset"] = self.mark()
        if "since" in query:
            counts = self.counts_since(query["since"])
            if counts is None:
                return _json(503, {"error": f"more than {MAX_SINCE_BYTES // 2**20} MiB of "
                                            f"log were written since offset {query['since']}: "
                                            "too much for one /status to count"})
            document["signatures_since"] = dict(counts)
        return _json(200, document)

    # -- where the proxy's race count stands; tuner.sidecar_envoy reads Envoy's counters --
    def mark(self) -> int:
        """The mark a runner keeps before its load: the error log's size."""
        return _log_size(self.error_log)

    def counts_since(self, mark: int) -> Counter[str] | None:
        """The signatures after `mark` (None: too much log to count)."""
        return count_since(self.error_log, mark)

    def _refused(self, status: int, reason: str, what: str) -> Response:
        headers = (CHALLENGE,) if status == 401 else ()
        if status == 503:
            headers = (("Retry-After", "5"),)
        return _json(status, {"error": f"{what}: {reason}"}, *headers)

    def _probe_app(self, request: Request, query_text: str) -> Response:
        verdict = self.callers.check(request.headers.get("Authorization"))
        if not verdict.is_allowed:
            return self._refused(verdict.status, verdict.reason, "/probe")
        query = parse_query(query_text, {"samples": _samples, "max_idle": _max_idle},
                            endpoint="/probe")
        if self.app_url is None:
            return _json(404, {"error": "start the sidecar with --app-url to probe the app"})
        if not self._probing.acquire(blocking=False):
            left_s = max(1, math.ceil(self._probe_ends - time.monotonic()))
            return _json(429, {"error": f"a probe is running (one at a time); it ends within "
                                        f"{left_s} s"}, ("Retry-After", str(left_s)))
        try:
            max_idle_s = query.get("max_idle", DEFAULT_PROBE_IDLE_S)
            deadline_s = max_idle_s + PROBE_SLACK_S
            self._probe_ends = time.monotonic() + deadline_s
            return self._run_probe(query.get("samples", DEFAULT_PROBE_SAMPLES), max_idle_s,
                                   deadline_s)
        finally:
            self._probing.release()

    def _run_probe(self, samples: int, max_idle_s: float, deadline_s: float) -> Response:
        from tuner.probe import parse_target, probe

        assert self.app_url is not None
        try:
            result = probe(parse_target(self.app_url), n_samples=samples, max_idle_s=max_idle_s,
                           deadline_s=deadline_s, max_staggered=MAX_PROBE_STAGGERED)
        except ProbeError as exc:  # the app beside us, not the request: a gateway's 502
            return _json(502, {"error": str(exc)})
        except TunerError as exc:
            return _json(400, {"error": str(exc)})
        document = result.as_json()
        document["earliest_close_s"] = result.earliest_close_s
        return _json(200, document)


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
