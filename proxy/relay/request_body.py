"""Reading a request's body from ASGI ``receive``, within the size limit and the client body timeout."""

from __future__ import annotations

import asyncio
from typing import Any

from tokentrail.proxy.errors import BodyTooLargeError, ClientTooSlowError
from tokentrail.proxy.server.uvicorn_hooks import RequestHooks


class ClientGone(Exception):
    """The client disconnected while its request body was still arriving."""


def _too_large(limit: int) -> BodyTooLargeError:
    return BodyTooLargeError(f"the request body is larger than the limit of {limit} bytes")


async def read_body(
    receive: Any,
    headers: list[tuple[bytes, bytes]],
    limit: int,
    silence_s: float,
    hooks: RequestHooks | None = None,
) -> bytes:
    """The whole request body; ``BodyTooLargeError`` as soon as it is known to pass ``limit``,
    ``ClientTooSlowError`` when the client sends nothing for ``silence_s`` seconds."""
    for name, value in headers:
        if name.lower() == b"content-length" and value.strip().isdigit() and int(value) > limit:
            raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            if hooks is not None and hooks.body_complete:
                message = await receive()  # all there: it cannot wait, so no timer for it
            else:
                async with asyncio.timeout(silence_s):
                    message = await receive()
        except TimeoutError:
            raise ClientTooSlowError(f"the request body stalled for more than {silence_s:g} s") from None
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
