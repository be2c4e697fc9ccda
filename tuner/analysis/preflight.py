"""Before the first trial: does the upstream serve the experiment's request, and keep the
connection after it? (pure: the requests are sent by tuner.lab.preflight)

The race needs an idle connection the upstream closes while the proxy still holds it: the
upstream must answer the load's request and then keep the connection open. Two ways an
experiment measures nothing at all, seen with a real server:
- the upstream refuses the request: embedded Tomcat 11 answered every request through the
  lab's nginx 400, because nginx sent its upstream block's name, `Host: tuner_upstream`, and
  `_` is not valid in a host name;
- the upstream closes the connection after answering (Tomcat after that 400; some servers
  after any error status; a server with keep-alive off): nothing is left idle to race.
The trials were then judged as data ("UNSAFE", "inconclusive") from 330 refused requests.

So one request goes straight to the upstream (only there can the tool see whether the
upstream keeps the connection: a proxy keeps the client's connection either way) and one
through the proxy (the Host the proxy sends, the status the load will get), per method of
the mix. An answer the upstream serves on a connection it keeps counts, whatever its status
class: a 404 or 405 of an app leaves the connection idle exactly as a 200 does
(tuner.analysis.outcomes.is_served_status).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tuner.analysis.outcomes import REFUSED_STATUSES, is_served_status

#: the response headers that tell how the server treats the connection, shown in every
#: message: whether it closes (Connection), for how long it keeps it (Keep-Alive), and who
#: answered (Server: the upstream, or the proxy itself)
SHOWN_HEADERS = ("Connection", "Keep-Alive", "Server")


@dataclass(frozen=True)
class Answer:
    """What one preflight request got back."""

    #: the HTTP status; None: no HTTP answer at all (see `error`)
    status: int | None
    reason: str = ""
    #: the SHOWN_HEADERS the answer carried, by their canonical names
    headers: Mapping[str, str] = field(default_factory=dict)
    #: how the server ended the connection after answering ("Connection: close", "an
    #: HTTP/1.0 answer", "closed it 3 ms after answering"); None: it kept it open
    closed_by: str | None = None
    #: why there was no answer (reset, timeout, refused), when `status` is None
    error: str | None = None

    @property
    def is_served(self) -> bool:
        return self.status is not None and is_served_status(self.status)

    def describe(self) -> str:
        """"404 Not Found, kept the connection (Keep-Alive: timeout=20)" and the like."""
        if self.status is None:
            return f"no HTTP answer ({self.error or 'the connection ended'})"
        status = f"{self.status} {self.reason}".strip()
        shown = "; ".join(f"{name}: {self.headers[name]}" for name in SHOWN_HEADERS
                          if name in self.headers) or "no Connection, Keep-Alive or Server header"
        kept = ("kept the connection" if self.closed_by is None
                else f"then CLOSED the connection ({self.closed_by})")
        return f"{status}, {kept} [{shown}]"


@dataclass(frozen=True)
class MethodCheck:
    """The two answers to one method of the mix."""

    method: str
    direct: Answer
    proxied: Answer


@dataclass(frozen=True)
class PreflightResult:
    #: the lines that show what each request got, the request first
    lines: tuple[str, ...]
    #: per method that failed: what is wrong and what to do (empty: every method is served
    #: on a kept connection, straight and through the proxy)
    advice: tuple[str, ...] = ()
    #: the request, as "POST / with Host: 127.0.0.1:8080"
    request: str = ""

    @property
    def is_ok(self) -> bool:
        return not self.advice

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def problem(self) -> str | None:
        """Why an experiment cannot measure anything, with what each request got and what
        to do (None when ok)."""
        if self.is_ok:
            return None
        return (f"the upstream does not serve the experiment's request ({self.request}) on a "
                "connection it keeps, so no trial could measure the keep-alive race; nothing "
                "was run.\n" + "\n".join(self.lines[1:]) + "\n" + "\n".join(self.advice))


def judge_preflight(checks: Sequence[MethodCheck], *, path: str, host: str,
                    upstream_url: str, proxy: str, proxy_url: str) -> PreflightResult:
    """Refuse, with the statuses, the headers and what to do, unless the upstream served
    every method straight and through the proxy, and kept the connection open after it."""
    assert checks, "a method mix has at least one method"
    lines = [f"preflight: {', '.join(c.method for c in checks)} {path} with Host: {host}"]
    for check in checks:
        lines += [f"  {check.method} straight to the upstream {upstream_url}: "
                  f"{check.direct.describe()}",
                  f"  {check.method} through {proxy} {proxy_url}: {_status(check.proxied)}"]
    request = f"{'/'.join(c.method for c in checks)} {path} with Host: {host}"
    by_problem: dict[str, list[str]] = {}  # methods that failed alike share one line
    for check in checks:
        problem = _problem(check, path=path, host=host, proxy=proxy)
        if problem:
            by_problem.setdefault(problem, []).append(check.method)
    advice = tuple(f"{', '.join(methods)}: {problem}" for problem, methods in by_problem.items())
    if advice:
        return PreflightResult(tuple(lines), advice, request)
    served = sorted({c.direct.status for c in checks if c.direct.status is not None} |
                    {c.proxied.status for c in checks if c.proxied.status is not None})
    if any(not 200 <= status < 300 for status in served):
        lines.append(f"  served: {', '.join(str(s) for s in served)} on kept connections; a "
                     "non-2xx answer the upstream keeps its connection after exercises it as "
                     "a 200 does, and counts as served")
    return PreflightResult(tuple(lines), (), request)


def _status(answer: Answer) -> str:
    """An answer through the proxy: its status and who answered; the connection is the
    proxy's, which keeps it whatever the upstream did, so it shows nothing of the upstream."""
    if answer.status is None:
        return f"no HTTP answer ({answer.error or 'the connection ended'})"
    server = f" [Server: {answer.headers['Server']}]" if "Server" in answer.headers else ""
    return f"{answer.status} {answer.reason}".strip() + server


