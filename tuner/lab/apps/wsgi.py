"""The lab's WSGI upstream (served by gunicorn gthread): reads the body, answers JSON."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    n_bytes = len(environ["wsgi.input"].read(length)) if length else 0
    body = json.dumps({"server": "wsgi", "method": environ["REQUEST_METHOD"],
                       "path": environ["PATH_INFO"], "bytes": n_bytes}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
