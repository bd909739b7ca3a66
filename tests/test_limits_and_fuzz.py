"""Limits (body size, open calls) and a property-based fuzz of what clients can send."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Proxy, ProxyFactory
from tests.fake_upstream import FakeUpstream

CHAT = "/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
PROXY_ERRORS = {"BadGatewayError", "GatewayTimeoutError", "ServiceUnavailableError", "InternalServerError"}


@pytest.fixture
def small_proxy(fake: tuple[FakeUpstream, str], proxy_factory: ProxyFactory) -> Iterator[Proxy]:
    with proxy_factory(fake[1], max_body_bytes=1000, max_concurrent_calls=2) as proxy:
        yield proxy


def test_a_body_over_the_limit_gets_413_whether_its_length_is_announced_or_not(small_proxy: Proxy) -> None:
    big = json.dumps({**BODY, "padding": "x" * 2000}).encode()
    announced = httpx.post(small_proxy.url + CHAT, content=big, headers={"content-type": "application/json"})
    assert announced.status_code == 413
    assert announced.json()["error"]["code"] == 413
    chunked = httpx.post(small_proxy.url + CHAT, content=iter([big[:600], big[600:]]))
    assert chunked.status_code == 413
    assert httpx.post(small_proxy.url + CHAT, json=BODY).status_code == 200


def test_calls_over_the_concurrency_limit_get_503_at_once_and_the_others_finish(
    fake: tuple[FakeUpstream, str], small_proxy: Proxy
) -> None:
    upstream, _ = fake
    results: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                httpx.post(
                    small_proxy.url + CHAT, json=BODY, headers={"x-fake": "gate"}, timeout=30
                ).status_code
            )
        )
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for _ in threads:
        assert upstream.hanging.acquire(timeout=10)
    refused = httpx.post(small_proxy.url + CHAT, json=BODY)
    assert refused.status_code == 503
    assert refused.json()["error"]["type"] == "ServiceUnavailableError"
    upstream.gate.set()
    for thread in threads:
        thread.join(30)
    assert results == [200, 200]
    small_proxy.wait_all_records()
    assert small_proxy.runtime.writer.written == 2


# What an HTTP client can send at all: printable ASCII without surrounding spaces (httpx refuses the rest;
# control characters are refused by uvicorn's parser before the app, see test_relay_fake).
header_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300).map(str.strip)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
body = st.one_of(
    st.binary(max_size=300),
    json_value.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"model": st.just("tiny"), "messages": json_value},
        optional={
            "stream": json_value,
            "max_tokens": json_value,
            "n": json_value,
            "return_token_ids": json_value,
        },
    ).map(lambda v: json.dumps(v).encode()),
)
path = st.sampled_from(
    [CHAT, "/v1/completions", "/v1/models", "/t/x/v1/chat/completions", "/nope"]
) | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="?#"), max_size=40).map(
    lambda p: "/" + p
)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same inputs on every run: CI stays reproducible
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    path=path,
    content=body,
    trajectory=header_value,
    tags=header_value,
)
def test_no_input_makes_the_proxy_fail(
    fake_proxy: Proxy, method: str, path: str, content: bytes, trajectory: str, tags: str
) -> None:
    headers = {"content-type": "application/json", "X-Trajectory-Id": trajectory, "X-Trajectory-Tags": tags}
    response = httpx.request(method, fake_proxy.url + path, content=content, headers=headers, timeout=30)
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text
    if response.status_code >= 400 and response.headers.get("content-type") == "application/json":
        error = response.json().get("error") if isinstance(response.json(), dict) else None
        assert not isinstance(error, dict) or error.get("type") not in PROXY_ERRORS
    assert httpx.get(fake_proxy.url + "/tokentrail/health").json()["status"] == "ok"


def _raw_exchange(url: str, data: bytes, *, wait_s: float = 15.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the proxy closes it."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


@pytest.fixture
def strict_proxy(fake: tuple[FakeUpstream, str], proxy_factory: ProxyFactory) -> Iterator[Proxy]:
    with proxy_factory(
        fake[1], max_header_bytes=8192, client_header_timeout_s=0.5, client_body_timeout_s=0.5
    ) as proxy:
        yield proxy


def _error(answer: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


def test_a_request_head_over_the_limit_gets_431_and_the_proxy_keeps_serving(strict_proxy: Proxy) -> None:
    answer = _raw_exchange(
        strict_proxy.url, b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 200_000 + b"\r\n\r\n"
    )
    status, error = _error(answer)
    assert status == 431
    assert error["code"] == 431
    assert httpx.get(strict_proxy.url + "/tokentrail/health").status_code == 200


def test_a_big_body_behind_a_small_head_is_not_mistaken_for_a_big_head(strict_proxy: Proxy) -> None:
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "a" * 500_000}]})
    response = httpx.post(strict_proxy.url + "/v1/chat/completions", content=body)
    assert response.status_code == 200


def test_a_client_that_sends_its_head_too_slowly_gets_408(strict_proxy: Proxy) -> None:
    status, error = _error(
        _raw_exchange(strict_proxy.url, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
    )
    assert status == 408
    assert error["type"] == "RequestTimeoutError"


def test_a_client_that_stops_sending_its_body_gets_408_and_nothing_is_recorded(strict_proxy: Proxy) -> None:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    answer = _raw_exchange(strict_proxy.url, head + b'content-length: 1000\r\n\r\n{"model":')
    status, _error_body = _error(answer.replace(b"\r\n0\r\n\r\n", b""))
    assert status == 408
    assert strict_proxy.rows("SELECT count(*) AS n FROM llm_calls") == [{"n": 0}]


def test_a_head_over_the_limit_that_arrives_whole_in_one_read_gets_431(strict_proxy: Proxy) -> None:
    head = b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 20_000 + b"\r\n\r\n"  # (8 KiB limit)
    status, error = _error(_raw_exchange(strict_proxy.url, head))
    assert status == 431
    assert error["type"] == "RequestHeaderFieldsTooLargeError"
