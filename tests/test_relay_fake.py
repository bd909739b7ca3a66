"""The proxy against a fake upstream, for what a real vLLM cannot be made to do on demand."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import Proxy, ProxyFactory, running_proxy
from tests.fake_upstream import FakeUpstream
from tests.servers import free_socket
from tokentrail.proxy.server.uvicorn_hooks import DirectBody, RequestHooks

CHAT = "/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(params=["tokentrail-protocol", "plain-uvicorn"])
def fake_proxy(
    request: pytest.FixtureRequest, fake: tuple[FakeUpstream, str], tmp_path: Path
) -> Iterator[Proxy]:
    """Every test here under both servers: under TokenTrail's own protocol the relay writes stream
    chunks straight to the client's socket (``uvicorn_hooks``), under plain uvicorn through ASGI."""
    with running_proxy(fake[1], tmp_path, plain_uvicorn=request.param == "plain-uvicorn") as proxy:
        yield proxy


def test_streams_take_the_direct_path_only_under_tokentrails_protocol(
    fake: tuple[FakeUpstream, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[bytes] = []
    original = DirectBody.write

    def counted(self: DirectBody, data: bytes) -> bool:
        writes.append(data)
        return original(self, data)

    monkeypatch.setattr(DirectBody, "write", counted)
    body = dict(BODY, stream=True)
    expected: list[bytes] = []
    for plain in (False, True):
        with running_proxy(fake[1], tmp_path / str(plain), plain_uvicorn=plain) as proxy:
            response = httpx.post(proxy.url + CHAT, json=body, timeout=30)
            assert response.status_code == 200
            assert response.content.endswith(b"data: [DONE]\n\n")
            if not plain:
                assert b"".join(writes) == response.content
                expected = list(writes)
            else:
                assert writes == expected, "plain uvicorn must not take the direct path"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "body"])
def test_a_client_that_did_not_ask_for_token_ids_gets_the_bytes_vllm_sends_without_the_flag(
    fake_proxy: Proxy, fake: tuple[FakeUpstream, str], stream: bool
) -> None:
    """The proxy adds ``return_token_ids`` upstream; the client must not see what that added (token
    IDs in every chunk, prompt IDs in the first), while the record keeps them."""
    body = dict(BODY, stream=stream, stream_options={"include_usage": True}) if stream else BODY
    direct = httpx.post(fake[1] + CHAT, json=body, timeout=30).content
    proxied = httpx.post(fake_proxy.url + CHAT, json=body, timeout=30).content
    assert b'"token_ids":[' in httpx.post(fake[1] + CHAT, json=dict(body, return_token_ids=True)).content
    assert proxied == direct
    fake_proxy.wait_records(1)
    (row,) = fake_proxy.rows(
        "SELECT c.integrity, d.token_ids FROM llm_calls c JOIN completions d ON d.call_id = c.id"
    )
    assert row["integrity"] == "ok"
    assert json.loads(row["token_ids"]) == [100, 107, 114, 121]


def test_passthrough_keeps_method_path_query_body_and_drops_hop_by_hop(fake_proxy: Proxy) -> None:
    response = httpx.request(
        "PUT",
        fake_proxy.url + "/some/where?b=2&a=%20x",
        content=b"\x00\x01binary",
        headers={
            "X-Custom": "kept",
            "Connection": "keep-alive, x-hop",
            "X-Hop": "dropped",
            "X-Trajectory-Id": "traj",
            "Proxy-Authorization": "Basic secret",
        },
    )
    assert response.status_code == 200
    echo = response.json()
    assert echo["method"] == "PUT"
    assert echo["path"] == "/some/where"
    assert echo["query"] == "b=2&a=%20x"
    assert echo["body"] == "\x00\x01binary"
    headers = echo["headers"]
    assert headers["x-custom"] == "kept"
    for gone in ("x-hop", "x-trajectory-id", "proxy-authorization", "keep-alive"):
        assert gone not in headers
    assert headers["host"] != urlsplit(fake_proxy.url).netloc


