"""uvicorn's HTTP/1.1 protocol with the two limits it lacks: the size of a request's head and the time a
client may take to send it.

Why: with httptools, uvicorn accepts a request head of any size (a 2 MB header was answered 200) and
waits forever for a head that arrives a byte at a time (slowloris); each such connection costs memory
and a file descriptor. Measured on uvicorn 0.54 before this module. A client over the limit gets 431,
a slow one 408, both in the OpenAI error shape, and the connection is closed.

The slow *body* is limited in the relay instead (``client_body_timeout_s`` between reads), where the
body is read.

It also hands each request's ``RequestHooks`` to the app (``uvicorn_hooks``): the relay's fast path.

It subclasses uvicorn's ``HttpToolsProtocol`` and relies on its internals (``_USES``). When this uvicorn
lacks one, ``limited_protocol`` says so once and returns plain uvicorn's protocol instead: the proxy
then runs without these two limits and without the fast path, but correctly.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tokentrail.proxy.errors import ClientTooSlowError, HeadersTooLargeError, ProxyRequestError
from tokentrail.proxy.server.own_headers import own_headers
from tokentrail.proxy.server.uvicorn_hooks import HOOKS_EXTENSION, RequestHooks

logger = logging.getLogger(__name__)

_LINGER_S = 1.0
_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
_REQUEST_LINE_EXTRA = len(b"GET  HTTP/1.1\r\n\r\n")  # the request line and the blank line, URL aside
# uvicorn's HttpToolsProtocol as this module uses it: the methods overridden or called, and the
# instance attributes read (set in its __init__ / parser callbacks).
_USES = (
    "connection_made",
    "connection_lost",
    "data_received",
    "on_url",
    "on_header",
    "on_headers_complete",
    "on_body",
    "on_message_complete",
    "send_400_response",
)
_INSTANCE_ATTRIBUTES = ("cycle", "scope", "transport", "loop", "url", "headers")


def limited_protocol(max_head_bytes: int, head_timeout_s: float) -> type[HttpToolsProtocol] | str:
    """A protocol class for ``uvicorn.run(http=...)`` with these limits; ``"httptools"`` (plain
    uvicorn, with one warning) when this uvicorn is not the one it was written for."""
    if not protocol_fits(HttpToolsProtocol):
        logger.warning(
            "uvicorn=<%s> | this uvicorn's HTTP protocol is not the one TokenTrail's head limits and fast "
            "path know; serving with plain uvicorn (no request-head size or time limit)",
            _uvicorn_version(),
        )
        return "httptools"

    class LimitedHttpToolsProtocol(_Limited):
        pass

    LimitedHttpToolsProtocol.max_head_bytes = max_head_bytes
    LimitedHttpToolsProtocol.head_timeout_s = head_timeout_s
    return LimitedHttpToolsProtocol


def protocol_fits(protocol: type) -> bool:
    """Whether ``protocol`` has every method this module overrides or calls, and sets the instance
    attributes it reads (read from its ``__init__``'s and callbacks' code: nothing is run)."""
    if not all(callable(getattr(protocol, name, None)) for name in _USES):
        return False
    names: set[str] = set()
    for method in ("__init__", "connection_made", "on_message_begin"):
        code = getattr(getattr(protocol, method, None), "__code__", None)
        if code is not None:
            names.update(code.co_names)
    return all(name in names for name in _INSTANCE_ATTRIBUTES)


def _uvicorn_version() -> str:
    import uvicorn

    return str(getattr(uvicorn, "__version__", "?"))


class _Limited(HttpToolsProtocol):
    max_head_bytes = 64 * 1024
    head_timeout_s = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_head = True
        self._head_bytes = 0
        self._refused = False
        self._hooks: RequestHooks | None = None
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.head_timeout_s, self._head_too_slow
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)
        hooks = self._hooks  # (like uvicorn, only the newest request hears of it)
        if hooks is not None and hooks.on_disconnect is not None and hooks.cycle.disconnected:
            hooks.on_disconnect()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            self._head_bytes += len(data)
            idle = self.cycle is None or self.cycle.response_complete  # not a pipelined request
            if self._head_timer is None and idle:  # the first bytes of the next request
                self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_too_slow)
        super().data_received(data)
        # A read may carry the head and the start of the body: judge only a head still unfinished.
        if self._in_head and self._head_bytes > self.max_head_bytes and not self._refused:
            self._refuse(HeadersTooLargeError(f"the request head is larger than {self.max_head_bytes} bytes"))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._stop_head_timer()
        # A head that arrived whole in one read is judged here, by its parsed size.
        size = len(self.url) + _REQUEST_LINE_EXTRA + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > self.max_head_bytes:
            self._refuse(HeadersTooLargeError(f"the request head is larger than {self.max_head_bytes} bytes"))
            return  # no request cycle: the app never sees this request
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # a request cycle was made for this head
            self._hooks = RequestHooks.for_cycle(cycle)
            if self._hooks is not None:
                scope = cast(dict[str, Any], self.scope)
                scope.setdefault("extensions", {})[HOOKS_EXTENSION] = self._hooks

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        super().on_message_complete()
        self._in_head = True  # whatever comes next on this connection is the next request's head
        self._head_bytes = 0

    def send_400_response(self, msg: str) -> None:
        if not self._refused:
            super().send_400_response(msg)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._in_head and not self._refused:
            self._refuse(
                ClientTooSlowError(f"the request head did not arrive within {self.head_timeout_s:g} s")
            )

    def _refuse(self, error: ProxyRequestError) -> None:
        """Answer ``error`` and close the connection (no app has seen this request)."""
        self._refused = True
        self._stop_head_timer()
        body = error.body()
        own = b"".join(b"%s: %s\r\n" % pair for pair in own_headers())
        head = b"HTTP/1.1 %d %s\r\n%scontent-type: application/json\r\ncontent-length: %d\r\n" % (
            error.status_code,
            _REASONS[error.status_code],
            own,
            len(body),
        )
        if not self.transport.is_closing():
            self.transport.write(head + b"connection: close\r\n\r\n" + body)
            # Close a moment later, reading (and dropping) what the client still sends: closing with
            # unread data makes the kernel send a reset, which can destroy the answer before it is read.
            self.loop.call_later(_LINGER_S, self.transport.close)


__all__ = ["limited_protocol", "protocol_fits"]
