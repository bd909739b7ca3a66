"""One keep-alive HTTP/1.1 connection to vLLM, as an explicit state machine around httptools' parser.

The states are h11's, seen from the client for one exchange at a time:

    IDLE ──start()──> SENT ──first byte──> HEAD ──final head──> BODY ──end of body──> DONE
      ^                 │                   │  (1xx: stays HEAD)  │                    │
      └──── release() ──┼───────────────────┼─────────────────────┼────────────────────┘ (reusable only)
                        └──────> BROKEN <───┴─────────────────────┘   (and any byte after DONE)

Why explicit: httptools is a parser for a *stream* of messages, so left to itself it parses bytes that
follow a complete response as the next response of the same exchange (stray bytes after
``content-length: 2`` + ``ok`` became a second set of headers), reports trailers as headers and
treats a ``101`` as an upgrade. Here a byte that arrives while IDLE or after DONE breaks the connection
(it is never parsed into the exchange, never pooled), trailers are kept apart, 1xx heads are skipped,
a ``101`` is an error (TokenTrail relays no upgrades) and a response head is capped at
``MAX_RESPONSE_HEAD_BYTES``. ``tests/test_http_differential.py`` holds this to h11, byte split by byte
split.

A connection that closes before any byte of an answer raises ``UpstreamClosedError``; it is
``UpstreamStaleConnection`` only when nothing of the request can have been processed: the connection
had served an exchange before (a keep-alive connection the server was closing) and either the request
was not fully written or the close came within ``stale_window_s`` of sending it.
"""

from __future__ import annotations

import asyncio
import enum
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import httptools

from tokentrail.proxy.upstream.errors import (
    UpstreamBrokenError,
    UpstreamClosedError,
    UpstreamError,
    UpstreamReadTimeout,
    UpstreamStaleConnection,
)

MAX_RESPONSE_HEAD_BYTES = 64 * 1024  # status line and headers of one response (nginx: 4-8 KiB buffers)
STALE_WINDOW_S = 0.25  # a reused connection closed this soon after the request, without a byte: stale
_CONTROL_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_READ_HIGH_WATER = 256 * 1024  # bytes buffered for the relay before reading from vLLM pauses
_ONE_WRITE_LIMIT = 256 * 1024  # smaller bodies go out joined to the head, in one write


class State(enum.Enum):
    """Where one connection is in its current exchange."""

    IDLE = "idle"  # no exchange: any byte from the server breaks the connection
    SENT = "sent"  # the request is out, no byte of the answer yet
    HEAD = "head"  # the answer's head (or an interim 1xx answer) is arriving
    BODY = "body"  # the final head is complete: the body is arriving
    DONE = "done"  # the answer is complete; any further byte breaks the connection
    BROKEN = "broken"  # invalid HTTP, a close mid-answer, a stray byte: closed, never reused


@dataclass(frozen=True, slots=True)
class Origin:
    """Where to connect, and the Host header to send."""

    key: str
    host: str
    port: int
    host_header: bytes
    tls: ssl.SSLContext | None


Sink = Callable[[bytes], bool]
"""Takes one body chunk inside the connection's read callback; returns False when its reader is
behind (reading from vLLM then pauses until the pump's ``drain`` returns)."""


class _Refused(Exception):
    """Raised inside the parser: the answer is invalid in a way llhttp does not check."""


class _AfterDone(Exception):
    """Raised inside the parser to stop it at a message that starts after the answer was complete."""


