"""Per-worker state files: how the worker that answers a request sees its siblings' figures.

Under ``serve --workers N`` a connection reaches one worker, but ``/tokentrail/health`` and
``/tokentrail/metrics`` must speak for all of them. Each worker writes its figures next to its spool
(``<spool>.<kind>.json``) every ``PUBLISH_EVERY_S``; the worker that answers reads its siblings' files.
Writes replace the file, so a reader never sees half of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tokentrail.proxy.server.workers import spool_of

logger = logging.getLogger(__name__)

PUBLISH_EVERY_S = 1.0
STALE_S = 5.0


def state_path(spool: Path, kind: str) -> Path:
    """Where the worker owning ``spool`` publishes its ``kind`` figures."""
    return spool.with_name(f"{spool.name}.{kind}.json")


def write_state(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (a sibling's reader never sees a torn file)."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    except OSError as exc:  # its siblings will report it as not reporting
        logger.warning("path=<%s>, error=<%s> | could not publish this worker's figures", path, exc.strerror)


def sibling_states(runtime: Any, kind: str) -> list[tuple[int, bytes | None, float]]:
    """(worker, its last ``kind`` file or None, the file's age in seconds) for every other worker."""
    states: list[tuple[int, bytes | None, float]] = []
    for slot in range(runtime.settings.workers):
        if slot == runtime.worker:
            continue
        path = state_path(spool_of(runtime.settings, slot), kind)  # every worker's follows from settings
        content: bytes | None = None
        age = float("inf")
        with contextlib.suppress(OSError):
            age = max(0.0, time.time() - path.stat().st_mtime)
            content = path.read_bytes()
        states.append((slot, content, age))
    return states


async def publish_every(runtime: Any, publishers: Iterable[Callable[[Any], None]]) -> None:
    """Run every publisher now and every ``PUBLISH_EVERY_S`` after; file writes run off the event loop
    (in a thread, as the health endpoint itself does), so a slow disk never stalls a relayed call."""
    publishers = list(publishers)

    def publish_all() -> None:
        for publish in publishers:
            publish(runtime)

    while True:
        await asyncio.to_thread(publish_all)
        await asyncio.sleep(PUBLISH_EVERY_S)
