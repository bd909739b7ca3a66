"""Upstream faults against a real ``tokentrail serve`` process: every call answered cleanly or cut as vLLM
cut it, every call recorded with what happened, and no socket or open call left behind.

The proxy runs as its own process so its sockets can be counted in ``/proc/<pid>/fd``; the fake
upstream (faults a real vLLM cannot be made to show on demand) runs in the test process.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fake_upstream import FakeUpstream
from tests.servers import free_socket

CHAT = "/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 30}
BIG = 30_000_000


def _sockets(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def _wait_until(condition: object, limit_s: float = 20.0) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def served(fake: tuple[FakeUpstream, str], tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with free_socket() as sock:
        port = sock.getsockname()[1]
    env = dict(
        os.environ,
        TOKENTRAIL_UPSTREAM=fake[1],
        TOKENTRAIL_DB=f"sqlite:///{tmp_path / 'faults.db'}",
        TOKENTRAIL_PORT=str(port),
        TOKENTRAIL_FALLBACK_PATH=str(tmp_path / "fallback.jsonl"),
        # Silence long enough to time the hanging upstreams out, yet far longer than the fake needs to
        # start a 30 MB answer on a loaded machine (1 s was not: a busy CI machine saw a 504 there).
        TOKENTRAIL_UPSTREAM_READ_TIMEOUT="4",
        TOKENTRAIL_UPSTREAM_KEEPALIVE_EXPIRY="0.5",
        TOKENTRAIL_LOG_LEVEL="warning",
    )
    process = subprocess.Popen([sys.executable, "-m", "tokentrail.proxy.cli", "serve"], env=env)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(url + "/tokentrail/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        assert _wait_until(healthy, 60), "tokentrail serve did not start"
        yield url, process
    finally:
        process.terminate()
        process.wait(60)


def _stream_body(url: str, mode: str) -> tuple[int, bytes, bool]:
    """(status, body, ended cleanly) of a streaming call."""
    chunks: list[bytes] = []
    with httpx.Client(timeout=60) as client:
        try:
            with client.stream(
                "POST", url + CHAT, json={**BODY, "stream": True}, headers={"x-fake": mode}
            ) as r:
                for chunk in r.iter_raw():
                    chunks.append(chunk)
                return r.status_code, b"".join(chunks), True
        except httpx.RemoteProtocolError:  # the proxy cut the stream, as the upstream did
            return 200, b"".join(chunks), False


def _one_round(url: str, upstream: str) -> int:
    """Every fault once; returns the number of recorded calls it made."""
    with httpx.Client(timeout=60) as client:
        assert client.post(url + CHAT, json=BODY, headers={"x-fake": "status:503"}).status_code == 503
        garbage = client.post(url + CHAT, json=BODY, headers={"x-fake": "garbage"})
        assert garbage.status_code == 200
        assert garbage.content == b"\x00\xffnot json at all"
        timed_out = client.post(url + CHAT, json=BODY, headers={"x-fake": "hang"})
        assert timed_out.status_code == 504
        assert timed_out.json()["error"]["code"] == 504
        assert client.post(url + CHAT, json=BODY, headers={"x-fake": "redirect"}).status_code == 307
        big = client.post(url + CHAT, json=BODY, headers={"x-fake": f"big:{BIG}"})
        direct = client.post(upstream + CHAT, json=BODY, headers={"x-fake": f"big:{BIG}"})
        assert big.status_code == 200
        assert len(big.content) > BIG
        assert big.content == direct.content  # byte for byte, token IDs back to null
    status, body, clean = _stream_body(url, "die-mid-stream")
    assert status == 200
    assert not clean
    assert b"[DONE]" not in body
    status, body, clean = _stream_body(url, "hang-stream")  # stalls after the first chunk
    assert status == 200
    assert not clean
    status, body, clean = _stream_body(url, f"big:{BIG}")
    assert status == 200
    assert clean
    assert len(body) > BIG
    assert body.endswith(b"data: [DONE]\n\n")
    # A client that goes away in the middle of a stream.
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:
        payload = b'{"model":"tiny","messages":[],"max_tokens":30,"stream":true}'
        raw.sendall(
            b"POST " + CHAT.encode() + b" HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"x-fake: hang-stream\r\ncontent-length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        assert raw.recv(65536).startswith(b"HTTP/1.1 200")
    return 9


def test_upstream_faults_are_recorded_and_leave_no_socket_or_call_open(
    served: tuple[str, subprocess.Popen[bytes]], fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    url, process = served
    idle = _sockets(process.pid)  # the listening socket(s) only
    calls = 0
    for _ in range(3):
        calls += _one_round(url, fake[1])

    def settled() -> bool:
        health = httpx.get(url + "/tokentrail/health", timeout=5).json()
        writer = health["writer"]
        return health["in_flight"] == 0 and writer["records_written"] + writer["records_failed"] >= calls

    assert _wait_until(settled)
    # Upstream keep-alive connections expire after 0.5 s; then the proxy holds what it held when idle.
    assert _wait_until(lambda: _sockets(process.pid) <= idle), f"{_sockets(process.pid)} sockets, {idle} idle"
    health = httpx.get(url + "/tokentrail/health", timeout=5).json()
    assert health["writer"]["records_written"] == calls
    assert all(u["in_flight"] == 0 for u in health["upstreams"])
    with contextlib.closing(sqlite3.connect(tmp_path / "faults.db")) as db:
        outcomes = dict(db.execute("SELECT outcome, count(*) FROM llm_calls GROUP BY outcome").fetchall())
    # Per round: 503 and 307 (upstream_error), garbage and both 30 MB answers (ok), the silent upstream
    # and the stalled stream (upstream_timeout), the cut stream (upstream_died), the client that left.
    assert outcomes == {
        "upstream_error": 6,
        "ok": 9,
        "upstream_timeout": 6,
        "upstream_died": 3,
        "client_disconnected": 3,
    }
