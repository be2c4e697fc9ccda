"""The lab's ASGI upstream (served by uvicorn or hypercorn): reads the body, answers JSON."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]


async def app(scope: Scope, receive: Callable[[], Awaitable[Message]],
              send: Callable[[Message], Awaitable[None]]) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    n_bytes = 0
    more = True
    while more:
        message = await receive()
        n_bytes += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = json.dumps({"server": "asgi", "method": scope["method"], "path": scope["path"],
                       "bytes": n_bytes}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
