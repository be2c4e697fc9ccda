"""Follow one ConfigMap through the Kubernetes API: the tuning source of
`tuner sidecar --configmap NAMESPACE/NAME`.

A ConfigMap mounted as a volume reaches the pod only after the kubelet's sync period plus
its cache TTL (often 60-90 s); a watch sees the change in well under a second.
`ConfigMapWatch` gets the ConfigMap, then watches it from a background thread with the
official client (`Watch().stream` over `list_namespaced_config_map` with the field selector
`metadata.name=NAME`, so RBAC can name the one object: verbs get and watch, no list). The
sidecar polls `read()` as it reads a mounted directory.

Design decision: after a get, the watch starts from the *current state* (no
resourceVersion: the server first sends the object as ADDED), not from the object's own
resourceVersion. An object unchanged for long carries a resourceVersion older than the API
server's watch window, so a watch from it answers 410 Gone, and a re-get would return the
same old version: a loop. Later watches resume from the last event or bookmark, and a 410
there re-gets. Failures never end the thread: a 403 or 404, or an unreachable server, keep
the last data in force, show in `problem()` (worded by `api_errors`, as everywhere in
the tool), and are retried after a back-off that doubles up to a bound.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from tuner.errors import ConfigError, KubeError, KubeExpired, KubeNotFound
from tuner.kube.client import api_errors
from tuner.kube.objects import check_name

#: the wait after a failure doubles from the first to the second (seconds)
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
#: the server ends each watch after this; then we re-watch from the last resourceVersion.
#: Short enough that a watch fixed by an RBAC change clears its error within a minute even
#: with no event; one request a minute per pod costs the API server nothing.
WATCH_TIMEOUT_S = 60.0
#: client-side read timeout beyond the watch's own: a connection dropped silently (a NAT or
#: load balancer that forgot it) must not hang the watch forever
READ_MARGIN_S = 10.0
CONNECT_TIMEOUT_S = 5.0
GET_TIMEOUT_S = 30.0


def parse_configmap_ref(text: str, *, flag: str = "--configmap") -> tuple[str, str]:
    """"NAMESPACE/NAME" -> (namespace, name), both valid Kubernetes names."""
    namespace, slash, name = text.partition("/")
    if not slash or not namespace or not name or "/" in name:
        raise ConfigError(f"{flag} {text!r} is not NAMESPACE/NAME, e.g. "
                          "tuner-demo/tuner-tuning")
    check_name(f"{flag} namespace", namespace, max_length=63)
    check_name(f"{flag} name", name)
    return namespace, name


class ConfigMapWatch:
    """The data of one ConfigMap, kept current by a background thread; a `TuningSource`
    of the sidecar (`read()`, `problem()`)."""

    def __init__(self, connection: tuple[Any, str, str | None], namespace: str, name: str, *,
                 timeout_s: float = WATCH_TIMEOUT_S, backoff_min_s: float = BACKOFF_MIN_S,
                 backoff_max_s: float = BACKOFF_MAX_S) -> None:
        self._api, self._host, self._context = connection
        self.namespace, self.name = namespace, name
        #: the API counts a watch's timeout in whole seconds
        self.timeout_s = max(1, math.ceil(timeout_s))
        self.backoff_min_s, self.backoff_max_s = backoff_min_s, backoff_max_s
        self._lock = threading.Lock()
        self._data: dict[str, str] | None = None
        #: what failed last, by stage ("get", "watch"); a success of that stage clears it,
        #: and so does any new data. Two stages, so a get that works cannot hide (even for a
        #: moment) a watch that is forbidden.
        self._problems: dict[str, str] = {}
        self._crash: BaseException | None = None
        self._stopped = threading.Event()
        self._watcher: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"watch configmap {namespace}/{name}")

    def read(self) -> dict[str, str] | None:
        """The ConfigMap's data as last seen; None until it was read once."""
        with self._lock:
            return None if self._data is None else dict(self._data)

    def problem(self) -> str | None:
        """Why `read()` may be stale or empty; None while the watch is healthy."""
        with self._lock:
            if self._crash is not None:
                return (f"the watch of ConfigMap {self.namespace}/{self.name} stopped on a "
                        f"bug: {self._crash!r}; the traceback is in the sidecar's log; restart "
                        "the sidecar")
            return "; ".join(self._problems.values()) or None

    def start(self) -> None:
        self._thread.start()

    def stop(self, *, timeout_s: float = 5.0) -> None:
        self._stopped.set()
        watcher = self._watcher
        if watcher is not None:
            watcher.stop()  # shuts the socket down: the blocked read returns now
            # Watch.stop finds the socket only on a kept-alive connection; when the server
            # sent `Connection: close`, http.client has handed the socket to the response,
            # which urllib3 (>= 2.3) can still shut down
            response = getattr(watcher, "_resp", None)
            if response is not None and hasattr(response, "shutdown"):
                response.shutdown()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            self._follow()
        except BaseException as exc:  # recorded for /status, then the traceback as usual
            with self._lock:
                self._crash = exc
            raise

    def _follow(self) -> None:
        resume: str | None = None  # where the next watch starts; None: get first
        backoff_s = self.backoff_min_s
        while not self._stopped.is_set():
            stage = "get"
            try:
                if resume is None:
                    self._get()
                stage = "watch"
                resume = self._watch_once(resume)
                backoff_s = self.backoff_min_s
            except KubeError as exc:
                if self._stopped.is_set():
                    return  # stop() cut the connection
                self._fail(stage, f"cannot {stage} ConfigMap {self.namespace}/{self.name}: "
                           f"{exc} (the last tuning read stays in force; retrying in "
                           f"{backoff_s:g}s)")
                resume = None  # get afresh: the server may have lost our place
                self._stopped.wait(backoff_s)
                backoff_s = min(backoff_s * 2, self.backoff_max_s)

    def _get(self) -> None:
        try:
            with api_errors("get", self.namespace, self.name, self._host, self._context):
                configmap = self._api.read_namespaced_config_map(
                    self.name, self.namespace,
                    _request_timeout=(CONNECT_TIMEOUT_S, GET_TIMEOUT_S))
        except KubeNotFound:
            # the watch that follows sees it created, at once
            self._fail("get", f"ConfigMap {self.namespace}/{self.name} does not exist "
                       "(404); watching for it to be created (the last tuning read stays "
                       "in force)")
            return
        self._update(dict(configmap.data or {}), clears=("get",))

    def _watch_once(self, resume: str | None) -> str | None:
        """Watch until the server ends the watch; return where the next one resumes (None:
        get first, after a 410 Gone or when nothing told us a resourceVersion)."""
        from kubernetes import watch

        self._watcher = watcher = watch.Watch()
        if self._stopped.is_set():
            return resume
        options: dict[str, Any] = {
            "field_selector": f"metadata.name={self.name}", "timeout_seconds": self.timeout_s,
            # bookmarks carry the newest resourceVersion, so a quiet ConfigMap's re-watch
            # does not start from its own, old one (which could answer 410)
            "allow_watch_bookmarks": True,
            "_request_timeout": (CONNECT_TIMEOUT_S, self.timeout_s + READ_MARGIN_S)}
        if resume is not None:
            options["resource_version"] = resume
        try:
            with api_errors("watch", self.namespace, self.name, self._host, self._context):
                for event in watcher.stream(self._api.list_namespaced_config_map,
                                           self.namespace, **options):
                    resume = self._on_event(event) or resume
        except KubeExpired:
            if "resource_version" not in options:
                raise
            return None  # our place is gone from the server's window: get again
        with self._lock:
            self._problems.pop("watch", None)
        return resume

    def _on_event(self, event: dict[str, Any]) -> str | None:
        raw = event["raw_object"]
        if event["type"] in ("ADDED", "MODIFIED"):
            self._update({str(k): str(v) for k, v in (raw.get("data") or {}).items()},
                         clears=("get", "watch"))
        elif event["type"] == "DELETED":
            self._fail("get", f"ConfigMap {self.namespace}/{self.name} was deleted; the last "
                       "tuning read stays in force until it is created again")
        version: str | None = (raw.get("metadata") or {}).get("resourceVersion")
        return version

    def _update(self, data: dict[str, str], *, clears: tuple[str, ...]) -> None:
        with self._lock:
            self._data = data
            for stage in clears:
                self._problems.pop(stage, None)

    def _fail(self, stage: str, message: str) -> None:
        with self._lock:
            self._problems[stage] = message
