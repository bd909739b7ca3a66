"""The smaller guarantees of the relay: a 400 sent once unless the added flag is the cause, durable
records keep the outcome they were handed over with, local errors do not mark an upstream down, no
credentials in upstream URLs, proxy variables are said to be unused, and the fast path falls back to
plain uvicorn when uvicorn's internals are not the ones it knows."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from uvicorn.protocols.http import flow_control
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tests.conftest import running_proxy
from tests.fake_upstream import FakeUpstream
from tests.raw_upstream import RawUpstream, raw_upstream
from tests.servers import serve_in_thread
from tokentrail.proxy.recording.records import CallRecord
from tokentrail.proxy.recording.writer import RecordWriter
from tokentrail.proxy.server import uvicorn_hooks
from tokentrail.proxy.server.http_limits import limited_protocol
from tokentrail.proxy.settings import Settings
from tokentrail.proxy.upstream.client import UpstreamClient

CHAT = "/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def rejecting(flag_message: bytes, own_message: bytes) -> Any:
    """A vLLM stand-in that rejects every request with 400: with ``flag_message`` when the body has
    the proxy's flag, else with ``own_message``."""

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: RawUpstream
    ) -> None:
        while request := await upstream.read_request(reader):
            message = flag_message if b"return_token_ids" in request else own_message
            body = b'{"error":{"message":"%s","type":"BadRequestError","param":null,"code":400}}' % message
            head = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
            writer.write(head % len(body) + body)
            await writer.drain()

    return handler


def test_a_400_that_does_not_mention_the_flag_is_relayed_without_sending_again(tmp_path: Path) -> None:
    with (
        raw_upstream(
            rejecting(b"max_tokens must be at least 1", b"max_tokens must be at least 1")
        ) as upstream,
        running_proxy(upstream.url, tmp_path, learn_weight_versions=False) as proxy,
    ):
        response = httpx.post(proxy.url + CHAT, json=BODY, timeout=30)
        assert response.status_code == 400
        assert response.json()["error"]["message"] == "max_tokens must be at least 1"
        assert len(upstream.requests) == 1, "the request was sent twice"
        proxy.wait_all_records()
        assert proxy.rows("SELECT outcome FROM llm_calls") == [{"outcome": "upstream_error"}]


def test_a_400_that_mentions_the_flag_is_answered_for_the_clients_own_request(tmp_path: Path) -> None:
    with (
        raw_upstream(rejecting(b"unknown field return_token_ids", b"the client's own error")) as upstream,
        running_proxy(upstream.url, tmp_path, learn_weight_versions=False) as proxy,
    ):
        response = httpx.post(proxy.url + CHAT, json=BODY, timeout=30)
        assert response.status_code == 400
        assert response.json()["error"]["message"] == "the client's own error"
        assert len(upstream.requests) == 2
        assert b"return_token_ids" not in upstream.requests[1]


def test_a_validation_error_that_describes_the_request_is_answered_for_the_clients_own_request(
    tmp_path: Path,
) -> None:
    """vLLM's request-validation errors count the request's fields ('<dict of 2 items>')."""
    with (
        raw_upstream(
            rejecting(b"1 validation error: <dict of 2 items>", b"1 validation error: <dict of 1 items>")
        ) as upstream,
        running_proxy(upstream.url, tmp_path, learn_weight_versions=False) as proxy,
    ):
        response = httpx.post(proxy.url + CHAT, json={"model": "tiny"}, timeout=30)
        assert response.json()["error"]["message"] == "1 validation error: <dict of 1 items>"
        assert len(upstream.requests) == 2


