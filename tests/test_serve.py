"""``tokentrail`` as a user runs it: a real ``serve`` process, SIGTERM, ``db upgrade`` and ``sql``."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.fake_upstream import FakeUpstream
from tests.servers import free_socket
from tokentrail.proxy.storage.migrate import head_revision

CLI = [sys.executable, "-m", "tokentrail.proxy.cli"]
CHAT = "/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=120, check=False)


@contextmanager
def serve_process(
    upstream: str, db_url: str, **env: str
) -> Iterator[tuple[subprocess.Popen[str], str, queue.Queue[str]]]:
    """``tokentrail serve`` configured only through TOKENTRAIL_* variables; yields (process, url, log).

    Each process gets a spool of its own in a fresh directory unless ``TOKENTRAIL_FALLBACK_PATH`` is
    given (two processes cannot share one)."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    spool_dir = tempfile.mkdtemp(prefix="tokentrail-spool-")
    environment = {
        **os.environ,
        "TOKENTRAIL_UPSTREAM": upstream,
        "TOKENTRAIL_DB": db_url,
        "TOKENTRAIL_PORT": str(port),
        "TOKENTRAIL_FALLBACK_PATH": str(Path(spool_dir) / "spool.jsonl"),
        **env,
    }
    process = subprocess.Popen([*CLI, "serve"], env=environment, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.put(line)

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    try:
        _wait_for_line(lines, "Application startup complete")
        _wait_listening(port, process)  # (uvicorn binds once the startup is complete)
        yield process, f"http://127.0.0.1:{port}", lines
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)
        pumper.join(30)
        assert process.stderr is not None
        process.stderr.close()
        shutil.rmtree(spool_dir, ignore_errors=True)


