"""The one HTTP client to vLLM, behind a small interface: send a request, read raw chunks, close.

A keep-alive HTTP/1.1 client written for this hot path: one ``asyncio.Protocol`` per connection and
httptools' C response parser (the parser uvicorn uses on the other side). Why not a library:

- httpx 0.28 (tuned: no keep-alive cap) served 108 calls/s at 64 concurrent calls on this project's
  benchmark; py-spy showed 37% of the proxy in httpcore's pool asking every pooled connection whether
  it expired (a socket poll each) on every request.
- aiohttp 3.14 served 8,627 calls/s client-only and carried the proxy to about 2,250 calls/s, but a
  profile of the proxy at 64 concurrent calls still put 30% of its event-loop thread in aiohttp's
  request path (building a ``ClientRequest``, its auto headers, payload and stream reader objects).

This client does only what a reverse proxy needs: the request goes out in one write, the status and
headers come back as the byte pairs the relay forwards, body chunks are handed over as they arrive
(de-chunked, never decompressed; everything buffered is joined into one chunk per read), and a
connection read to the end of its response goes back to the pool. The relay sees only
``UpstreamResponse`` and the ``UpstreamError`` family.

Timeouts: connecting (``connect_timeout_s``) and silence (``read_timeout_s``: before the headers and
between body chunks). Backpressure: reading from vLLM pauses while more than 256 KiB wait for a slow
client. ``max_connections`` caps open connections; callers beyond it wait for one.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import cast

import httptools


class UpstreamError(Exception):
    """vLLM could not be reached or did not answer properly."""


class UpstreamConnectError(UpstreamError):
    """No connection could be made (refused, unknown host, connect timeout): the server is down."""


class UpstreamClosedError(UpstreamError):
    """The connection closed before any answer (for example a keep-alive connection vLLM dropped)."""


class UpstreamReadTimeout(UpstreamError):
    """vLLM sent nothing for longer than the read timeout."""


class UpstreamBrokenError(UpstreamError):
    """The answer was cut off or was not valid HTTP."""


_READ_HIGH_WATER = 256 * 1024  # bytes buffered for the relay before reading from vLLM pauses
_ONE_WRITE_LIMIT = 256 * 1024  # smaller bodies go out joined to the head, in one write
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where to connect, and the Host header to send."""

    key: str
    host: str
    port: int
    host_header: bytes
    tls: ssl.SSLContext | None


def _parse_origin(key: str) -> _Origin:
    """``http://host:port`` (or https) as an origin; ``UpstreamConnectError`` when unusable."""
    scheme, _, netloc = key.partition("://")
    scheme = scheme.lower()
    if scheme not in ("http", "https") or not netloc:
        raise UpstreamConnectError(f"not an http(s) URL: {key!r}")
    host, port = netloc, 443 if scheme == "https" else 80
    if netloc.startswith("["):  # an IPv6 literal
        end = netloc.find("]")
        host = netloc[1:end]
        if netloc[end + 1 : end + 2] == ":":
            port = int(netloc[end + 2 :])
    elif ":" in netloc:
        host, _, port_text = netloc.rpartition(":")
        port = int(port_text)
    tls = ssl.create_default_context() if scheme == "https" else None
    return _Origin(key, host, port, netloc.encode("idna"), tls)


