"""An in-repo HTTP server that speaks the Kubernetes REST protocol for what `tuner` touches:
Namespaces (get), ConfigMaps (get, create, replace, merge patch, server-side apply,
delete, list and watch) and TokenReviews (authentication.k8s.io/v1, from a table of tokens
a test fills in: on a real API server the kubelet's projected tokens are reviewed), with
resourceVersion optimistic concurrency, field managers for
apply, and the real error shapes (a `Status` body with 400, 403, 404, 409, 422; a watch's
410 Gone as an ERROR event). A watch streams its events chunked, as the real server does.

No Kubernetes API server can be installed on these machines; this lets the real
`kubernetes` client be tested over HTTP, as kopf tests against a real localhost server.
Knobs a test can turn: `deny` (RBAC), `conflicts` (someone else writes first), `reject`
(an admission policy answers 422), `compacted_version` (older watches answer 410 Gone).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_PATH = re.compile(r"^/api/v1/namespaces(?:/(?P<ns>[^/?]+)(?:/configmaps(?:/(?P<name>[^/?]+))?)?)?"
                   r"(?:\?(?P<query>.*))?$")


class KubeState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.namespaces: set[str] = {"default"}
        self.configmaps: dict[tuple[str, str], dict[str, Any]] = {}
        self.version = 100
        self.deny: set[tuple[str, str]] = set()  # (verb, namespace)
        self.conflicts = 0  # the next N replaces lose to another writer
        self.reject: str | None = None  # an admission policy's 422 message
        self.requests: list[tuple[str, str]] = []
        self.deployments: dict[tuple[str, str], dict[str, Any]] = {}
        #: how a restart rolls out: "complete" at once, or "never" becomes ready
        self.rollout = "complete"
        self.pods: list[dict[str, Any]] = []  # what a pod list returns
        #: until this time.monotonic(), every connection is closed unanswered (unreachable)
        self.down_until = 0.0
        #: ... and after that, until this many more connections were closed unanswered (so
        #: an outage is met even when the client happens to make no request during it)
        self.down_connections = 0
        #: called (under the lock) with (namespace, name) when a Deployment is restarted,
        #: before its rollout status is set: a test starts its "new pods" here
        self.on_restart: Callable[[str, str], None] | None = None
        #: configmap changes in order, as watches stream them: {"type": ..., "object": ...}
        self.events: list[dict[str, Any]] = []
        #: a watch from an older resourceVersion answers 410 Gone, as after etcd compaction
        self.compacted_version = 0
        self.changed = threading.Condition(self.lock)  # notified on every event and on close
        self.closed = False  # the server is stopping: open watches end
        #: token -> (username, audiences it was issued for), as the API's token authenticator
        self.tokens: dict[str, tuple[str, list[str]]] = {}
        #: what an empty spec.audiences stands for: the API server's own audience
        self.api_audiences = ["https://kubernetes.default.svc.cluster.local"]

    def add_deployment(self, ns: str, name: str, replicas: int = 2) -> None:
        self.deployments[(ns, name)] = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns, "generation": 1,
                         "resourceVersion": self.next_version()},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "app",
                                                           "image": "app:1"}]}}},
            "status": {"observedGeneration": 1, "replicas": replicas,
                       "updatedReplicas": replicas, "availableReplicas": replicas}}

    def next_version(self) -> str:
        self.version += 1
        return str(self.version)

    def record(self, kind: str, obj: dict[str, Any]) -> None:
        """Log a configmap change for the watches and wake them (the caller holds the lock)."""
        public = {k: v for k, v in obj.items() if k != "_owners"}
        self.events.append({"type": kind, "object": json.loads(json.dumps(public))})
        self.changed.notify_all()


def _status(code: int, reason: str, message: str, name: str = "") -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code,
            "details": {"name": name, "kind": "configmaps"}}


class _Handler(BaseHTTPRequestHandler):
    state: KubeState

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def handle(self) -> None:
        state = self.state
        if time.monotonic() < state.down_until or state.down_connections > 0:
            with state.lock:
                state.down_connections = max(0, state.down_connections - 1)
            self.close_connection = True  # as an API server that is not there
            return
        super().handle()

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        parsed: dict[str, Any] = json.loads(self.rfile.read(length) or b"{}")
        return parsed

    def _route(self, verb: str) -> None:
        match = _PATH.match(self.path)
        state = self.state
        with state.lock:
            state.requests.append((verb, self.path))
            if match is None:
                self._send(404, _status(404, "NotFound", f"the server could not find {self.path}"))
                return
            ns, name = match.group("ns"), match.group("name")
            if (verb, ns or "") in state.deny:
                resource = "configmaps" if "/configmaps" in self.path else "namespaces"
                self._send(403, _status(
                    403, "Forbidden",
                    f'{resource} "{name or ns}" is forbidden: User "system:serviceaccount:'
                    f'tuner:tuner" cannot {verb} resource "{resource}" in API group "" in the '
                    f'namespace "{ns}"', name or ""))
                return
            if "/configmaps" not in self.path:
                if verb == "get" and ns in state.namespaces:
                    self._send(200, {"kind": "Namespace", "apiVersion": "v1",
                                     "metadata": {"name": ns}})
                else:
                    self._send(404, _status(404, "NotFound", f'namespaces "{ns}" not found'))
                return
            if ns not in state.namespaces:
                self._send(404, _status(404, "NotFound", f'namespaces "{ns}" not found'))
                return
            getattr(self, f"_{verb}")(ns, name)

    def _get(self, ns: str, name: str) -> None:
        obj = self.state.configmaps.get((ns, name))
        if obj is None:
            self._send(404, _status(404, "NotFound", f'configmaps "{name}" not found', name))
        else:
            self._send(200, {k: v for k, v in obj.items() if k != "_owners"})

    def _validate(self, ns: str, obj: dict[str, Any]) -> str | None:
        name = obj.get("metadata", {}).get("name", "")
        if not _NAME.fullmatch(name or ""):
            return f'ConfigMap "{name}" is invalid: metadata.name: Invalid value: "{name}"'
        for key, value in (obj.get("data") or {}).items():
            if not isinstance(value, str):
                return f'ConfigMap "{name}" is invalid: data[{key}]: must be a string'
        if self.state.reject:
            return f'admission webhook "policy.example" denied the request: {self.state.reject}'
        return None

    def _create(self, ns: str, _name: str | None) -> None:
        obj = self._body()
        problem = self._validate(ns, obj)
        name = obj.get("metadata", {}).get("name", "")
        if problem:
            self._send(422, _status(422, "Invalid", problem, name))
            return
        if (ns, name) in self.state.configmaps:
            self._send(409, _status(409, "AlreadyExists", f'configmaps "{name}" already exists',
                                    name))
            return
        obj["metadata"].update(namespace=ns, resourceVersion=self.state.next_version(),
                               uid=f"uid-{name}")
        self.state.configmaps[(ns, name)] = obj
        self.state.record("ADDED", obj)
        self._send(201, obj)

    def _update(self, ns: str, name: str) -> None:
        obj = self._body()
        current = self.state.configmaps.get((ns, name))
        if current is None:
            self._send(404, _status(404, "NotFound", f'configmaps "{name}" not found', name))
            return
        if self.state.conflicts > 0:  # another writer got there first
            self.state.conflicts -= 1
            current["metadata"]["resourceVersion"] = self.state.next_version()
        if obj.get("metadata", {}).get("resourceVersion") != current["metadata"]["resourceVersion"]:
            self._send(409, _status(
                409, "Conflict", f'Operation cannot be fulfilled on configmaps "{name}": the '
                "object has been modified; please apply your changes to the latest version "
                "and try again", name))
            return
        problem = self._validate(ns, obj)
        if problem:
            self._send(422, _status(422, "Invalid", problem, name))
            return
        obj["metadata"].update(namespace=ns, resourceVersion=self.state.next_version(),
                               uid=current["metadata"].get("uid"))
        self.state.configmaps[(ns, name)] = obj
        self.state.record("MODIFIED", obj)
        self._send(200, obj)

    def _patch(self, ns: str, name: str) -> None:
        content_type = self.headers.get("Content-Type", "")
        patch = self._body()
        query = parse_qs(urlsplit(self.path).query)
        current = self.state.configmaps.get((ns, name))
        if "apply-patch" in content_type:
            manager = (query.get("fieldManager") or [""])[0]
            if not manager:
                self._send(400, _status(400, "BadRequest", "PatchOptions.meta.k8s.io "
                                        '"" is invalid: fieldManager: Required value', name))
                return
            force = (query.get("force") or ["false"])[0] == "true"
            base = current or {"apiVersion": "v1", "kind": "ConfigMap",
                               "metadata": {"name": name, "namespace": ns}, "data": {}}
            owners: dict[str, str] = base.setdefault("_owners", {})
            conflicts = [key for key, value in (patch.get("data") or {}).items()
                         if owners.get(key, manager) != manager
                         and (base.get("data") or {}).get(key) != value]
            if conflicts and not force:
                self._send(409, _status(409, "Conflict", f"Apply failed with {len(conflicts)} "
                                        f'conflict(s): conflict with "{owners[conflicts[0]]}": '
                                        f".data.{conflicts[0]}", name))
                return
            for key in patch.get("data") or {}:
                owners[key] = manager
        elif "merge-patch" in content_type:
            if current is None:
                self._send(404, _status(404, "NotFound", f'configmaps "{name}" not found', name))
                return
            base = current
        else:
            self._send(415, _status(415, "UnsupportedMediaType",
                                    f"the body of the request was in an unknown format: "
                                    f"{content_type}", name))
            return
        if self.state.conflicts > 0 and current is not None:  # another writer got there first
            self.state.conflicts -= 1
            current["metadata"]["resourceVersion"] = self.state.next_version()
        expected = patch.get("metadata", {}).get("resourceVersion")
        if current is not None and expected and expected != current["metadata"][
                "resourceVersion"]:
            self._send(409, _status(409, "Conflict", f'Operation cannot be fulfilled on '
                                    f'configmaps "{name}": the object has been modified', name))
            return
        merged = json.loads(json.dumps(base))
        for key, value in (patch.get("data") or {}).items():
            if value is None:
                merged.setdefault("data", {}).pop(key, None)  # RFC 7386: null removes
            else:
                merged.setdefault("data", {})[key] = value
        for field in ("labels", "annotations"):
            if field in patch.get("metadata", {}):
                merged["metadata"].setdefault(field, {}).update(patch["metadata"][field])
        problem = self._validate(ns, merged)
        if problem:
            self._send(422, _status(422, "Invalid", problem, name))
            return
        merged["metadata"]["resourceVersion"] = self.state.next_version()
        self.state.configmaps[(ns, name)] = merged
        self.state.record("ADDED" if current is None else "MODIFIED", merged)
        public = {k: v for k, v in merged.items() if k != "_owners"}
        self._send(201 if current is None else 200, public)

    def do_PATCH(self) -> None:
        if self._apps("patch"):
            return
        self._route("patch")

    def _apps(self, verb: str) -> bool:
        """apps/v1 Deployments: get, and merge patch (a restart bumps the generation)."""
        match = re.match(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/?]+)", self.path)
        if match is None:
            return False
        ns, name = match.groups()
        state = self.state
        with state.lock:
            state.requests.append((verb, self.path))
            if (verb, ns) in state.deny:
                self._send(403, _status(403, "Forbidden", f'deployments.apps "{name}" is '
                                        f'forbidden: User "system:serviceaccount:tuner:tuner" '
                                        f'cannot {verb} resource "deployments" in API group '
                                        f'"apps" in the namespace "{ns}"', name))
                return True
            deployment = state.deployments.get((ns, name))
            if deployment is None:
                self._send(404, _status(404, "NotFound",
                                        f'deployments.apps "{name}" not found', name))
                return True
            if verb == "patch":
                patch = self._body()
                template = deployment["spec"]["template"]["metadata"]
                annotations = patch.get("spec", {}).get("template", {}).get(
                    "metadata", {}).get("annotations", {})
                template.setdefault("annotations", {}).update(annotations)
                deployment["metadata"]["generation"] += 1
                deployment["metadata"]["resourceVersion"] = state.next_version()
                replicas = deployment["spec"]["replicas"]
                if state.on_restart is not None:
                    state.on_restart(ns, name)
                if state.rollout == "complete":
                    deployment["status"].update(
                        observedGeneration=deployment["metadata"]["generation"],
                        updatedReplicas=replicas, availableReplicas=replicas, replicas=replicas)
                else:  # one new pod never becomes available; the old ones linger
                    deployment["status"].update(
                        observedGeneration=deployment["metadata"]["generation"],
                        updatedReplicas=1, availableReplicas=replicas - 1,
                        replicas=replicas + 1)
            self._send(200, deployment)
        return True

    def _pods(self) -> bool:
        match = re.match(r"^/api/v1/namespaces/([^/]+)/pods(?:\?.*)?$", self.path)
        if match is None:
            return False
        with self.state.lock:
            self.state.requests.append(("list", self.path))
            self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {},
                             "items": self.state.pods})
        return True

    def _delete(self, ns: str, name: str) -> None:
        obj = self.state.configmaps.pop((ns, name), None)
        if obj is None:
            self._send(404, _status(404, "NotFound", f'configmaps "{name}" not found', name))
            return
        obj["metadata"]["resourceVersion"] = self.state.next_version()
        self.state.record("DELETED", obj)
        self._send(200, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                         "status": "Success", "details": {"name": name, "kind": "configmaps"}})

    def _configmap_collection(self) -> bool:
        """List, or with watch=true watch, the configmaps of a namespace; fieldSelector
        `metadata.name=NAME` only (RBAC allows resourceNames on list/watch only with it)."""
        url = urlsplit(self.path)
        match = re.fullmatch(r"/api/v1/namespaces/([^/]+)/configmaps", url.path)
        if match is None:
            return False
        ns, query = match.group(1), parse_qs(url.query)
        verb = "watch" if (query.get("watch") or [""])[0].lower() in ("true", "1") else "list"
        selector = (query.get("fieldSelector") or [""])[0]
        name = selector.removeprefix("metadata.name=") or None
        state = self.state
        with state.lock:
            state.requests.append((verb, self.path))
            if selector and not selector.startswith("metadata.name="):
                self._send(400, _status(400, "BadRequest", f'field label not supported: '
                                        f'"{selector.partition("=")[0]}"'))
                return True
            if (verb, ns) in state.deny:
                what = f'configmaps "{name}"' if name else "configmaps"
                self._send(403, _status(
                    403, "Forbidden", f'{what} is forbidden: '
                    f'User "system:serviceaccount:tuner:tuner" cannot {verb} resource '
                    f'"configmaps" in API group "" in the namespace "{ns}"', name or ""))
                return True
            if ns not in state.namespaces:
                self._send(404, _status(404, "NotFound", f'namespaces "{ns}" not found'))
                return True
            if verb == "list":
                self._send(200, {"kind": "ConfigMapList", "apiVersion": "v1",
                                 "metadata": {"resourceVersion": str(state.version)},
                                 "items": self._items(ns, name)})
                return True
        self._watch(ns, name, query)
        return True

    def _items(self, ns: str, name: str | None) -> list[dict[str, Any]]:
        return [{k: v for k, v in obj.items() if k != "_owners"}
                for (in_ns, obj_name), obj in sorted(self.state.configmaps.items())
                if in_ns == ns and name in (None, obj_name)]

    def _watch(self, ns: str, name: str | None, query: dict[str, list[str]]) -> None:
        """Stream events newer than resourceVersion (unset or "0": the current objects as
        ADDED first), each a JSON line, until timeoutSeconds; then a BOOKMARK if asked."""
        state = self.state
        deadline = time.monotonic() + float((query.get("timeoutSeconds") or ["1800"])[0])
        requested = (query.get("resourceVersion") or [""])[0]
        bookmarks = (query.get("allowWatchBookmarks") or [""])[0].lower() == "true"
        # Chunked, so HTTP/1.1: urllib3 hands a chunked body over as each chunk arrives, but
        # reads a body ended by closing the connection to its very end (the whole watch).
        self.protocol_version = "HTTP/1.1"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        with state.lock:
            position: int | None = state.version
            if requested in ("", "0"):
                pending = [{"type": "ADDED", "object": obj} for obj in self._items(ns, name)]
            elif int(requested) < state.compacted_version:
                pending, position = [{"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "reason": "Expired", "code": 410, "message": f"too old resource version: "
                    f"{requested} ({state.compacted_version})"}}], None
            else:
                pending, position = [], int(requested)
        try:
            while True:
                for event in pending:
                    self._chunk(event)
                if position is None:
                    break
                pending, position = self._wait_events(ns, name, position, deadline, bookmarks)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client went away: its watch is over
            pass

    def _wait_events(self, ns: str, name: str | None, position: int, deadline: float,
                     bookmarks: bool) -> tuple[list[dict[str, Any]], int | None]:
        """The events after `position` once there are some; at the deadline none (or the
        BOOKMARK) and None: the watch ends."""
        state = self.state
        with state.lock:
            while not state.closed:
                fresh = [event for event in state.events
                         if int(event["object"]["metadata"]["resourceVersion"]) > position
                         and event["object"]["metadata"]["namespace"] == ns
                         and name in (None, event["object"]["metadata"]["name"])]
                position = state.version
                if fresh:
                    return fresh, position
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                state.changed.wait(remaining)
            if bookmarks and not state.closed:
                return [{"type": "BOOKMARK", "object": {
                    "kind": "ConfigMap", "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(state.version)}}}], None
            return [], None

    def _chunk(self, event: dict[str, Any]) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_GET(self) -> None:
        if self._apps("get") or self._pods() or self._configmap_collection():
            return
        self._route("get")

    def do_DELETE(self) -> None:
        self._route("delete")

    def do_POST(self) -> None:
        if self.path.split("?")[0] == "/apis/authentication.k8s.io/v1/tokenreviews":
            self._token_review()
            return
        self._route("create")

    def _token_review(self) -> None:
        """As the real API: authenticated only when the token is known and issued for one of
        the asked audiences (none asked: the API server's own); 403 when denied."""
        review = self._body()
        state = self.state
        with state.lock:
            state.requests.append(("create", self.path))
            if ("create", "tokenreviews") in state.deny:
                self._send(403, _status(
                    403, "Forbidden", 'tokenreviews.authentication.k8s.io is forbidden: User '
                    '"system:serviceaccount:tuner:tuner-sidecar" cannot create resource '
                    '"tokenreviews" in API group "authentication.k8s.io" at the cluster scope'))
                return
            spec = review.get("spec") or {}
            asked = spec.get("audiences") or state.api_audiences
            known = state.tokens.get(spec.get("token") or "")
            status: dict[str, Any] = {"authenticated": False}
            if known is None:
                status["error"] = "[invalid bearer token, square/go-jose: error in " \
                                  "cryptographic primitive]"
            elif not set(known[1]) & set(asked):
                status["error"] = (f"[invalid bearer token, token audiences {known[1]} is "
                                   f"invalid for the target audiences {asked}]")
            else:
                status = {"authenticated": True, "audiences": sorted(set(known[1]) & set(asked)),
                          "user": {"username": known[0], "groups": ["system:serviceaccounts"]}}
            self._send(201, {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                             "metadata": {}, "spec": spec, "status": status})

    def do_PUT(self) -> None:
        self._route("update")


@contextmanager
def kube_api(tmp_path: Path) -> Iterator[tuple[KubeState, Path]]:
    """Serve the API on 127.0.0.1 (a port the OS picks); yield the state and a kubeconfig."""
    state = KubeState()
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {
            "server": f"http://127.0.0.1:{server.server_address[1]}"}}],
        "users": [{"name": "tuner", "user": {"token": "test-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "tuner"}}]}))
    try:
        yield state, kubeconfig
    finally:
        with state.lock:  # open watches end now, not at their timeoutSeconds
            state.closed = True
            state.changed.notify_all()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
