"""``date`` and ``server`` on TokenTrail's own answers only: relayed answers carry vLLM's.

Why: uvicorn puts its ``date`` and ``server`` in front of every response's headers, so a response
relayed from vLLM (itself behind uvicorn) carried each twice, and ``Date`` must not repeat (RFC 9110
section 6.6.1). The proxy therefore runs uvicorn with both turned off (``UVICORN_OPTIONS``, used by
``serve`` and by the tests under both HTTP protocols) and adds them, as uvicorn would have, to the
answers TokenTrail gives itself: its ``/tokentrail/`` routes, the relay's own errors and the
protocol's 408/431. A relayed answer carries exactly what vLLM sent, as a client talking to vLLM
directly would get it.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from typing import Any

UVICORN_OPTIONS: dict[str, Any] = {"server_header": False, "date_header": False}
SERVER = b"uvicorn"  # what uvicorn itself would have said


class _EverySecond:
    """The two headers, formatted again only when the second changes (as uvicorn does)."""

    __slots__ = ("headers", "second")

    def __init__(self) -> None:
        self.second = -1
        self.headers: list[tuple[bytes, bytes]] = []

    def now(self) -> list[tuple[bytes, bytes]]:
        second = int(time.time())
        if second != self.second:
            self.second = second
            self.headers = [(b"date", formatdate(second, usegmt=True).encode()), (b"server", SERVER)]
        return list(self.headers)


own_headers = _EverySecond().now
"""``date`` and ``server`` as uvicorn would have sent them, as a new list."""


class WithOwnHeaders:
    """ASGI middleware: adds ``own_headers()`` to every response of the app it wraps."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*own_headers(), *message.get("headers", [])]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


__all__ = ["SERVER", "UVICORN_OPTIONS", "WithOwnHeaders", "own_headers"]