Sink = Callable[[bytes], bool]
"""Takes one body chunk inside the connection's read callback; returns False when its reader is
behind (reading from vLLM then pauses until the pump's ``drain`` returns)."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; it carries one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: _Origin) -> None:
        self.loop = loop
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.active = False
        self.last_read = 0.0  # loop time of the last bytes from vLLM (the read timeout's clock)
        self._timer: asyncio.TimerHandle | None = None
        self.reading_paused = False  # the transport's state: it outlives an exchange
        self._parser = httptools.HttpResponseParser(self)
        self._begin(b"")

    def _begin(self, method: bytes) -> None:
        """Forget the previous exchange; the next response answers ``method``."""
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.message_done = False
        self.reusable = False
        self.close_delimited = False
        self.head_only = method == b"HEAD"
        self.error: UpstreamError | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.waiter: asyncio.Future[None] | None = None
        self.informational = False
        self.sink: Sink | None = None
        self.sink_blocked = False
        self.sink_error: BaseException | None = None
        self.resume()  # paused for a reader that left after the last answer had all arrived

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's does not subclass asyncio's
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.last_read = self.loop.time()
        if not self.active or self.message_done:  # bytes nobody asked for: the stream is out of step
            self.reusable = False
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamBrokenError(f"the upstream's answer is not valid HTTP: {exc}"))
            self.close()
        if self.sink is not None and self.chunks:
            self.to_sink(self.sink)

    def to_sink(self, sink: Sink) -> None:
        """Everything this read brought, in one call: under load one read carries several events,
        and one write of them all costs the client's socket one system call instead of several."""
        try:
            more = sink(self.take())
        except Exception as exc:  # the relay's own fault: the pump re-raises it in the relay
            self.sink = None
            self.sink_error = exc
            self.reusable = False
            self.close()
            self._wake()
            return
        if not more and not self.sink_blocked:
            self.sink_blocked = True
            self._pause()
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.active or self.message_done:
            return
        if self.headers_done and self.close_delimited:
            self.message_done = True  # a body without a length ends with the connection
            self._wake()
        elif not self.headers_done:
            self._fail(UpstreamClosedError("the upstream closed the connection before answering"))
        else:
            self._fail(UpstreamBrokenError("the upstream closed the connection mid-response"))

    # ---- httptools callbacks ----

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (103 Early Hints ...): wait for the real one
            self.headers = []
            self.informational = True
            return
        self.status = status
        self.headers_done = True
        framed = False
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"content-length" or (lower == b"transfer-encoding" and b"chunked" in value.lower()):
                framed = True
                break
        self.close_delimited = not framed and status not in (204, 304)
        if self.head_only:
            self.message_done = True  # the parser would wait for a body a HEAD answer never has
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        if self.sink is not None:
            return  # data_received hands the whole read to the sink
        self.buffered += len(body)
        if self.buffered > _READ_HIGH_WATER:
            self._pause()
        self._wake()

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        self.reusable = not self.head_only and self._parser.should_keep_alive()
        self.message_done = True
        self._wake()

    # ---- used by the client and the response ----

    def start(self, method: bytes, request: bytes, body: bytes) -> None:
        self._begin(method)
        self.active = True
        self.last_read = self.loop.time()
        assert self.transport is not None
        if len(body) <= _ONE_WRITE_LIMIT:
            self.transport.write(request + body)
        else:
            self.transport.write(request)
            self.transport.write(body)

    def take(self) -> bytes:
        """Everything buffered, as one chunk."""
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        self.buffered = 0
        self.resume()
        return data

    def resume(self) -> None:
        if self.reading_paused and not self.sink_blocked and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def _pause(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    async def ended(self, timeout_s: float | None) -> bool:
        """True once the response has ended; its error, if it failed; else waits for news (False)."""
        if self.message_done:
            return True
        if self.error is not None:
            raise self.error
        await self.wait(timeout_s)
        return False

    async def wait(self, timeout_s: float | None) -> None:
        """Until the parser or the connection has news, or ``timeout_s`` of silence from vLLM
        (then ``UpstreamReadTimeout``, and the connection is closed).

        The timer is checked lazily against ``last_read``: a pumped stream waits once for its whole
        body, and bytes arriving meanwhile must keep it alive without waking anyone.
        """
        waiter = self.loop.create_future()
        self.waiter = waiter
        if timeout_s is not None:
            self._timer = self.loop.call_later(timeout_s, self._check_silence, waiter, timeout_s)
        try:
            await waiter
        except UpstreamReadTimeout:
            self.close()  # a silent connection is never reused
            raise
        finally:
            self.waiter = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _check_silence(self, waiter: asyncio.Future[None], timeout_s: float) -> None:
        if waiter.done():
            return
        silent = self.loop.time() - self.last_read
        if silent >= timeout_s and not self.reading_paused:  # (paused by us, silence is expected)
            waiter.set_exception(UpstreamReadTimeout("the upstream sent nothing within the read timeout"))
            return
        again = timeout_s if self.reading_paused else timeout_s - silent
        self._timer = self.loop.call_later(again, self._check_silence, waiter, timeout_s)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self._wake()


class UpstreamResponse:
    """A response whose status and headers have arrived; the body is read with ``iter_raw``."""

    def __init__(self, client: UpstreamClient, connection: _Connection) -> None:
        self._client = client
        self._connection = connection
        self._released = False
        self.status_code = connection.status
        self.raw_headers = connection.headers
        self.content_type = ""
        for name, value in self.raw_headers:
            if name.lower() == b"content-type":
                self.content_type = value.decode("latin-1")
                break

    async def iter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives (de-chunked, never decompressed)."""
        connection = self._connection
        while True:
            if connection.chunks:
                yield connection.take()
            elif await connection.ended(self._client.read_timeout_s):
                return

    async def pump(self, sink: Sink, drain: Callable[[], Awaitable[None]]) -> None:
        """Hand every body chunk to ``sink`` as it arrives, until the body ends.

        For streams: ``sink`` runs inside the connection's read callback, so a chunk reaches the
        client without a task switch, a future or a timer of its own. When ``sink`` says its reader
        is behind, reading from vLLM pauses until ``drain()`` returns. Errors are those of
        ``iter_raw``; an exception raised by ``sink`` is raised here.
        """
        connection = self._connection
        connection.sink = sink
        if connection.chunks:  # what came with the headers
            connection.to_sink(sink)
        try:
            while True:
                if connection.sink_error is not None:
                    raise connection.sink_error
                if connection.sink_blocked:
                    await drain()
                    connection.sink_blocked = False
                    connection.resume()
                elif await connection.ended(self._client.read_timeout_s):
                    return
        finally:
            connection.sink = None

    async def aclose(self) -> None:
        """Give the connection back when the response was read to its end, else close it."""
        if not self._released:
            self._released = True
            self._client.release(self._connection)


class UpstreamClient:
    """A pooled keep-alive client to vLLM (one per proxy process, made inside the event loop)."""

    def __init__(
        self,
        *,
        connect_timeout_s: float | None,
        read_timeout_s: float | None,
        max_connections: int | None,
        keepalive_s: float,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections
        self.keepalive_s = keepalive_s
        self._loop = asyncio.get_running_loop()
        self._origins: dict[str, _Origin] = {}
        self._idle: dict[str, list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._connecting = 0  # connections being made: they count against the cap already

    @property
    def open_connections(self) -> int:
        return len(self._open)

    async def send(
        self,
        method: str,
        url: str,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
        *,
        timeout_s: float | None = None,
    ) -> UpstreamResponse:
        """Send one request; returns once the status line and headers are in.

        ``timeout_s`` bounds the whole wait for the headers (health probes); otherwise only the
        connect and read timeouts apply.
        """
        if timeout_s is None:
            return await self._send(method, url, headers, body)
        try:
            async with asyncio.timeout(timeout_s):
                return await self._send(method, url, headers, body)
        except TimeoutError:
            raise UpstreamReadTimeout(f"no answer within {timeout_s:g} s") from None

    async def _send(
        self, method: str, url: str, headers: Iterable[tuple[bytes, bytes]], body: bytes
    ) -> UpstreamResponse:
        scheme_end = url.find("://")
        path_start = url.find("/", scheme_end + 3) if scheme_end >= 0 else -1
        key = url if path_start < 0 else url[:path_start]
        target = b"/" if path_start < 0 else url[path_start:].encode("latin-1")
        origin = self._origins.get(key)
        if origin is None:
            try:
                origin = _parse_origin(key)
            except ValueError:
                raise UpstreamConnectError(f"not a usable URL: {key!r}") from None
            self._origins[key] = origin
        method_bytes = method.encode("ascii")
        lines = [method_bytes, b" ", target, b" HTTP/1.1\r\nhost: ", origin.host_header, b"\r\n"]
        for name, value in headers:
            if name != b"content-length":
                lines += (name, b": ", value, b"\r\n")
        if body or method_bytes in _BODY_METHODS:
            lines += (b"content-length: ", str(len(body)).encode(), b"\r\n")
        lines.append(b"\r\n")
        connection = await self._acquire(origin)
        try:
            connection.start(method_bytes, b"".join(lines), body)
            while not connection.headers_done:
                if connection.error is not None:
                    raise connection.error
                await connection.wait(self.read_timeout_s)
        except BaseException:
            connection.close()
            self.release(connection)
            raise
        return UpstreamResponse(self, connection)

    async def _acquire(self, origin: _Origin) -> _Connection:
        """An idle connection to ``origin``, or a new one (waiting for a slot under a cap)."""
        idle = self._idle.get(origin.key)
        now = self._loop.time()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to have been dropped
            if not connection.closed and now - connection.idle_since < self.keepalive_s:
                return connection
            self._forget(connection)
        while self.max_connections is not None and len(self._open) + self._connecting >= self.max_connections:
            if self._close_one_idle():  # an idle connection to another origin makes room
                break
            waiter = self._loop.create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_slot_waiter()  # pass the slot this caller was given to the next
                raise
            if self._idle.get(origin.key):
                return await self._acquire(origin)
        return await self._connect(origin)

    async def _connect(self, origin: _Origin) -> _Connection:
        loop = self._loop
        self._connecting += 1
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop, origin),
                    origin.host,
                    origin.port,
                    ssl=origin.tls,
                    server_hostname=origin.host if origin.tls else None,
                )
        except TimeoutError:
            raise UpstreamConnectError(
                f"no connection to {origin.key} within {self.connect_timeout_s:g} s"
            ) from None
        except (OSError, ValueError) as exc:
            raise UpstreamConnectError(f"{type(exc).__name__}: {exc}") from None
        finally:
            self._connecting -= 1
            if self.max_connections is not None:
                self._wake_slot_waiter()  # a failed connect frees its slot (a made one is in _open)
        self._open.add(connection)
        return connection

    def release(self, connection: _Connection) -> None:
        """After an exchange: back to the pool when it ended cleanly and may be reused, else closed."""
        connection.active = False
        if connection.closed or not (connection.message_done and connection.reusable):
            connection.close()
            self._forget(connection)
            return
        connection.idle_since = self._loop.time()
        self._idle.setdefault(connection.origin.key, []).append(connection)
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(self.keepalive_s, self._sweep)
        self._wake_slot_waiter()

    def _forget(self, connection: _Connection) -> None:
        connection.close()
        if connection in self._open:
            self._open.discard(connection)
            self._wake_slot_waiter()

    def _wake_slot_waiter(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _close_one_idle(self) -> bool:
        """Close the oldest idle connection, if there is one (under the cap, to make room)."""
        for idle in self._idle.values():
            if idle:
                self._forget(idle.pop(0))
                return True
        return False

    def _sweep(self) -> None:
        """Close connections idle for the keep-alive time (before vLLM drops them under a request)."""
        self._sweeper = None
        limit = self._loop.time() - self.keepalive_s
        remaining = False
        for idle in self._idle.values():
            while idle and (idle[0].closed or idle[0].idle_since <= limit):
                self._forget(idle.pop(0))
            remaining = remaining or bool(idle)
        if remaining:
            self._sweeper = self._loop.call_later(self.keepalive_s / 2, self._sweep)

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for connection in list(self._open):
            self._forget(connection)
        self._idle.clear()
