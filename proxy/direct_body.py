"""A stream's chunks written straight to the client's connection, from the upstream's read callback.

Why: with 64 concurrent streams at 2 ms per token the proxy relays about 30,000 events a second on
one core. Through ASGI each event costs a future, a task switch, a read-timeout timer, an async
generator step, a message dict and uvicorn's ``send``; a py-spy profile put the proxy's event loop at
100% with the time to first token 5 ms above the upstream's. Written from the upstream connection's
own read callback (``UpstreamResponse.pump``), an event costs a parse and a socket write.

Only under TokenTrail's own HTTP protocol (``http_limits``), which hands the request's uvicorn
cycle to the app as ``scope["extensions"]["tokentrail.cycle"]``; under any other server the relay
uses plain ASGI ``send``. This is coupled to uvicorn's ``RequestResponseCycle`` (its ``transport``,
``flow``, ``chunked_encoding``, ``response_started``, ``response_complete`` and ``disconnected``):
uvicorn is pinned in CI's constraints and the tests run both paths.
"""

from __future__ import annotations

from typing import Any

CYCLE_EXTENSION = "tokentrail.cycle"


class DirectBody:
    """Chunked body writes for one response whose head uvicorn has already sent."""

    __slots__ = ("_cycle", "_flow", "_transport")

    def __init__(self, cycle: Any) -> None:
        self._cycle = cycle
        self._transport = cycle.transport
        self._flow = cycle.flow

    @classmethod
    def for_scope(cls, scope: dict[str, Any]) -> DirectBody | None:
        """The writer for this request's response, or None where only ASGI ``send`` may write."""
        extensions = scope.get("extensions")
        cycle = None if extensions is None else extensions.get(CYCLE_EXTENSION)
        if cycle is None or scope["method"] == "HEAD":
            return None
        if not cycle.response_started or cycle.response_complete or cycle.chunked_encoding is not True:
            return None
        return cls(cycle)

    def write(self, data: bytes) -> bool:
        """Send one chunk (dropped once the client is gone); False when the client is behind."""
        if not self._cycle.disconnected:
            self._transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        return not self._flow.write_paused

    async def drain(self) -> None:
        """Until the client has taken what was written (or is gone)."""
        if self._flow.write_paused and not self._cycle.disconnected:
            await self._flow.drain()


__all__ = ["CYCLE_EXTENSION", "DirectBody"]