def _problem(check: MethodCheck, *, path: str, host: str, proxy: str) -> str:
    """What is wrong with one method's answers, and what to do; "" if nothing."""
    method, direct, proxied = check.method, check.direct, check.proxied
    if direct.status is None:
        return (f"the upstream gave no HTTP answer ({direct.error}): check that it "
                "speaks HTTP/1.1 on its port, and its log")
    if not direct.is_served:
        return _refusal_advice(direct.status, method=method, path=path, host=host)
    if direct.closed_by is not None:
        how = ("after a 2xx: its keep-alive is off; turn HTTP keep-alive on in the server "
               "(the experiment sets its idle timeout)" if 200 <= direct.status < 300 else
               f"after a {direct.status}: some servers close after an error status; give a "
               "--path (and --methods) it answers with 2xx, such as --path /healthz "
               "--methods GET")
        return (f"the upstream answered {direct.status} and closed the connection "
                f"({direct.closed_by}): no idle connection is left for the proxy to reuse, so "
                f"there is no race to find. It closes {how}")
    if proxied.status is None:
        return (f"{proxy} gave no HTTP answer ({proxied.error}) although the "
                f"upstream answered {direct.status} straight: see {proxy}'s log")
    if not proxied.is_served:
        return (f"through {proxy} the answer was {proxied.status} although the "
                f"upstream answered {direct.status} straight with the same Host: the "
                f"request {proxy} sends differs from the direct one; see {proxy}'s log")
    return ""


def _refusal_advice(status: int, *, method: str, path: str, host: str) -> str:
    if status in REFUSED_STATUSES:
        why = f"the upstream refused the request itself ({status})"
        if status in (400, 421):
            hint = (f" (`_` is not valid in a host name, and strict servers such as Tomcat "
                    f"refuse Host: {host})" if "_" in host else "")
            return (f"{why}: a 400 or 421 often means the server refused the Host header"
                    f"{hint}; give --host with a "
                    "name it accepts (the default is the upstream's own 127.0.0.1:PORT; or the "
                    "virtual host your app expects), or --path and --methods of a request it "
                    "serves, such as --path /healthz --methods GET")
        return (f"{why}: give --path and --methods of a request it serves, such as --path "
                "/healthz --methods GET")
    if status >= 500:
        return (f"the upstream failed on {method} {path} ({status}): give --path and "
                "--methods of a request it serves, such as --path /healthz --methods GET, and "
                "see its log")
    return (f"the upstream answered {status}, which does not serve the request: give --path "
            "and --methods of a request it serves, such as --path /healthz --methods GET")
