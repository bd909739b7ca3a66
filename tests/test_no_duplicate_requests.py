"""The re-send rule, through the proxy, against an upstream on a raw socket: a request vLLM may have
processed is never sent twice; one it cannot have seen (a stale keep-alive connection) is re-sent once.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Proxy, running_proxy
from tests.raw_upstream import RawUpstream, ok_json, raw_upstream
from tokentrail.proxy import app as app_module
from tokentrail.proxy.upstream.client import UpstreamClient

CHAT = "/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
ANSWER = ok_json(b'{"id":"c","object":"chat.completion","choices":[]}')
WORK_S = 0.5  # how long the upstream "works" on a request before it dies (longer than the stale window)


def scripted(*actions: str) -> Any:
    """Handle the upstream's requests in order, across connections: ``answer`` it; ``work-and-die``:
    read it, work ``WORK_S``, drop the connection; ``drop-unread``: drop the connection as soon as
    the request arrives, without reading it (a keep-alive connection the server was closing)."""
    queue = list(actions)

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: RawUpstream
    ) -> None:
        while queue:
            action = queue[0]
            if action == "drop-unread":
                if not await reader.read(1):
                    return
                queue.pop(0)
                return
            if not await upstream.read_request(reader):
                return
            queue.pop(0)
            if action == "work-and-die":
                await asyncio.sleep(WORK_S)  # the scenario (vLLM busy), not synchronisation
                return
            writer.write(ANSWER)
            await writer.drain()
        await reader.read()

    return handler


@pytest.fixture(params=["tokentrail-protocol", "plain-uvicorn"])
def plain(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "plain-uvicorn")


@pytest.fixture
def generous_stale_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stale-connection window no slow machine can outlast, for the tests where the close must
    count as stale."""
    made = app_module.upstream_client

    def client(settings: Any) -> UpstreamClient:
        built = made(settings)
        built.stale_window_s = 30.0
        return built

    monkeypatch.setattr(app_module, "upstream_client", client)


def proxy_for(upstream: RawUpstream, tmp_path: Path, plain: bool) -> AbstractContextManager[Proxy]:
    # a scripted upstream answers only what the test scripts: no GET /weight_info from the RL loop
    return running_proxy(upstream.url, tmp_path, plain_uvicorn=plain, learn_weight_versions=False)


def outcomes(proxy: Proxy) -> list[str]:
    proxy.wait_all_records()
    return [r["outcome"] for r in proxy.rows("SELECT outcome FROM llm_calls ORDER BY received_at")]


def test_a_post_dropped_on_a_new_connection_is_sent_once_and_answered_502(
    tmp_path: Path, plain: bool
) -> None:
    with raw_upstream(scripted("work-and-die")) as upstream, proxy_for(upstream, tmp_path, plain) as proxy:
        response = httpx.post(proxy.url + CHAT, json=BODY, timeout=30)
        assert response.status_code == 502
        assert response.json()["error"]["type"] == "BadGatewayError"
        assert len(upstream.requests) == 1, "the request was sent again"
        assert upstream.connections == 1
        assert outcomes(proxy) == ["upstream_died"]


def test_a_post_dropped_on_a_reused_connection_after_work_is_not_sent_again(
    tmp_path: Path, plain: bool
) -> None:
    with (
        raw_upstream(scripted("answer", "work-and-die")) as upstream,
        proxy_for(upstream, tmp_path, plain) as proxy,
        httpx.Client(timeout=30) as client,
    ):
        assert client.post(proxy.url + CHAT, json=BODY).status_code == 200
        assert client.post(proxy.url + CHAT, json=BODY).status_code == 502
        assert len(upstream.requests) == 2, "the second call's request reached the upstream twice"
        assert upstream.connections == 1, "the second call was sent again on a new connection"
        assert outcomes(proxy) == ["ok", "upstream_died"]


@pytest.mark.usefixtures("generous_stale_window")
def test_a_stale_keepalive_connection_is_retried_once_on_a_new_one(tmp_path: Path, plain: bool) -> None:
    with (
        raw_upstream(scripted("answer", "drop-unread", "answer")) as upstream,
        proxy_for(upstream, tmp_path, plain) as proxy,
        httpx.Client(timeout=30) as client,
    ):
        assert client.post(proxy.url + CHAT, json=BODY).status_code == 200
        assert client.post(proxy.url + CHAT, json=BODY).status_code == 200
        assert len(upstream.requests) == 2  # the stale connection never read its copy
        assert upstream.connections == 2
        assert outcomes(proxy) == ["ok", "ok"]


@pytest.mark.usefixtures("generous_stale_window")
def test_a_non_idempotent_passthrough_is_never_resent_even_on_a_stale_connection(
    tmp_path: Path, plain: bool
) -> None:
    with (
        raw_upstream(scripted("answer", "drop-unread", "answer")) as upstream,
        proxy_for(upstream, tmp_path, plain) as proxy,
        httpx.Client(timeout=30) as client,
    ):
        assert client.post(proxy.url + "/v1/load_lora_adapter", json={"lora_name": "a"}).status_code == 200
        assert client.post(proxy.url + "/v1/load_lora_adapter", json={"lora_name": "b"}).status_code == 502
        assert upstream.connections == 1, "a non-idempotent pass-through was sent again"
        assert client.get(proxy.url + "/v1/models").status_code == 200  # (the next call is served)
