"""A real HTTP/1.1 server that closes idle keep-alive connections by a periodic sweep.

    python tests/sweep_server.py PORT IDLE_MS SWEEP_MS

Every SWEEP_MS it closes, all at once, every connection idle longer than IDLE_MS (idle: no
request in progress since its last response ended). So a connection closes anywhere from
IDLE_MS to IDLE_MS + SWEEP_MS after its response, depending on when it went idle: the rule
of gunicorn's gthread worker (a one-second sweep) with a period of our choosing. The sweep
timer starts with the server, not with any connection. Answers 200 to every request.
"""

from __future__ import annotations

import asyncio
import sys
import time


class Server:
    def __init__(self, idle_s: float, sweep_s: float) -> None:
        self.idle_s = idle_s
        self.sweep_s = sweep_s
        #: writer -> monotonic end of its last response (None: a request is in progress)
        self.idle_since: dict[asyncio.StreamWriter, float | None] = {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.idle_since[writer] = time.monotonic()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.idle_since[writer] = None
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                if length:
                    await reader.readexactly(length)
                body = b"ok\n"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                self.idle_since[writer] = time.monotonic()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self.idle_since.pop(writer, None)
            writer.close()

    async def sweep(self) -> None:
        next_at = time.monotonic() + self.sweep_s
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += self.sweep_s
            now = time.monotonic()
            for writer, since in list(self.idle_since.items()):
                if since is not None and now - since > self.idle_s:
                    self.idle_since.pop(writer, None)
                    writer.close()


async def main(port: int, idle_ms: int, sweep_ms: int) -> None:
    server = Server(idle_ms / 1000, sweep_ms / 1000)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", port, backlog=1024)
    sweeping = asyncio.create_task(server.sweep())
    async with listener:
        await listener.serve_forever()
    sweeping.cancel()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
