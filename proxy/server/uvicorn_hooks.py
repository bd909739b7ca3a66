"""What TokenTrail's own HTTP protocol (``http_limits``) hands the relay beyond ASGI, for the hot path.

Why: the relay is plain ASGI, and ASGI charges every call and every stream chunk for its generality.
Profiled with py-spy at 64 concurrent calls on one core (``bench/``):

- a stream chunk through ASGI costs a future, a task switch, a read-timeout timer, an async
  generator step, a message dict and uvicorn's ``send``; with 64 streams at 2 ms per token (about
  30,000 chunks a second) the event loop sat at 100%. ``DirectBody`` writes a chunk to the client
  from the upstream connection's own read callback (``UpstreamResponse.pump``);
- noticing a client that hangs up took a watcher task per call, blocked in ``receive()`` (7% of the
  loop); ``RequestHooks.on_disconnect`` is called by the protocol when the connection is lost;
- a non-streamed answer went out in two writes, head and body (two system calls);
  ``whole_response`` makes them one.

The protocol puts a ``RequestHooks`` in ``scope["extensions"]["tokentrail.hooks"]``; under any other
server there is none and the relay uses plain ASGI for all of it. This is coupled to uvicorn's
``RequestResponseCycle`` (its ``transport``, ``flow``, ``more_body``, ``chunked_encoding``,
``response_started``, ``response_complete`` and ``disconnected``; its flow control's ``write_paused``
and ``drain``; its transport's ``write``, ``close``, ``is_closing``). ``cycle_fits`` checks all of it once
per cycle class, and where one is missing the relay uses plain ASGI, with one warning. The relay's
tests run under both servers, and CI runs them under the newest uvicorn the ``[proxy]`` range allows.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

logger = logging.getLogger(__name__)

HOOKS_EXTENSION = "tokentrail.hooks"
_CYCLE_ATTRIBUTES = (
    "transport",
    "flow",
    "more_body",
    "chunked_encoding",
    "response_started",
    "response_complete",
    "disconnected",
)
_TRANSPORT_METHODS = ("write", "close", "is_closing")
_usable_cycles: dict[type, bool] = {}


def cycle_fits(cycle: Any) -> bool:
    """Whether ``cycle`` has everything the hooks touch: its attributes, its flow control's
    ``write_paused`` and ``drain``, and its transport's ``write``, ``close`` and ``is_closing``."""
    if not all(hasattr(cycle, name) for name in _CYCLE_ATTRIBUTES):
        return False
    flow, transport = cycle.flow, cycle.transport
    return (
        hasattr(flow, "write_paused")
        and callable(getattr(flow, "drain", None))
        and all(callable(getattr(transport, name, None)) for name in _TRANSPORT_METHODS)
    )


class RequestHooks:
    """One request's uvicorn cycle, and the callback to run if its client hangs up."""

    __slots__ = ("cycle", "on_disconnect")

    def __init__(self, cycle: Any) -> None:
        self.cycle = cycle
        self.on_disconnect: Callable[[], None] | None = None

    @classmethod
    def for_cycle(cls, cycle: Any) -> RequestHooks | None:
        """Hooks for this cycle, or None when this uvicorn's cycle is not the one they were written
        for (then the relay uses plain ASGI; checked once per cycle class)."""
        usable = _usable_cycles.get(type(cycle))
        if usable is None:
            usable = cycle_fits(cycle)
            _usable_cycles[type(cycle)] = usable
            if not usable:
                logger.warning(
                    "cycle=<%s> | this uvicorn's request cycle is not the one TokenTrail's fast path "
                    "knows; relaying through plain ASGI",
                    type(cycle).__qualname__,
                )
        return cls(cycle) if usable else None

    def abort(self) -> None:
        """Close the client's connection now (a client cut off mid-response)."""
        self.cycle.transport.close()

    @property
    def body_complete(self) -> bool:
        """Whether the whole request body has arrived (then ``receive()`` cannot wait)."""
        return not self.cycle.more_body

    def direct_body(self, method: str) -> DirectBody | None:
        """The writer for this response's chunks, once uvicorn has sent a chunked head."""
        cycle = self.cycle
        if method == "HEAD" or not cycle.response_started or cycle.response_complete:
            return None
        return DirectBody(cycle) if cycle.chunked_encoding is True else None

    async def whole_response(self, send: Callable[[], Awaitable[None]]) -> None:
        """Run ``send`` (which sends a whole response through ASGI) with uvicorn's writes gathered
        into one write to the socket."""
        cycle = self.cycle
        transport = cycle.transport
        gathered = _Gathered()
        cycle.transport = gathered
        try:
            await send()
        finally:
            cycle.transport = transport
            if gathered.parts and not transport.is_closing():
                transport.write(b"".join(gathered.parts))
            if gathered.closed:
                transport.close()


class _Gathered:
    """Stands in for the transport while uvicorn writes one response (it only writes and closes)."""

    __slots__ = ("closed", "parts")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def writelines(self, data: Iterable[bytes]) -> None:
        self.parts.extend(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def hooks_of(scope: dict[str, Any]) -> RequestHooks | None:
    extensions = scope.get("extensions")
    return None if extensions is None else extensions.get(HOOKS_EXTENSION)


class DirectBody:
    """Chunked body writes for one response whose head uvicorn has already sent."""

    __slots__ = ("_cycle", "_flow", "_transport")

    def __init__(self, cycle: Any) -> None:
        self._cycle = cycle
        self._transport = cycle.transport
        self._flow = cycle.flow

    def write(self, data: bytes) -> bool:
        """Send one chunk (dropped once the client is gone); False when the client is behind."""
        if not self._cycle.disconnected:
            self._transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        return not self._flow.write_paused

    async def drain(self) -> None:
        """Until the client has taken what was written (or is gone)."""
        if self._flow.write_paused and not self._cycle.disconnected:
            await self._flow.drain()


__all__ = ["HOOKS_EXTENSION", "DirectBody", "RequestHooks", "cycle_fits", "hooks_of"]
