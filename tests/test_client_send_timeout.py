"""A client that stops reading a stream is cut off after ``client_send_timeout_s`` (nginx's
``send_timeout``): its upstream call is cancelled and the call recorded as ``client_too_slow``."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest

from tests.conftest import running_proxy
from tests.raw_upstream import RawUpstream, raw_upstream

EVENT = b'data: {"id":"c","object":"chat.completion.chunk","choices":[]}\n\n'
CHUNK = b"%x\r\n%s\r\n" % (len(EVENT) * 64, EVENT * 64)


async def endless_stream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: RawUpstream
) -> None:
    """An SSE answer that never ends: it stops only when the proxy closes the connection."""
    await upstream.read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    while True:
        writer.write(CHUNK)
        await writer.drain()  # raises once the proxy has closed the connection


def request(url: str) -> bytes:
    body = json.dumps({"model": "tiny", "messages": [], "stream": True}).encode()
    host = url.removeprefix("http://")
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (host.encode(), len(body), body)
    )


@pytest.mark.parametrize("plain", [False, True], ids=["tokentrail-protocol", "plain-uvicorn"])
def test_a_client_that_stops_reading_is_cut_off_and_its_upstream_call_cancelled(
    tmp_path: Path, plain: bool
) -> None:
    with (
        raw_upstream(endless_stream) as upstream,
        running_proxy(upstream.url, tmp_path, plain_uvicorn=plain, client_send_timeout_s=0.5) as proxy,
    ):
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (before connecting: it sticks)
        host, port = proxy.url.removeprefix("http://").split(":")
        client.connect((host, int(port)))
        client.sendall(request(proxy.url))
        # The client reads nothing; the proxy fills its buffers, waits the send timeout, gives up.
        assert upstream.closed.acquire(timeout=60), "the upstream call was not cancelled"
        proxy.wait_all_records()
        rows = proxy.rows("SELECT outcome, error, status_code FROM llm_calls")
        assert [r["outcome"] for r in rows] == ["client_too_slow"]
        assert rows[0]["status_code"] == 200
        client.settimeout(60)
        received = b""
        try:  # what reached the client before it was cut off, then the close (or a reset)
            while chunk := client.recv(1 << 20):
                received = (received + chunk)[-16:]
        except ConnectionResetError:
            pass
        assert not received.endswith(b"0\r\n\r\n"), "the stream was ended as if complete"
        client.close()