def test_durable_records_keep_the_outcome_they_were_handed_over_with(
    fake: tuple[FakeUpstream, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client hangs up while its durable call waits for the record to be stored: the record is
    the writer's already, so its outcome must not change under the writer thread."""
    held: list[tuple[RecordWriter, CallRecord, str]] = []
    handed = threading.Event()
    submit = RecordWriter.submit

    def hold(self: RecordWriter, record: CallRecord) -> None:
        held.append((self, record, str(record.outcome)))
        handed.set()

    monkeypatch.setattr(RecordWriter, "submit", hold)
    with running_proxy(fake[1], tmp_path, durable=True) as proxy:
        client = socket.create_connection(proxy.url.removeprefix("http://").split(":"))  # type: ignore[arg-type]
        body = b'{"model":"tiny","messages":[],"max_tokens":2}'
        client.sendall(
            b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (CHAT.encode(), len(body), body)
        )
        assert handed.wait(30)
        client.close()  # while the proxy waits for the store
        relay = proxy.runtime.relay
        deadline = threading.Event()
        while relay.in_flight.count and not deadline.wait(0.01):  # the call has ended (absorbed the hang-up)
            pass
        writer, record, outcome_at_hand_over = held[0]
        assert record.outcome == outcome_at_hand_over == "ok"
        submit(writer, record)
        proxy.wait_all_records()
        assert proxy.rows("SELECT outcome FROM llm_calls") == [{"outcome": "ok"}]


def test_a_local_connect_error_does_not_mark_an_upstream_down(
    fake: tuple[FakeUpstream, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def out_of_descriptors(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(UpstreamClient, "_create_connection", out_of_descriptors)
    with serve_in_thread(FakeUpstream()) as second, running_proxy(f"{fake[1]},{second}", tmp_path) as proxy:
        assert httpx.post(proxy.url + CHAT, json=BODY, timeout=30).status_code == 502
        assert [u.healthy for u in proxy.runtime.relay.balancer.upstreams] == [True, True]
        proxy.wait_all_records()
        assert proxy.rows("SELECT outcome FROM llm_calls") == [{"outcome": "upstream_unreachable"}]


def test_credentials_in_an_upstream_url_are_refused() -> None:
    with pytest.raises(ValidationError, match="must not carry credentials"):
        Settings(upstream="http://user:secret@127.0.0.1:8001")


def test_proxy_variables_are_said_to_be_unused_and_calls_go_direct(
    fake: tuple[FakeUpstream, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    caplog.set_level(logging.WARNING, logger="tokentrail.proxy.app")
    with running_proxy(fake[1], tmp_path) as proxy:
        assert httpx.post(proxy.url + CHAT, json=BODY, timeout=30, trust_env=False).status_code == 200
    said = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert said == [
        "variable=<HTTPS_PROXY> | set, but not used: TokenTrail connects to vLLM directly",
        "variable=<http_proxy> | set, but not used: TokenTrail connects to vLLM directly",
    ]


def test_the_limits_protocol_falls_back_to_plain_uvicorn_when_uvicorn_changed(
    fake: tuple[FakeUpstream, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert limited_protocol(8192, 5.0) != "httptools"
    monkeypatch.delattr(HttpToolsProtocol, "send_400_response")
    with caplog.at_level(logging.WARNING):
        assert limited_protocol(8192, 5.0) == "httptools"
    assert len([r for r in caplog.records if "plain uvicorn" in r.getMessage()]) == 1


def test_the_fast_path_falls_back_to_plain_asgi_when_uvicorns_flow_control_changed(
    fake: tuple[FakeUpstream, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(uvicorn_hooks, "_usable_cycles", {})
    monkeypatch.delattr(flow_control.FlowControl, "drain")
    caplog.set_level(logging.WARNING, logger="tokentrail.proxy.server.uvicorn_hooks")
    with running_proxy(fake[1], tmp_path) as proxy:
        for _ in range(2):
            response = httpx.post(proxy.url + CHAT, json=dict(BODY, stream=True), timeout=30)
            assert response.status_code == 200
            assert response.content.endswith(b"data: [DONE]\n\n")
    warnings = [r for r in caplog.records if "plain ASGI" in r.getMessage()]
    assert len(warnings) == 1