def _refuses_new_connections(url: str, timeout: float = 10) -> bool:
    """Whether a new TCP connection to ``url`` is refused within ``timeout`` (uvicorn closes its
    listening socket right after it logs that it is shutting down)."""
    parts = urlsplit(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((parts.hostname, parts.port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        time.sleep(0.01)
    return False


def _wait_listening(port: int, process: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert process.poll() is None, "tokentrail serve exited"
            assert time.monotonic() < deadline, "tokentrail serve never listened"
            time.sleep(0.02)


def _wait_for_line(lines: queue.Queue[str], needle: str, timeout: float = 60) -> list[str]:
    seen = []
    while True:
        line = lines.get(timeout=timeout)
        seen.append(line)
        if needle in line:
            return seen


def test_sigterm_lets_in_flight_calls_finish_and_records_every_accepted_call(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    upstream, url = fake
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with serve_process(url, db_url, TOKENTRAIL_GRACEFUL_SHUTDOWN_S="3") as (process, proxy, log):
        results: queue.Queue[int | str] = queue.Queue()

        def call(i: int, mode: str) -> None:
            headers = {"x-fake": mode, "X-Trajectory-Id": f"t{i % 2}"}
            try:
                body = dict(BODY, stream=i % 2 == 0)
                results.put(httpx.post(proxy + CHAT, json=body, headers=headers, timeout=60).status_code)
            except httpx.HTTPError as exc:
                results.put(type(exc).__name__)

        threads = [threading.Thread(target=call, args=(i, "gate")) for i in range(8)]
        threads.append(threading.Thread(target=call, args=(8, "hang")))
        for thread in threads:
            thread.start()
        for _ in threads:
            assert upstream.hanging.acquire(timeout=30), "a call did not reach the upstream"
        process.send_signal(signal.SIGTERM)
        _wait_for_line(log, "Shutting down")
        assert _refuses_new_connections(proxy), "a draining proxy still accepts connections"
        upstream.gate.set()
        for thread in threads:
            thread.join(60)
        assert process.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after draining
    statuses = [results.get_nowait() for _ in threads]
    assert statuses.count(200) == 8
    engine = create_engine(db_url)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT outcome, trajectory_id, seq FROM llm_calls")).all()
    engine.dispose()
    assert len(rows) == 9
    assert sorted(r.outcome for r in rows) == ["ok"] * 8 + ["proxy_shutdown"]
    for trajectory in ("t0", "t1"):
        seqs = sorted(r.seq for r in rows if r.trajectory_id == trajectory)
        assert seqs == list(range(len(seqs)))


def test_a_second_proxy_on_the_same_spool_refuses_to_start_and_the_first_keeps_serving(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    """Two processes sharing a spool could lose records (one's replay renames and deletes what the
    other just spooled): the second must stop at once, with a message naming the setting."""
    spool = tmp_path / "spool.jsonl"
    first_db = f"sqlite:///{tmp_path / 'first.db'}"
    with serve_process(fake[1], first_db, TOKENTRAIL_FALLBACK_PATH=str(spool)) as (_process, proxy, _log):
        env = dict(os.environ, TOKENTRAIL_FALLBACK_PATH=str(spool), TOKENTRAIL_UPSTREAM=fake[1])
        second = _run("serve", "--db", f"sqlite:///{tmp_path / 'second.db'}", "--port", "0", env=env)
        assert second.returncode == 2
        assert "in use by another TokenTrail process" in second.stderr
        assert "TOKENTRAIL_FALLBACK_PATH" in second.stderr
        assert "Traceback" not in second.stderr
        assert httpx.post(proxy + CHAT, json=BODY, timeout=30).status_code == 200
    # The lock goes with the process: a new one on the same spool starts.
    with serve_process(fake[1], first_db, TOKENTRAIL_FALLBACK_PATH=str(spool)) as (_process, proxy, _log):
        assert httpx.post(proxy + CHAT, json=BODY, timeout=30).status_code == 200


def test_serve_refuses_a_database_from_a_newer_version(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert _run("db", "upgrade", "--db", db_url).returncode == 0
    engine = create_engine(db_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    engine.dispose()
    result = _run("serve", "--db", db_url, "--port", "0")
    assert result.returncode == 2
    assert "9999_from_the_future" in result.stderr
    assert "newer version" in result.stderr
    assert "Traceback" not in result.stderr


def test_db_upgrade_creates_an_owner_only_file_and_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "db.sqlite"
    first = _run("db", "upgrade", "--db", f"sqlite:///{path}")
    second = _run("db", "upgrade", "--db", f"sqlite:///{path}")
    assert first.returncode == 0
    head = head_revision(f"sqlite:///{path}")
    assert f"migrated from empty to {head}" in first.stdout
    assert f"already at {head}" in second.stdout
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.fixture
def filled_db(tmp_path: Path) -> str:
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert _run("db", "upgrade", "--db", db_url).returncode == 0
    engine = create_engine(db_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO trajectories (id, created_at, updated_at, call_count, prompt_tokens, "
                "completion_tokens, id_generated) VALUES "
                "('run\x1b[31m-1', '2026-01-01', '2026-01-01', 2, 10, 4, 0), "
                "('run,2', '2026-01-02', '2026-01-02', 1, 5, 2, 0)"
            )
        )
    engine.dispose()
    return db_url


def test_sql_prints_a_table_with_control_characters_escaped(filled_db: str) -> None:
    result = _run("sql", "--db", filled_db, "SELECT id, call_count FROM trajectories ORDER BY id")
    assert result.returncode == 0
    assert "\x1b" not in result.stdout
    lines = result.stdout.splitlines()
    assert lines[0].split("|")[0].strip() == "id"
    assert "run\\x1b[31m-1" in lines[2]
    assert lines[-1] == "(2 rows)"


def test_sql_json_and_csv(filled_db: str) -> None:
    query = "SELECT id, call_count FROM trajectories ORDER BY id"
    as_json = json.loads(_run("sql", "--json", "--db", filled_db, query).stdout)
    assert as_json == [{"id": "run\x1b[31m-1", "call_count": 2}, {"id": "run,2", "call_count": 1}]
    as_csv = _run("sql", "--csv", "--db", filled_db, query).stdout.splitlines()
    assert as_csv == ["id,call_count", "run\x1b[31m-1,2", '"run,2",1']


def test_sql_error_is_one_clear_line(filled_db: str) -> None:
    result = _run("sql", "--db", filled_db, "SELECT nope FROM trajectories")
    assert result.returncode == 1
    assert result.stderr.strip() == "tokentrail: SQL error: no such column: nope"


def test_sql_on_a_missing_database_says_what_to_do(tmp_path: Path) -> None:
    result = _run("sql", "--db", f"sqlite:///{tmp_path / 'none.db'}", "SELECT 1")
    assert result.returncode == 1
    assert "tokentrail db upgrade" in result.stderr
    assert not (tmp_path / "none.db").exists()


def test_serve_help_lists_every_environment_variable() -> None:
    result = _run("serve", "--help")
    assert result.returncode == 0
    for name in (
        "UPSTREAM",
        "DB",
        "HOST",
        "PORT",
        "WRITER_QUEUE_SIZE",
        "FALLBACK_PATH",
        "UPSTREAM_READ_TIMEOUT",
    ):
        assert f"TOKENTRAIL_{name} " in result.stdout


def test_invalid_setting_is_reported_without_a_traceback(tmp_path: Path) -> None:
    env = dict(os.environ, TOKENTRAIL_UPSTREAM="ftp://nowhere")
    result = _run("serve", env=env)
    assert result.returncode == 2
    assert "invalid setting upstream" in result.stderr
    assert "Traceback" not in result.stderr
