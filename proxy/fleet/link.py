"""A worker's side of the supervisor's control plane (``hub.py``).

The worker's ``RlLoop`` is a member: the link applies what the control plane tells it (close the
gate, let the running calls finish, open with these versions) and answers when done. The worker's
own pause, resume and version changes go to the control plane instead of being decided here, so the
whole host acts as one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from tokentrail.proxy.fleet.wire import MAX_LINE, read_message, write_message
from tokentrail.proxy.rl.control import (
    CONTROL_TIMEOUT_S,
    FleetUnavailableError,
    SupersededError,
    UpstreamAnswer,
    Versions,
)
from tokentrail.proxy.rl.loop import RlLoop
from tokentrail.proxy.rl.pause import PauseMode

logger = logging.getLogger(__name__)

_ANSWER_GRACE_S = 60.0


class FleetLink:
    """Connects ``loop`` to the control plane at ``path``; is the loop's ``control`` from then on."""

    def __init__(self, path: Path, loop: RlLoop) -> None:
        self._path = path
        self._loop = loop
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._commands: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self) -> None:
        """Connect and take the fleet's state before the worker serves its first call."""
        reader, self._writer = await asyncio.open_unix_connection(self._path, limit=MAX_LINE)
        state = await read_message(reader)
        if state is None or state.get("cmd") != "state":
            raise FleetUnavailableError("the control plane sent no state")
        versions: Versions = dict(state.get("versions") or {})
        if state.get("paused"):
            await self._loop.set_versions(versions)
            await self._loop.close(PauseMode(state["paused"]))
        else:
            await self._loop.open(versions)
        self._loop.control = self
        self._reading = asyncio.create_task(self._read(reader))

    async def aclose(self) -> None:
        self._closing = True
        self._loop.control = self._loop.local_control
        if self._reading is not None:
            self._reading.cancel()
        if self._writer is not None:
            self._writer.close()

    # ---- the worker's requests (``Control``) ----

    async def pause(self, mode: PauseMode) -> list[UpstreamAnswer]:
        return _answers(await self._ask({"op": "pause", "mode": str(mode)}))

    async def resume(self) -> list[UpstreamAnswer]:
        return _answers(await self._ask({"op": "resume"}))

    async def share_versions(self, versions: Versions) -> None:
        await self._ask({"op": "versions", "versions": versions})

    async def relearn(self) -> bool:
        await self._ask({"op": "learn"})
        return True

    async def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        if self._writer is None or self._writer.is_closing():
            raise FleetUnavailableError("not connected to the control plane")
        self._next_id += 1
        request_id = self._next_id  # (another request may be sent while this one waits)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        write_message(self._writer, {**message, "id": request_id})
        try:  # the control plane always answers; a hung one is given up after its own longest wait
            answer = await asyncio.wait_for(future, CONTROL_TIMEOUT_S + _ANSWER_GRACE_S)
        except TimeoutError:
            raise FleetUnavailableError("the control plane did not answer") from None
        finally:
            self._waiting.pop(request_id, None)
        error = answer.get("error")
        if error == "superseded":
            raise SupersededError
        if error == "timeout":
            raise TimeoutError
        if error is not None:
            raise FleetUnavailableError(str(error))
        return answer

    # ---- the control plane's commands ----

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while (message := await read_message(reader)) is not None:
                if "re" in message:
                    future = self._waiting.get(int(message["re"]))
                    if future is not None and not future.done():
                        future.set_result(message)
                elif message.get("cmd") == "newer":
                    self._loop.newer()
                elif "cmd" in message:  # answered when done; a drain may take minutes
                    task = asyncio.create_task(self._run(message))
                    self._commands.add(task)
                    task.add_done_callback(self._commands.discard)
        finally:
            if not self._closing:  # (this worker stopping ends the read: no news)
                logger.error("the supervisor's control plane went away")
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(FleetUnavailableError("the control plane went away"))

    async def _run(self, command: dict[str, Any]) -> None:
        answer: dict[str, Any] = {"re": command.get("id")}
        try:
            kind = command["cmd"]
            if kind == "close":
                await self._loop.close(PauseMode(command["mode"]))
            elif kind == "drain":
                answer["drained"] = await self._loop.drain()
            elif kind == "open":
                await self._loop.open(dict(command.get("versions") or {}))
            elif kind == "versions":
                await self._loop.set_versions(dict(command.get("versions") or {}))
        except (KeyError, ValueError, TypeError) as exc:  # a command this worker cannot read: say so
            answer["error"] = type(exc).__name__
        if self._writer is not None:
            with contextlib.suppress(ConnectionError):
                write_message(self._writer, answer)


def _answers(answer: dict[str, Any]) -> list[UpstreamAnswer]:
    return [UpstreamAnswer(**a) for a in answer.get("answers") or []]