def test_path_prefix_routes_like_v1_and_is_removed(fake_proxy: Proxy) -> None:
    response = httpx.get(fake_proxy.url + "/t/run%2F7/v1/models?x=1")
    assert response.json()["path"] == "/v1/models"
    chat = httpx.post(fake_proxy.url + "/t/run%2F7" + CHAT, json=BODY)
    assert chat.status_code == 200
    fake_proxy.wait_records(1)
    (row,) = fake_proxy.rows("SELECT trajectory_id, seq FROM llm_calls")
    assert row == {"trajectory_id": "run/7", "seq": 0}


def test_upstream_error_status_passes_through_and_is_recorded(fake_proxy: Proxy) -> None:
    response = httpx.post(fake_proxy.url + CHAT, json=BODY, headers={"x-fake": "status:503"})
    assert response.status_code == 503
    assert response.json()["error"]["message"] == "fake failure"
    fake_proxy.wait_records(1)
    (row,) = fake_proxy.rows("SELECT status_code, outcome, error, integrity FROM llm_calls")
    assert row == {
        "status_code": 503,
        "outcome": "upstream_error",
        "error": "fake failure",
        "integrity": "not_checked",
    }


def test_unreachable_upstream_answers_502_in_openai_shape(proxy_factory: ProxyFactory) -> None:
    closed = free_socket()
    port = closed.getsockname()[1]
    closed.close()
    with proxy_factory(f"http://127.0.0.1:{port}") as proxy:
        response = httpx.post(proxy.url + CHAT, json=BODY, headers={"X-Trajectory-Id": "t"})
        models = httpx.get(proxy.url + "/v1/models")
        proxy.wait_records(1)
        (row,) = proxy.rows("SELECT status_code, outcome FROM llm_calls")
    assert response.status_code == 502
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == 502
    assert "Traceback" not in response.text
    assert models.status_code == 502
    assert row == {"status_code": 502, "outcome": "upstream_unreachable"}


def test_silent_upstream_times_out_with_504_and_is_recorded(
    fake: tuple[FakeUpstream, str], proxy_factory: ProxyFactory
) -> None:
    upstream, url = fake
    with proxy_factory(url, upstream_read_timeout=0.5) as proxy:
        response = httpx.post(proxy.url + CHAT, json=BODY, headers={"x-fake": "hang"}, timeout=30)
        proxy.wait_records(1)
        (row,) = proxy.rows("SELECT status_code, outcome FROM llm_calls")
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "GatewayTimeoutError"
    assert row == {"status_code": 504, "outcome": "upstream_timeout"}
    assert upstream.cancelled.acquire(timeout=10), "the upstream request was not closed"


def test_upstream_dying_mid_stream_truncates_the_stream_and_records_what_came(
    fake_proxy: Proxy,
) -> None:
    body = dict(BODY, stream=True, return_token_ids=True, max_tokens=6)
    received: list[bytes] = []

    def read_all() -> None:
        headers = {"x-fake": "die-mid-stream"}
        with httpx.stream("POST", fake_proxy.url + CHAT, json=body, headers=headers) as response:
            received.extend(response.iter_raw())

    with pytest.raises(httpx.RemoteProtocolError):
        read_all()
    assert b"".join(received).count(b"data: ") == 3
    fake_proxy.wait_records(1)
    (row,) = fake_proxy.rows(
        "SELECT c.outcome, c.integrity, d.token_ids FROM llm_calls c JOIN completions d ON d.call_id = c.id"
    )
    assert row["outcome"] == "upstream_died"
    assert row["integrity"] == "not_checked"
    assert json.loads(row["token_ids"]) == [100, 107]


def _open_request(url: str, body: dict[str, object], headers: dict[str, str]) -> socket.socket:
    """Send a request on a raw socket, so the test can hang up whenever it wants."""
    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    lines = [
        f"POST {CHAT} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
    ] + [f"{k}: {v}" for k, v in headers.items()]
    sock = socket.create_connection((parts.hostname, parts.port))
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
    return sock


