"""Real servers on 127.0.0.1 for the tests: uvicorn in a thread, bound to a free port."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


class _ReadyServer(uvicorn.Server):
    """A uvicorn server that says when it is listening, instead of being polled."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    def install_signal_handlers(self) -> None:  # the test process keeps its own handlers
        pass

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


def free_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


@contextmanager
def serve_in_thread(app: Any, port: int = 0, **config: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread; yield its base URL; stop it (gracefully) afterwards.
    ``port``: that port (a server restarted where it was), else a free one."""
    sock = free_socket(port)
    port = sock.getsockname()[1]
    server = _ReadyServer(
        uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5, **config)
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(server.serve(sockets=[sock]))
        except BaseException as exc:  # surfaced in the test thread below
            errors.append(exc)
            server.ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not server.ready.wait(30) or errors or not server.started:
        raise RuntimeError(f"server did not start: {errors}")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
