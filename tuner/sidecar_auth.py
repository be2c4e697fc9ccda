"""Who may call the sidecar's /probe and the mark-and-count part of /status.

    --caller-service-account NS/NAME   in a cluster: the caller's bearer token is sent to the
                                       API server's TokenReview; it must be a token of that
                                       ServiceAccount (the tuner Job's), for `--token-audience`
    --token-file PATH                  a shared secret: the bearer token must equal the file's
                                       content (read again when the file changes)
    --allow-unauthenticated            anyone who can connect; only on a loopback --listen

Design decision: TokenReview over a per-experiment secret. The Job already has an identity
(its ServiceAccount), and the kubelet already gives it short-lived, rotated tokens bound to
its pod; a secret would have to be created, mounted into the Job and every sidecar, and
rotated by us. The token the Job sends is a projected one with its own audience
(`tuner-sidecar`), never its API token: the sidecar (or anyone who reads the plain-HTTP pod
network) cannot replay it against the API server, which accepts only its own audience.
The cost: the sidecar's ServiceAccount may create TokenReviews (a cluster-scoped verb, so a
ClusterRoleBinding), and a first request with a new token waits for one API call; answers
are cached (a bounded cache, a minute for a good token, 10 s for a bad one) and at most two
reviews run at a time, so a flood of made-up tokens cannot turn into a flood on the API.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tuner.errors import KubeError

#: how the sidecar answers who is not allowed; the realm names it in WWW-Authenticate
CHALLENGE = ("WWW-Authenticate", 'Bearer realm="tuner-sidecar"')


@dataclass(frozen=True)
class Verdict:
    """May this caller go on? If not: the HTTP status (401, 403, 503) and why."""

    status: int = 200
    reason: str = ""

    @property
    def is_allowed(self) -> bool:
        return self.status == 200


ALLOWED = Verdict()


@dataclass(frozen=True)
class Review:
    """What the API server's TokenReview said about a token."""

    authenticated: bool
    username: str = ""
    error: str = ""


class CallerCheck(Protocol):
    def check(self, authorization: str | None) -> Verdict:
        """The verdict on a request's Authorization header (None: there was none)."""

    def describe(self) -> str:
        """Who may call, for the startup line and /status."""


def bearer_token(authorization: str | None) -> str | None:
    """The token of `Authorization: Bearer TOKEN`, or None (pure)."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token and " " not in token else None


def _missing(what: str) -> Verdict:
    return Verdict(401, f"send {what} as `Authorization: Bearer TOKEN`")


class AnyCaller:
    """--allow-unauthenticated: the lab, where the sidecar listens on loopback only."""

    def check(self, authorization: str | None) -> Verdict:
        return ALLOWED

    def describe(self) -> str:
        return "anyone who can connect (--allow-unauthenticated, loopback only)"


class SharedToken:
    """--token-file: the bearer token must equal the file's content."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._seen: tuple[float, bytes] | None = None

    def _expected(self) -> bytes:
        stat = self.path.stat()
        with self._lock:
            if self._seen is None or self._seen[0] != stat.st_mtime:
                self._seen = (stat.st_mtime, self.path.read_bytes().strip())
            return self._seen[1]

    def check(self, authorization: str | None) -> Verdict:
        token = bearer_token(authorization)
        if token is None:
            return _missing(f"the token of {self.path}")
        try:
            expected = self._expected()
        except OSError as exc:
            return Verdict(503, f"the sidecar cannot read its --token-file {self.path}: "
                                f"{exc.strerror or exc}")
        if not expected or not hmac.compare_digest(token.encode(), expected):
            return Verdict(401, f"the token is not the one in the sidecar's --token-file "
                                f"{self.path}")
        return ALLOWED

    def describe(self) -> str:
        return f"callers with the token of {self.path}"


class ServiceAccountCaller:
    """--caller-service-account: TokenReview, cached, at most `max_reviews` at a time."""

    #: a good token is believed this long: the kubelet rotates projected tokens after 80 %
    #: of their life (at least 8 of 10 minutes), and a deleted Job pod's token stays
    #: usable here at most this long
    GOOD_FOR_S = 60.0
    #: a refused token is refused without asking again this long (floods of one bad token)
    BAD_FOR_S = 10.0
    MAX_CACHED = 64
    #: a request waits this long for a review slot, then gets 503
    WAIT_FOR_SLOT_S = 10.0

    def __init__(self, review: Callable[[str], Review], *, namespace: str, name: str,
                 audience: str, max_reviews: int = 2) -> None:
        self.review = review
        self.username = f"system:serviceaccount:{namespace}:{name}"
        self.audience = audience
        self._slots = threading.BoundedSemaphore(max_reviews)
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, tuple[float, Review]] = OrderedDict()

    def _cached(self, key: bytes) -> Review | None:
        with self._lock:
            found = self._cache.get(key)
            if found is None or found[0] < time.monotonic():
                return None
            self._cache.move_to_end(key)
            return found[1]

    def _remember(self, key: bytes, review: Review) -> None:
        good = review.authenticated and review.username == self.username
        with self._lock:
            self._cache[key] = (time.monotonic() + (self.GOOD_FOR_S if good
                                                    else self.BAD_FOR_S), review)
            self._cache.move_to_end(key)
            while len(self._cache) > self.MAX_CACHED:
                self._cache.popitem(last=False)

    def check(self, authorization: str | None) -> Verdict:
        token = bearer_token(authorization)
        if token is None:
            return _missing(f"a token of ServiceAccount {self.username} (audience "
                            f"{self.audience or 'the API server'})")
        key = hashlib.sha256(token.encode()).digest()  # the cache keeps no token
        review = self._cached(key)
        if review is None:
            if not self._slots.acquire(timeout=self.WAIT_FOR_SLOT_S):
                return Verdict(503, "too many token reviews under way; try again")
            try:
                review = self._cached(key)  # another request may have asked meanwhile
                if review is None:
                    try:
                        review = self.review(token)
                    except KubeError as exc:
                        return Verdict(503, f"the sidecar could not review the token: {exc}")
                    self._remember(key, review)
            finally:
                self._slots.release()
        if not review.authenticated:
            return Verdict(401, f"the API server did not accept the token for audience "
                                f"{self.audience or '(the API server)'}: "
                                f"{review.error or 'not authenticated'}")
        if review.username != self.username:
            return Verdict(403, f"the token is {review.username}'s; only {self.username} "
                                "(the tuner Job) may call this")
        return ALLOWED

    def describe(self) -> str:
        return (f"ServiceAccount {self.username} (TokenReview, audience "
                f"{self.audience or 'the API server'})")
