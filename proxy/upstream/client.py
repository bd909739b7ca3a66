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
``UpstreamResponse`` and the ``UpstreamError`` family (``errors``). Each connection is the state
machine of ``connection``.

Re-sending: a request goes out once, except on a reused keep-alive connection that the server
closed before the request can have been processed (``UpstreamStaleConnection``), and then only when
the caller allows it (``resend_if_stale``), once, on a new connection to the same upstream.

Timeouts: connecting (``connect_timeout_s``) and silence (``read_timeout_s``: before the headers and
between body chunks). Backpressure: reading from vLLM pauses while more than 256 KiB wait for a slow
client. ``max_connections`` caps open connections; callers beyond it wait for one, first come first
served (a released connection or a freed slot goes to the longest waiter, never to a newcomer).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, cast

from tokentrail.proxy.upstream.connection import STALE_WINDOW_S, Connection, Origin, Sink
from tokentrail.proxy.upstream.errors import (
    UpstreamBrokenError,
    UpstreamClosedError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamReadTimeout,
    UpstreamStaleConnection,
)

_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
# Connect failures caused by this machine, not by the upstream (which must not be marked down for them).
_LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL})


PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def ignored_proxy_variables(environ: Mapping[str, str]) -> list[str]:
    """The HTTP(S)_PROXY variables that are set: this client never uses them (vLLM is reached
    directly, as nginx's ``proxy_pass`` does), which the proxy says once at startup."""
    return [name for name in PROXY_VARIABLES if environ.get(name)]


def parse_origin(key: str) -> Origin:
    """``http://host:port`` (or https) as an origin; ``UpstreamConnectError`` when unusable."""
    scheme, _, netloc = key.partition("://")
    scheme = scheme.lower()
    if scheme not in ("http", "https") or not netloc:
        raise UpstreamConnectError(f"not an http(s) URL: {key!r}")
    if "@" in netloc:
        raise UpstreamConnectError(f"credentials in an upstream URL are not supported: {key!r}")
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
    return Origin(key, host, port, netloc.encode("idna"), tls)


