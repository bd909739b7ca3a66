"""Response headers through the proxy: a relayed answer carries vLLM's ``date`` and ``server`` once (as
a client talking to vLLM directly gets them), TokenTrail's own answers carry uvicorn's, and no header
name repeats on any response except the ones that may (``set-cookie``). Under both HTTP protocols.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.conftest import running_proxy
from tests.raw_upstream import RawUpstream, raw_upstream
from tests.servers import free_socket

VLLM_DATE = b"Thu, 01 Jan 2026 00:00:00 GMT"
VLLM_HEAD = b"date: %s\r\nserver: fake-vllm\r\nset-cookie: a=1\r\nset-cookie: b=2\r\n" % VLLM_DATE
CHAT = "/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
REPEATABLE = frozenset({"set-cookie"})

JSON_BODY = b'{"id":"c","object":"chat.completion","choices":[]}'
STREAM_BODY = b'data: {"id":"c","object":"chat.completion.chunk","choices":[]}\n\ndata: [DONE]\n\n'
ANSWERS = {
    b"GET /v1/models": b"HTTP/1.1 200 OK\r\n%scontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
    b"POST /v1/chat/completions": b"HTTP/1.1 200 OK\r\n%scontent-type: application/json\r\n"
    b"content-length: " + str(len(JSON_BODY)).encode() + b"\r\n\r\n" + JSON_BODY,
    b"POST /v1/completions": b"HTTP/1.1 200 OK\r\n%scontent-type: text/event-stream\r\n"
    b"transfer-encoding: chunked\r\n\r\n" + b"%x\r\n" % len(STREAM_BODY) + STREAM_BODY + b"\r\n0\r\n\r\n",
    b"POST /v1/bad": b"HTTP/1.1 400 Bad Request\r\n%scontent-type: application/json\r\n"
    b"content-length: 2\r\n\r\n{}",
}


async def like_vllm(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: RawUpstream
) -> None:
    """Answers as vLLM (behind its uvicorn) does: its own date and server, and two cookies."""
    while request := await upstream.read_request(reader):
        request_line = b" ".join(request.split(b" ", 2)[:2])
        writer.write(ANSWERS[request_line.split(b"?")[0]].replace(b"%s", VLLM_HEAD, 1))
        await writer.drain()


def repeated(headers: list[tuple[bytes, bytes]]) -> list[str]:
    counts = Counter(name.decode().lower() for name, _ in headers)
    return [name for name, count in counts.items() if count > 1 and name not in REPEATABLE]


def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


@pytest.mark.parametrize("plain", [False, True], ids=["tokentrail-protocol", "plain-uvicorn"])
def test_relayed_answers_carry_vllms_date_and_server_once_and_no_name_repeats(
    tmp_path: Path, plain: bool
) -> None:
    calls = [
        ("GET", "/v1/models", None),
        ("POST", CHAT, BODY),  # recorded, one body
        ("POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "stream": True}),  # recorded, a stream
        ("POST", "/v1/bad", {}),  # a pass-through error
    ]
    with (
        raw_upstream(like_vllm) as upstream,
        running_proxy(upstream.url, tmp_path, plain_uvicorn=plain) as proxy,
    ):
        for method, path, body in calls:
            response = httpx.request(method, proxy.url + path, json=body, timeout=30)
            raw = response.headers.raw
            assert repeated(raw) == [], f"{method} {path}: {raw}"
            assert values(raw, b"date") == [VLLM_DATE], f"{method} {path}"
            assert values(raw, b"server") == [b"fake-vllm"], f"{method} {path}"
            assert values(raw, b"set-cookie") == [b"a=1", b"b=2"], f"{method} {path}"


@pytest.mark.parametrize("plain", [False, True], ids=["tokentrail-protocol", "plain-uvicorn"])
def test_tokentrails_own_answers_carry_uvicorns_date_and_server_once(tmp_path: Path, plain: bool) -> None:
    sock = free_socket()  # nothing listens on it: the relay answers 502 itself
    dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with running_proxy(dead, tmp_path, plain_uvicorn=plain, upstream_connect_timeout=2) as proxy:
        own = [
            httpx.get(proxy.url + "/tokentrail/health", timeout=30),
            httpx.get(proxy.url + "/tokentrail/v1/trajectories/nope", timeout=30),  # FastAPI's 404
            httpx.post(proxy.url + CHAT, json=BODY, timeout=30),  # the relay's own 502
        ]
        for response in own:
            raw = response.headers.raw
            assert repeated(raw) == [], raw
            assert len(values(raw, b"date")) == 1, raw
            assert values(raw, b"server") == [b"uvicorn"], raw
        assert own[2].status_code == 502
    sock.close()