class Connection(asyncio.Protocol):
    """One keep-alive connection; it carries one exchange at a time."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, origin: Origin, stale_window_s: float = STALE_WINDOW_S
    ) -> None:
        self.loop = loop
        self.origin = origin
        self.stale_window_s = stale_window_s
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.exchanges = 0  # requests started on this connection (more than one: it was reused)
        self.last_read = 0.0  # loop time of the last bytes from vLLM (the read timeout's clock)
        self.sent_at = 0.0
        self.writing_paused = False  # the transport holds request bytes the kernel has not taken
        self._timer: asyncio.TimerHandle | None = None
        self.reading_paused = False  # the transport's state: it outlives an exchange
        self._parser = httptools.HttpResponseParser(self)
        self._begin(b"")
        self.state = State.IDLE

    def _begin(self, method: bytes) -> None:
        """Forget the previous exchange; the next response answers ``method``."""
        self.state = State.SENT
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0  # bytes read while the head was incomplete (head and maybe some body)
        self.head_size = 0  # the head's own size, as parsed: status line and header lines
        self.reusable = False
        self.close_delimited = False
        self.head_only = method == b"HEAD"
        self.error: UpstreamError | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.waiter: asyncio.Future[None] | None = None
        self.sink: Sink | None = None
        self.sink_blocked = False
        self.sink_error: BaseException | None = None
        self.resume()  # paused for a reader that left after the last answer had all arrived

    @property
    def headers_done(self) -> bool:
        return self.state in (State.BODY, State.DONE)

    @property
    def message_done(self) -> bool:
        return self.state is State.DONE

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's does not subclass asyncio's
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False

    def data_received(self, data: bytes) -> None:
        self.last_read = self.loop.time()
        state = self.state
        if state in (State.IDLE, State.DONE, State.BROKEN):  # nobody asked: the stream is out of step
            self._break_after_answer()
            return
        if state is State.SENT:
            if data[0] in b"\r\n":  # llhttp skips empty lines before a status line; h11 (and we) refuse
                self._fail(UpstreamBrokenError("the upstream's answer starts with an empty line"))
                return
            self.state = State.HEAD
        if self.state is State.HEAD:
            self.head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.state is State.DONE:  # bytes after a complete answer: never parsed into it
                self._break_after_answer()
            elif self.state is not State.BROKEN:
                self._fail(UpstreamBrokenError(f"the upstream's answer is not valid HTTP: {exc}"))
        else:
            if self.state is State.HEAD and self.head_bytes > MAX_RESPONSE_HEAD_BYTES:
                self._fail(_head_too_large())
        if self.sink is not None and self.chunks:
            self.to_sink(self.sink)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        state = self.state
        if state is State.SENT:
            reused = self.exchanges > 1
            early = self.loop.time() - self.sent_at <= self.stale_window_s
            if reused and (self.writing_paused or early):
                self._fail(UpstreamStaleConnection("a reused connection was closed before the request"))
            else:
                self._fail(UpstreamClosedError("the upstream closed the connection before answering"))
        elif state is State.BODY and self.close_delimited:
            self.state = State.DONE  # a body without a length ends with the connection
            self._wake()
        elif state in (State.HEAD, State.BODY):
            self._fail(UpstreamBrokenError("the upstream closed the connection mid-response"))

    # ---- httptools callbacks ----

    def on_message_begin(self) -> None:
        if self.state is State.DONE:
            raise _AfterDone

    def on_status(self, reason: bytes) -> None:
        self.head_size += len(reason) + 15  # "HTTP/1.1 200 " and CRLF
        if _CONTROL_BYTE.search(reason):  # llhttp lets them through in a reason phrase; h11 does not
            raise _Refused("the upstream's status line holds a control character")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.state is State.BODY:
            self.trailers.append((name, value))
        else:
            self.head_size += len(name) + len(value) + 4
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status == 101:
            self._fail(UpstreamBrokenError("the upstream switched protocols (101); TokenTrail relays none"))
            raise _AfterDone
        if self.head_size > MAX_RESPONSE_HEAD_BYTES:  # a complete head that came in one read
            self._fail(_head_too_large())
            raise _AfterDone
        if 100 <= status < 200:  # an interim answer (103 Early Hints ...): wait for the real one
            self.headers = []
            return
        self.status = status
        self.state = State.BODY
        framed = False
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"transfer-encoding" and value.strip(b" \t").lower() != b"chunked":
                # gzip, "chunked, chunked", ... : refused like nginx and h11 ("unknown Transfer-Encoding")
                self._fail(UpstreamBrokenError("the upstream's Transfer-Encoding is not plain chunked"))
                raise _AfterDone
            if lower in (b"content-length", b"transfer-encoding"):
                framed = True
        self.close_delimited = not framed and status not in (204, 304) and not self.head_only
        if self.head_only:
            self.state = State.DONE  # the parser would wait for a body a HEAD answer never has
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
        if self.state is State.HEAD:  # the end of an interim answer: the next head starts afresh
            self.head_bytes = self.head_size = 0
            return
        if self.state is not State.BODY:
            return
        # (an HTTP/1.0 answer is never reused, even with keep-alive: as h11; vLLM speaks 1.1)
        self.reusable = self._parser.should_keep_alive() and self._parser.get_http_version() == "1.1"
        self.state = State.DONE
        self._wake()

    # ---- used by the client and the response ----

    def start(self, method: bytes, request: bytes, body: bytes) -> None:
        """IDLE -> SENT: write the request (head and body in one write when small)."""
        self._begin(method)
        self.exchanges += 1
        self.sent_at = self.last_read = self.loop.time()
        assert self.transport is not None
        if len(body) <= _ONE_WRITE_LIMIT:
            self.transport.write(request + body)
        else:
            self.transport.write(request)
            self.transport.write(body)

    def finish_exchange(self) -> bool:
        """DONE -> IDLE when the answer ended cleanly and may be reused; True when it may."""
        if self.closed or self.state is not State.DONE or not self.reusable or self.head_only:
            self.close()
            return False
        self.state = State.IDLE
        return True

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
        if self.state is State.DONE:
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

    def _break_after_answer(self) -> None:
        """A byte nobody asked for: the answer (if complete) stands, the connection is not reused."""
        self.reusable = False
        self.close()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        """-> BROKEN: the exchange failed with ``error``; the connection is closed."""
        self.state = State.BROKEN
        if self.error is None:
            self.error = error
        self.reusable = False
        self.close()
        self._wake()


def _head_too_large() -> UpstreamBrokenError:
    return UpstreamBrokenError(f"the upstream's head is over {MAX_RESPONSE_HEAD_BYTES} bytes")