class UpstreamResponse:
    """A response whose status and headers have arrived; the body is read with ``iter_raw``."""

    def __init__(self, client: UpstreamClient, connection: Connection) -> None:
        self._client = client
        self._connection = connection
        self._released = False
        self.status_code = connection.status
        self.raw_headers = connection.headers
        self.trailers = connection.trailers  # (filled when a chunked body ends; never relayed)
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
        stale_window_s: float = STALE_WINDOW_S,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections
        self.keepalive_s = keepalive_s
        self.stale_window_s = stale_window_s
        self._loop = asyncio.get_running_loop()
        self._origins: dict[str, Origin] = {}
        self._idle: dict[str, list[Connection]] = {}
        self._open: set[Connection] = set()
        # Callers waiting under the cap, oldest first; each is handed a connection to its origin or,
        # as None, a slot reserved for it (counted in _connecting) to open one.
        self._waiters: collections.deque[tuple[str, asyncio.Future[Connection | None]]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._connecting = 0  # connections being made (or slots reserved): they count against the cap

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
        resend_if_stale: bool = True,
    ) -> UpstreamResponse:
        """Send one request; returns once the status line and headers are in.

        ``timeout_s`` bounds the whole wait for the headers (health probes); otherwise only the
        connect and read timeouts apply. ``resend_if_stale``: send it once more, on a new
        connection, when a reused one turns out stale (``UpstreamStaleConnection``); callers pass
        False for requests that are not idempotent and were not built to be re-sent.
        """
        if timeout_s is None:
            return await self._send(method, url, headers, body, resend_if_stale)
        try:
            async with asyncio.timeout(timeout_s):
                return await self._send(method, url, headers, body, resend_if_stale)
        except TimeoutError:
            raise UpstreamReadTimeout(f"no answer within {timeout_s:g} s") from None

    async def _send(
        self,
        method: str,
        url: str,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
        resend_if_stale: bool,
    ) -> UpstreamResponse:
        scheme_end = url.find("://")
        path_start = url.find("/", scheme_end + 3) if scheme_end >= 0 else -1
        key = url if path_start < 0 else url[:path_start]
        target = b"/" if path_start < 0 else url[path_start:].encode("latin-1")
        origin = self._origins.get(key)
        if origin is None:
            try:
                origin = parse_origin(key)
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
        request = b"".join(lines)
        try:
            return await self._exchange(origin, method_bytes, request, body)
        except UpstreamStaleConnection:
            if not resend_if_stale:
                raise
        return await self._exchange(origin, method_bytes, request, body, fresh=True)

    async def _exchange(
        self, origin: Origin, method: bytes, request: bytes, body: bytes, *, fresh: bool = False
    ) -> UpstreamResponse:
        """One request on one connection, until its head is in."""
        connection = await self._acquire(origin, fresh=fresh)
        try:
            connection.start(method, request, body)
            while not connection.headers_done:
                if connection.error is not None:
                    raise connection.error
                await connection.wait(self.read_timeout_s)
        except BaseException:
            connection.close()
            self.release(connection)
            raise
        return UpstreamResponse(self, connection)

    async def _acquire(self, origin: Origin, *, fresh: bool = False) -> Connection:
        """An idle connection to ``origin`` (unless ``fresh``), or a new one (waiting for a turn
        under a cap)."""
        idle = None if fresh else self._idle.get(origin.key)
        now = self._loop.time()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to have been dropped
            if not connection.closed and now - connection.idle_since < self.keepalive_s:
                return connection
            self._forget(connection)
        if self._at_cap() and not self._close_one_idle():  # (an idle one to another origin makes room)
            handed = await self._wait_turn(origin)
            if handed is not None and not fresh:
                return handed
            if handed is not None:  # a kept-alive connection, where a new one was asked for
                self._forget(handed)
                return await self._acquire(origin, fresh=True)
            return await self._connect(origin, reserved=True)
        return await self._connect(origin)

    def _at_cap(self) -> bool:
        cap = self.max_connections
        return cap is not None and len(self._open) + self._connecting >= cap

    async def _wait_turn(self, origin: Origin) -> Connection | None:
        """Queue behind the callers already waiting; a connection handed over, or None for a slot."""
        turn: asyncio.Future[Connection | None] = self._loop.create_future()
        entry = (origin.key, turn)
        self._waiters.append(entry)
        try:
            return await turn
        except asyncio.CancelledError:
            if entry in self._waiters:
                self._waiters.remove(entry)
            elif turn.done() and not turn.cancelled():  # given a turn as it was cancelled: pass it on
                handed = turn.result()
                if handed is None:
                    self._connecting -= 1
                    self._grant_slots()
                else:
                    self.release(handed)
            raise

    async def _connect(self, origin: Origin, *, reserved: bool = False) -> Connection:
        """A new connection (``reserved``: its slot under the cap was counted for it already)."""
        loop = self._loop
        if not reserved:
            self._connecting += 1
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, made = await self._create_connection(
                    lambda: Connection(loop, origin, self.stale_window_s),
                    origin.host,
                    origin.port,
                    ssl=origin.tls,
                    server_hostname=origin.host if origin.tls else None,
                )
        except TimeoutError:
            raise UpstreamConnectError(
                f"no connection to {origin.key} within {self.connect_timeout_s:g} s"
            ) from None
        except OSError as exc:
            local = exc.errno in _LOCAL_ERRNOS
            raise UpstreamConnectError(f"{type(exc).__name__}: {exc}", local=local) from None
        except ValueError as exc:
            raise UpstreamConnectError(f"{type(exc).__name__}: {exc}") from None
        else:
            connection = cast(Connection, made)
            self._open.add(connection)
        finally:
            self._connecting -= 1
            self._grant_slots()  # a failed connect frees its slot (a made one is in _open)
        return connection

    async def _create_connection(self, factory: Callable[[], Connection], *args: Any, **kwargs: Any) -> Any:
        """The event loop's ``create_connection`` (a seam: tests make it fail like the OS can)."""
        return await self._loop.create_connection(factory, *args, **kwargs)

    def release(self, connection: Connection) -> None:
        """After an exchange: to the longest waiter or back to the pool when it ended cleanly and may
        be reused, else closed."""
        if not connection.finish_exchange():
            self._forget(connection)
            return
        while self._waiters:
            key, turn = self._waiters[0]
            if turn.done():
                self._waiters.popleft()
                continue
            if key == connection.origin.key:
                self._waiters.popleft()
                turn.set_result(connection)
                return
            self._forget(connection)  # the longest waiter wants another origin: make room for it
            return
        connection.idle_since = self._loop.time()
        self._idle.setdefault(connection.origin.key, []).append(connection)
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(self.keepalive_s, self._sweep)

    def _forget(self, connection: Connection) -> None:
        connection.close()
        if connection in self._open:
            self._open.discard(connection)
            self._grant_slots()

    def _grant_slots(self) -> None:
        """Give each free slot under the cap to the longest waiter, reserved for it."""
        while self._waiters and not self._at_cap():
            _, turn = self._waiters.popleft()
            if not turn.done():
                self._connecting += 1
                turn.set_result(None)

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


__all__ = [
    "Sink",
    "UpstreamBrokenError",
    "UpstreamClient",
    "UpstreamClosedError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamReadTimeout",
    "UpstreamResponse",
    "UpstreamStaleConnection",
    "ignored_proxy_variables",
]
