"""Fixtures: a fake upstream, the proxy under uvicorn with a real SQLite file, and the real CPU vLLM.

The real vLLM is started once per test session with the project's CPU kit in ``deploy/vllm-cpu/`` (or
reused from ``TOKENTRAIL_TEST_VLLM_URL``). Tests that need it carry ``@pytest.mark.vllm``.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.fake_upstream import FakeUpstream
from tests.postgres import create_database, postgres_server
from tests.servers import free_socket, serve_in_thread
from tokentrail.proxy.app import Runtime, TokenTrailApp, create_app
from tokentrail.proxy.server.http_limits import limited_protocol
from tokentrail.proxy.server.own_headers import UVICORN_OPTIONS
from tokentrail.proxy.settings import Settings
from tokentrail.proxy.storage.migrate import upgrade_database

REPO = Path(__file__).resolve().parents[1]
VLLM_KIT = REPO / "deploy" / "vllm-cpu"


@dataclass
class Proxy:
    """A running proxy: its URL, its database, and its runtime (to wait for the writer)."""

    url: str
    db_url: str
    app: TokenTrailApp

    @property
    def runtime(self) -> Runtime:
        runtime: Runtime = self.app.api.state.runtime
        return runtime

    def wait_records(self, count: int, timeout: float = 30.0) -> None:
        """Block until ``count`` records were written or spilled since the proxy started."""
        assert self.runtime.writer.wait_settled(count, timeout), "records did not reach the writer"

    def wait_all_records(self, timeout: float = 30.0) -> None:
        """Block until no call is open and every record submitted so far is written or spilled."""
        deadline = time.monotonic() + timeout
        while self.runtime.relay.in_flight.count:
            assert time.monotonic() < deadline, "calls still open"
            time.sleep(0.01)
        self.wait_records(self.runtime.writer.submitted, max(0.1, deadline - time.monotonic()))

    def rows(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        engine = create_engine(self.db_url)
        try:
            with engine.connect() as connection:
                return [dict(r._mapping) for r in connection.execute(text(sql), params)]
        finally:
            engine.dispose()


@contextmanager
def running_proxy(
    upstream: str,
    tmp_path: Path,
    tracer_provider: Any = None,
    db_url: str | None = None,
    *,
    plain_uvicorn: bool = False,
    worker: int | None = None,
    recorder_socket: Path | None = None,
    **overrides: Any,
) -> Iterator[Proxy]:
    """The proxy as ``tokentrail serve`` runs it; ``plain_uvicorn``: under uvicorn's own HTTP protocol
    instead of TokenTrail's (no head limits, streams written through ASGI ``send``); ``worker``: run as
    that slot of ``serve --workers`` (with ``workers=N`` among the overrides); ``recorder_socket``: with
    ``recorder="process"``, the recorder to use instead of starting one."""
    db_url = db_url or f"sqlite:///{tmp_path / 'tokentrail.db'}"
    upgrade_database(db_url)
    settings = Settings(upstream=upstream, db=db_url, fallback_path=tmp_path / "fallback.jsonl", **overrides)
    app = create_app(
        settings, tracer_provider=tracer_provider, worker=worker, recorder_socket=recorder_socket
    )
    http: Any = (
        "httptools"
        if plain_uvicorn
        else limited_protocol(settings.max_header_bytes, settings.client_header_timeout_s)
    )
    with serve_in_thread(app, http=http, proxy_headers=False, **UVICORN_OPTIONS) as url:
        yield Proxy(url, db_url, app)


ProxyFactory = Callable[..., AbstractContextManager[Proxy]]


@pytest.fixture
def proxy_factory(tmp_path: Path) -> ProxyFactory:
    def factory(upstream: str, **overrides: Any) -> AbstractContextManager[Proxy]:
        return running_proxy(upstream, tmp_path, **overrides)

    return factory


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server for the whole run (no database name; see ``db_url``)."""
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty database: a SQLite file, and a database on the real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tokentrail.db'}"
    return create_database(request.getfixturevalue("postgres_url"))


@pytest.fixture
def fake() -> Iterator[tuple[FakeUpstream, str]]:
    upstream = FakeUpstream()
    with serve_in_thread(upstream) as url:
        yield upstream, url


@pytest.fixture
def fake_proxy(fake: tuple[FakeUpstream, str], tmp_path: Path) -> Iterator[Proxy]:
    with running_proxy(fake[1], tmp_path) as proxy:
        yield proxy


def _vllm_venv() -> Path:
    venv = Path(os.environ.get("VLLM_VENV", Path.home() / ".cache/tokentrail/vllm-venv"))
    if not (venv / "bin" / "python").exists():
        pytest.fail(
            f"no vLLM kit venv at {venv}: run `bash {VLLM_KIT}/install.sh {venv}` "
            "or set TOKENTRAIL_TEST_VLLM_URL, or deselect with -m 'not vllm'"
        )
    return venv


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kit's tiny model (weights and tokenizer), built once per session (about a second)."""
    model_dir = tmp_path_factory.mktemp("tiny-model")
    subprocess.run(
        [str(_vllm_venv() / "bin/python"), str(VLLM_KIT / "make_tiny_model.py"), str(model_dir)],
        check=True,
        capture_output=True,
    )
    return model_dir


@pytest.fixture(scope="session")
def vllm_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real CPU vLLM's base URL (no /v1): reused from the environment, or started once here."""
    given = os.environ.get("TOKENTRAIL_TEST_VLLM_URL")
    if given:
        yield given.rstrip("/").removesuffix("/v1")
        return
    venv = _vllm_venv()
    model_dir = tmp_path_factory.mktemp("vllm-model")
    subprocess.run(
        [str(venv / "bin/python"), str(VLLM_KIT / "make_tiny_model.py"), str(model_dir)],
        check=True,
        capture_output=True,
    )
    sock = free_socket()
    port = str(sock.getsockname()[1])
    sock.close()
    env = dict(
        os.environ,
        VLLM_VENV=str(venv),
        PORT=port,
        VLLM_PIDFILE=f"/tmp/tokentrail-test-vllm-{port}.pid",
        VLLM_LOG=f"/tmp/tokentrail-test-vllm-{port}.log",
        VLLM_SERVER_DEV_MODE="1",  # the RL control plane (/pause, /resume, weight versions), as RL runs it
    )
    subprocess.run(["bash", str(VLLM_KIT / "start.sh"), str(model_dir)], check=True, env=env)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run(["bash", str(VLLM_KIT / "stop.sh")], env=env, check=False)


@pytest.fixture
def vllm_proxy(vllm_url: str, tmp_path: Path) -> Iterator[Proxy]:
    with running_proxy(vllm_url, tmp_path) as proxy:
        yield proxy


def post(url: str, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=headers or {}, timeout=60)


_NEEDS_THE_VLLM_KIT = {"vllm_url", "tiny_model_dir", "vllm_proxy"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the vLLM kit must say so (``-m "not vllm"`` must leave out every one of them)."""
    unmarked = [
        item.nodeid
        for item in items
        if _NEEDS_THE_VLLM_KIT & set(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("vllm") is None
    ]
    if unmarked:
        raise pytest.UsageError(f"tests that need the vLLM kit lack @pytest.mark.vllm: {unmarked}")