def test_client_disconnect_before_first_byte_cancels_upstream_and_records_once(
    fake: tuple[FakeUpstream, str], fake_proxy: Proxy
) -> None:
    upstream, _ = fake
    sock = _open_request(fake_proxy.url, BODY, {"x-fake": "hang", "X-Trajectory-Id": "gone"})
    assert upstream.hanging.acquire(timeout=10), "the call never reached the upstream"
    sock.close()
    assert upstream.cancelled.acquire(timeout=10), "the upstream request was not cancelled"
    fake_proxy.wait_records(1)
    (row,) = fake_proxy.rows("SELECT trajectory_id, outcome FROM llm_calls")
    assert row == {"trajectory_id": "gone", "outcome": "client_disconnected"}
    assert fake_proxy.runtime.writer.written == 1


def test_client_disconnect_mid_stream_cancels_upstream_and_keeps_prompt_ids(
    fake: tuple[FakeUpstream, str], fake_proxy: Proxy
) -> None:
    upstream, _ = fake
    body = dict(BODY, stream=True)
    sock = _open_request(fake_proxy.url, body, {"x-fake": "hang-stream"})
    first = b""
    while b"data: " not in first:
        first += sock.recv(65536)
    assert upstream.hanging.acquire(timeout=10)
    sock.close()
    assert upstream.cancelled.acquire(timeout=10), "the upstream stream was not cancelled"
    fake_proxy.wait_records(1)
    (row,) = fake_proxy.rows("SELECT outcome, json_array_length(prompt_token_ids) AS n FROM llm_calls")
    assert row == {"outcome": "client_disconnected", "n": 15}


def test_redirects_are_passed_back_not_followed(fake_proxy: Proxy) -> None:
    response = httpx.post(fake_proxy.url + CHAT, json=BODY, headers={"x-fake": "redirect"})
    assert response.status_code == 307
    assert response.headers["location"] == "http://127.0.0.2:9/v1/chat/completions"


def test_200_concurrent_calls_over_20_trajectories_give_200_rows_and_gapless_seq(
    fake_proxy: Proxy,
) -> None:
    async def run() -> list[int]:
        limit = asyncio.Semaphore(32)
        async with httpx.AsyncClient(timeout=60) as client:

            async def one(i: int) -> int:
                body = dict(BODY, stream=i % 2 == 0, n=1 + i % 3, max_tokens=3 + i % 5)
                if i % 2 == 0:
                    body["stream_options"] = {"include_usage": True}
                async with limit:
                    response = await client.post(
                        fake_proxy.url + CHAT, json=body, headers={"X-Trajectory-Id": f"traj-{i % 20}"}
                    )
                    return response.status_code

            return await asyncio.gather(*(one(i) for i in range(200)))

    statuses = asyncio.run(run())
    assert statuses == [200] * 200
    fake_proxy.wait_records(200)
    rows = fake_proxy.rows("SELECT trajectory_id, seq, integrity FROM llm_calls")
    assert len(rows) == 200
    by_trajectory: dict[str, list[int]] = {}
    for row in rows:
        by_trajectory.setdefault(row["trajectory_id"], []).append(row["seq"])
    assert len(by_trajectory) == 20
    assert all(sorted(seqs) == list(range(10)) for seqs in by_trajectory.values())
    assert {row["integrity"] for row in rows} == {"ok"}
    (totals,) = fake_proxy.rows("SELECT sum(call_count) AS calls, count(*) AS n FROM trajectories")
    assert totals == {"calls": 200, "n": 20}


@pytest.mark.parametrize(
    "value",
    ["x" * 300, "tab\tid", ""],
    ids=["300-chars", "tab", "empty"],
)
def test_bad_trajectory_id_gets_a_400_in_openai_shape(fake_proxy: Proxy, value: str) -> None:
    response = httpx.post(fake_proxy.url + CHAT, json=BODY, headers={"X-Trajectory-Id": value})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "X-Trajectory-Id"
    assert httpx.get(fake_proxy.url + "/tokentrail/health").status_code == 200


