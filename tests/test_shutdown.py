"""Shutdown that overlaps open calls: the app's lifespan ends only after their records are handed in.

ASGI lets a server begin the lifespan shutdown while requests are still open (uvicorn does once its
graceful timeout has cancelled calls that do not end at once; other servers do it straight away). The
server here is uvicorn with that order made certain: it stops listening, then starts the lifespan
shutdown at once, and only then waits for its connections.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from sqlalchemy import create_engine, text

from tests.fake_upstream import FakeUpstream
from tests.servers import free_socket
from tokentrail.proxy.app import create_app
from tokentrail.proxy.server.own_headers import UVICORN_OPTIONS
from tokentrail.proxy.settings import Settings
from tokentrail.proxy.storage.migrate import upgrade_database

CHAT = "/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


class _LifespanFirst(uvicorn.Server):
    """uvicorn, but its shutdown sends ``lifespan.shutdown`` before waiting for open requests."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self.lifespan_ending = threading.Event()

    def install_signal_handlers(self) -> None:
        pass

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        ending = asyncio.create_task(self.lifespan.shutdown())
        await asyncio.sleep(0)  # the app has the shutdown message now
        self.lifespan_ending.set()
        await ending
        await self._wait_tasks_to_complete()  # uvicorn's own wait for connections and tasks


@contextmanager
def _proxy(upstream: str, db_url: str, tmp_path: Path) -> Iterator[tuple[str, _LifespanFirst]]:
    settings = Settings(upstream=upstream, db=db_url, fallback_path=tmp_path / "fallback.jsonl")
    sock = free_socket()
    server = _LifespanFirst(
        uvicorn.Config(create_app(settings), log_level="warning", lifespan="on", **UVICORN_OPTIONS)
    )
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    assert server.ready.wait(30)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def test_a_call_open_when_the_lifespan_ends_is_answered_and_recorded(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    upstream, url = fake
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade_database(db_url)
    results: list[Any] = []
    with _proxy(url, db_url, tmp_path) as (proxy, server):

        def call() -> None:
            headers = {"x-fake": "gate", "X-Trajectory-Id": "late"}
            try:
                results.append(httpx.post(proxy + CHAT, json=BODY, headers=headers, timeout=60).status_code)
            except httpx.HTTPError as exc:
                results.append(type(exc).__name__)

        caller = threading.Thread(target=call)
        caller.start()
        assert upstream.hanging.acquire(timeout=30), "the call never reached the upstream"
        server.should_exit = True
        assert server.lifespan_ending.wait(30)
        upstream.gate.set()  # the call ends only now, while the app is shutting down
        caller.join(60)
    assert results == [200]
    engine = create_engine(db_url)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT trajectory_id, outcome FROM llm_calls")).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [("late", "ok")]
