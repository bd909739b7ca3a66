"""A scripted upstream on a raw socket, in a thread of its own: for what no HTTP server does on demand
(read a POST and drop the connection, answer with exact bytes, stream until the reader is gone).

The handler is a coroutine given the connection's reader and writer; the upstream counts
connections and keeps every request it read, so a test can say "received exactly once".
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "RawUpstream"], Awaitable[None]]


@dataclass
class RawUpstream:
    handler: Handler
    url: str = ""
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    closed: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.tasks.discard(task)
            self.closed.release()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """One request, kept in ``requests``; b"" when the connection ended first."""
        request = await read_request(reader)
        if request:
            self.requests.append(request)
        return request


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request (head and Content-Length body) as sent; b"" when the connection ended first."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return b""
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


@contextmanager
def raw_upstream(handler: Handler) -> Iterator[RawUpstream]:
    """Serve ``handler`` on 127.0.0.1 from a thread; stop it afterwards."""
    upstream = RawUpstream(handler)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: asyncio.Event | None = None

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
        upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        ready.set()
        await stop.wait()
        server.close()
        for task in list(upstream.tasks):
            task.cancel()
        await asyncio.gather(*upstream.tasks, return_exceptions=True)
        await server.wait_closed()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10), "the raw upstream did not start"
    try:
        yield upstream
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


OK_JSON = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"


def ok_json(body: bytes) -> bytes:
    return OK_JSON % (len(body), body)