def test_control_character_in_trajectory_id_gets_a_400(fake_proxy: Proxy) -> None:
    # uvicorn's HTTP parser refuses control characters in header values before the app runs.
    response = httpx.post(fake_proxy.url + CHAT, json=BODY, headers={"X-Trajectory-Id": "bad\x01id"})
    assert response.status_code == 400
    in_path = httpx.post(fake_proxy.url + "/t/bad%01id" + CHAT, json=BODY)
    assert in_path.status_code == 400
    assert in_path.json()["error"]["type"] == "BadRequestError"
    assert httpx.get(fake_proxy.url + "/tokentrail/health").status_code == 200


def test_non_utf8_trajectory_id_gets_a_400(fake_proxy: Proxy) -> None:
    response = httpx.post(fake_proxy.url + CHAT, json=BODY, headers={"X-Trajectory-Id": b"\xff\xfe"})
    assert response.status_code == 400
    bad_path = httpx.post(fake_proxy.url + "/t/%01x" + CHAT, json=BODY)
    assert bad_path.status_code == 400


def test_health_reports_writer_counts(fake_proxy: Proxy) -> None:
    httpx.post(fake_proxy.url + CHAT, json=BODY)
    fake_proxy.wait_records(1)
    health = httpx.get(fake_proxy.url + "/tokentrail/health").json()
    assert health["status"] == "ok"
    assert health["writer"]["records_written"] == 1
    assert health["writer"]["records_failed"] == 0
    assert health["writer"]["integrity"] == {"ok": 1}


def test_hooks_stay_off_for_a_uvicorn_cycle_they_do_not_know(caplog: pytest.LogCaptureFixture) -> None:
    class StrangeCycle:
        transport = flow = None  # no response_started, chunked_encoding, ...

    with caplog.at_level("WARNING"):
        assert RequestHooks.for_cycle(StrangeCycle()) is None
        assert RequestHooks.for_cycle(StrangeCycle()) is None
    assert len([r for r in caplog.records if "plain ASGI" in r.getMessage()]) == 1


def test_a_slow_stream_reader_pauses_the_upstream_and_still_gets_every_byte(
    fake: tuple[FakeUpstream, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    behind = threading.Event()
    original = DirectBody.write

    def watched(self: DirectBody, data: bytes) -> bool:
        more = original(self, data)
        if not more:
            behind.set()  # the client's socket is full: the relay pauses reading from the upstream
        return more

    monkeypatch.setattr(DirectBody, "write", watched)
    size = 40_000_000
    with running_proxy(fake[1], tmp_path) as proxy:
        # 64 tokens of about 300 KB each: small enough steps for the pause to show
        sock = _open_request(proxy.url, dict(BODY, stream=True, max_tokens=64), {"x-fake": f"big:{size}"})
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        assert behind.wait(30), "the proxy never saw its client fall behind"
        # While the client reads nothing, the upstream cannot hand over the whole answer: the relay
        # stopped reading it (a relay that ignored backpressure would buffer all 40 MB in memory).
        assert not fake[0].stream_finished.wait(2), (
            "the upstream sent everything to a client that reads nothing"
        )
        held = fake[0].streamed_bytes
        print(f"held back: upstream had sent {held} of {size} bytes")
        assert held < size // 2
        received = bytearray()
        with sock:
            while not received.endswith(b"0\r\n\r\n"):
                chunk = sock.recv(1 << 20)
                assert chunk, "the proxy closed the stream early"
                received += chunk
        proxy.wait_records(1)
        (row,) = proxy.rows(
            "SELECT c.outcome, json_array_length(d.token_ids) AS n "
            "FROM llm_calls c JOIN completions d ON d.call_id = c.id"
        )
    assert len(received) > size
    assert b"data: [DONE]" in received
    assert row == {"outcome": "ok", "n": 64}
