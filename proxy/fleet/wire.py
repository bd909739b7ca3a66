"""The messages between the supervisor's control plane and its workers: JSON, one per line.

Control messages are rare (a pause, a resume, a version change), so clarity beats speed here. Each
side numbers the requests it sends (``id``) and answers the other's with ``re``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tokentrail.proxy import jsonio

MAX_LINE = 1 << 20  # a message is a few hundred bytes; versions of many upstreams stay far below this


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None when the other side closed (or sent something that is not one)."""
    try:
        line = await reader.readline()
    except (ConnectionError, ValueError):  # ValueError: a line over the reader's limit
        return None
    if not line:
        return None
    try:
        message = jsonio.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def write_message(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    """Queue ``message`` on ``writer`` (a closed connection is noticed by its reader)."""
    if not writer.is_closing():
        writer.write(jsonio.dumps_text(message).encode() + b"\n")
