"""The control plane of ``serve --workers N``: in the supervisor, every worker a member.

The supervisor runs a ``ControlPlane`` (``rl/control.py``) on an event loop of its own, in a thread
beside its ``os.wait()`` loop, and listens on a Unix socket that only its workers are told about. A
worker connects before it serves its first call and is first told the current state (paused or not,
every upstream's version), so a worker that was restarted during a pause holds its calls too.

A pause, resume or version change that reaches any worker is passed here; the control plane tells
every connected worker what to do and waits for each to have done it (a worker that dies meanwhile
has nothing left to hold) before it answers. Its cost is measured by ``bench/fleet_control.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

from tokentrail.proxy.fleet.replicas import ControlStore, ReplicaFleet
from tokentrail.proxy.fleet.wire import MAX_LINE, read_message, write_message
from tokentrail.proxy.rl.control import (
    CONTROL_TIMEOUT_S,
    ControlPlane,
    FleetUnavailableError,
    SupersededError,
    Versions,
)
from tokentrail.proxy.rl.pause import PauseMode
from tokentrail.proxy.settings import Settings
from tokentrail.proxy.storage.engine import make_engine
from tokentrail.proxy.upstream.client import UpstreamClient
from tokentrail.proxy.upstream.configured import upstream_client

logger = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
COMMAND_TIMEOUT_S = 30.0  # a worker takes a close, open or versions command at once; a hung one is left out


class _Worker:
    """One worker's connection: commands to it, and its answers."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any] | None]] = {}

    def tell(self, message: dict[str, Any]) -> None:
        write_message(self.writer, message)

    async def ask(self, message: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        """Send a command and wait for its answer; None when the worker went away first, or did
        not answer within ``timeout_s``."""
        self._next_id += 1
        request_id = self._next_id  # (another command may be sent while this one waits)
        future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        write_message(self.writer, {**message, "id": request_id})
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:  # a worker that does not answer holds no one up: it is left out
            logger.error("command=<%s> | a worker did not answer the control plane", message.get("cmd"))
            return None
        finally:
            self._waiting.pop(request_id, None)

    def answered(self, message: dict[str, Any]) -> None:
        future = self._waiting.pop(int(message.get("re", -1)), None)
        if future is not None and not future.done():
            future.set_result(message)

    def gone(self) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_result(None)
        self._waiting.clear()


class HubMembers:
    """Every connected worker, as the control plane's ``Members``."""

    def __init__(self) -> None:
        self.workers: set[_Worker] = set()

    def newer(self) -> None:
        for worker in self.workers:
            worker.tell({"cmd": "newer"})

    async def close(self, mode: PauseMode) -> None:
        await self._all({"cmd": "close", "mode": str(mode)})

    async def drain(self) -> bool:
        answers = await self._all({"cmd": "drain"}, CONTROL_TIMEOUT_S)
        return all(answer.get("drained", False) for answer in answers if answer is not None)

    async def open(self, versions: Versions) -> None:
        await self._all({"cmd": "open", "versions": versions})

    async def set_versions(self, versions: Versions) -> None:
        await self._all({"cmd": "versions", "versions": versions})

    async def _all(
        self, command: dict[str, Any], timeout_s: float = COMMAND_TIMEOUT_S
    ) -> list[dict[str, Any] | None]:
        asks = (worker.ask(command, timeout_s) for worker in list(self.workers))
        return list(await asyncio.gather(*asks))


class ControlHub:
    """The supervisor's control plane and the socket its workers reach it on."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.members = HubMembers()
        self.plane: ControlPlane | None = None
        self.directory = Path(tempfile.mkdtemp(prefix="tokentrail-control-"))
        self.path = self.directory / SOCKET_NAME
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="tokentrail-control", daemon=True)

    def start(self) -> None:
        """Listen (in a thread); returns once workers can connect."""
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the control plane did not start")

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(10)
        with contextlib.suppress(OSError):
            self.path.unlink()
            self.directory.rmdir()

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        client: UpstreamClient = upstream_client(self.settings)
        urls = list(self.settings.upstreams)
        self.plane = ControlPlane(
            lambda: urls, client, self.members, learn_versions=self.settings.learn_weight_versions
        )
        replicas: ReplicaFleet | None = None
        engine = None
        if self.settings.fleet_control_in_database:  # the other replicas on the database too
            engine = make_engine(self.settings.db)
            replicas = ReplicaFleet(self.plane, ControlStore(engine))
            await replicas.start()
        server = await asyncio.start_unix_server(self._connected, self.path, limit=MAX_LINE)
        self.path.chmod(0o600)
        learning = asyncio.create_task(self.plane.learn_versions_until_known())
        self._ready.set()
        try:
            await self._stopped.wait()
        finally:
            learning.cancel()
            server.close()
            if replicas is not None:
                await replicas.stop()
            if engine is not None:
                engine.dispose()
            await client.aclose()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        plane = self.plane
        assert plane is not None
        worker = _Worker(writer)
        state = plane.state
        worker.tell({"cmd": "state", "paused": state.paused, "versions": state.versions})
        self.members.workers.add(worker)
        handling: set[asyncio.Task[None]] = set()
        try:
            while (message := await read_message(reader)) is not None:
                if "re" in message:
                    worker.answered(message)
                elif "op" in message:
                    task = asyncio.create_task(self._handle(plane, worker, message))
                    handling.add(task)
                    task.add_done_callback(handling.discard)
        finally:
            self.members.workers.discard(worker)
            worker.gone()
            writer.close()

    async def _handle(self, plane: ControlPlane, worker: _Worker, message: dict[str, Any]) -> None:
        """One worker's request: ``pause``, ``resume`` or ``versions``; answered with ``re``."""
        answer: dict[str, Any] = {"re": message.get("id")}
        try:
            op = message["op"]
            if op == "pause":
                answer["answers"] = [vars(a) for a in await plane.pause(PauseMode(message["mode"]))]
            elif op == "resume":
                answer["answers"] = [vars(a) for a in await plane.resume()]
            elif op == "versions":
                await plane.share_versions(dict(message["versions"]))
            elif op == "learn":
                await plane.relearn()
            else:
                answer["error"] = f"unknown op {op!r}"
        except SupersededError:
            answer["error"] = "superseded"
        except TimeoutError:
            answer["error"] = "timeout"
        except FleetUnavailableError as exc:  # the replicas' database is away
            answer["error"] = f"unavailable: {exc}"
        except (KeyError, ValueError, TypeError) as exc:
            answer["error"] = f"bad request: {type(exc).__name__}"
        except Exception as exc:  # a worker waits for this answer: it always gets one
            logger.error(
                "op=<%s>, error=<%s> | a control request failed", message.get("op"), type(exc).__name__
            )
            answer["error"] = f"failed: {type(exc).__name__}"
        worker.tell(answer)
