"""Against the real CPU vLLM: the client sees exactly what vLLM gives, and the stored IDs are vLLM's.

Every request kind of ``tests/vllm_samples`` is sent twice, straight to vLLM and through the
proxy, in the same run, and the two answers are compared byte for byte (ids and timestamps aside).
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from tests.conftest import Proxy
from tests.fake_upstream import load_sample, sample_names

pytestmark = pytest.mark.vllm

RECORDED = ("/v1/chat/completions", "/v1/completions")
COMPLETION_SAMPLES = [n for n in sample_names() if load_sample(n).path in RECORDED]
_VOLATILE = re.compile(rb'"(id|created)":("[^"]*"|\d+)')


def _normalise(body: bytes) -> bytes:
    """Blank out what differs between two identical calls: response/tool-call ids and timestamps."""
    return _VOLATILE.sub(rb'"\1":"X"', body)


def _send(base: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        base + path,
        content=body,
        headers={"content-type": "application/json", **(headers or {})},
        timeout=120,
    )


def _with_ids(body: bytes) -> bytes:
    request = json.loads(body)
    request["return_token_ids"] = True
    return json.dumps(request).encode()


def _returned_ids(path: str, response: httpx.Response) -> tuple[list[int], dict[int, list[int]]]:
    """Prompt IDs and per-choice generated IDs from a vLLM answer that carried them."""
    prompt: list[int] = []
    generated: dict[int, list[int]] = {}
    if response.headers["content-type"].startswith("text/event-stream"):
        objects = [
            json.loads(line[6:]) for line in response.content.split(b"\n") if line.startswith(b"data: {")
        ]
    else:
        objects = [response.json()]
    for obj in objects:
        if obj.get("prompt_token_ids") and not prompt:
            prompt = obj["prompt_token_ids"]
        for choice in obj.get("choices", []):
            if path == "/v1/completions" and choice.get("prompt_token_ids") and not prompt:
                prompt = choice["prompt_token_ids"]
            generated.setdefault(choice["index"], []).extend(choice.get("token_ids") or [])
    return prompt, generated


@pytest.mark.parametrize("name", COMPLETION_SAMPLES)
def test_client_gets_what_vllm_gives_and_the_record_holds_vllms_ids(
    name: str, vllm_url: str, vllm_proxy: Proxy
) -> None:
    sample = load_sample(name)
    _send(vllm_url, sample.path, sample.request)  # warm vLLM's prefix cache: both calls below hit it
    # bf16 on CPU is not bit-reproducible between runs of one request (a late greedy tie can flip), so a
    # pair of answers that differ is tried again; a real difference made by the proxy fails every pair.
    for attempt in range(3):
        direct = _send(vllm_url, sample.path, sample.request)
        proxied = _send(vllm_proxy.url, sample.path, sample.request, {"X-Trajectory-Id": name})
        assert proxied.status_code == direct.status_code
        assert proxied.headers["content-type"] == direct.headers["content-type"]
        if _normalise(proxied.content) == _normalise(direct.content) or attempt == 2:
            break
    assert _normalise(proxied.content) == _normalise(direct.content)

    vllm_proxy.wait_all_records()
    call = vllm_proxy.rows(
        "SELECT * FROM llm_calls WHERE trajectory_id = :t ORDER BY seq DESC LIMIT 1", t=name
    )[0]
    if direct.status_code != 200:
        assert call["outcome"] == "upstream_error"
        assert call["status_code"] == direct.status_code
        return
    assert call["outcome"] == "ok"
    request: dict[str, Any] = json.loads(sample.request)
    stream = request.get("stream") is True
    include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
    assert call["integrity"] == ("no_usage" if stream and not include_usage else "ok")

    choices = vllm_proxy.rows(
        "SELECT choice_index, token_ids, logprobs FROM completions WHERE call_id = :c ORDER BY choice_index",
        c=call["id"],
    )
    stored = {c["choice_index"]: json.loads(c["token_ids"]) for c in choices}
    if request.get("return_token_ids"):  # the client got the IDs: they are what was stored
        prompt, generated = _returned_ids(sample.path, proxied)
    else:  # ask vLLM itself for the IDs of the same request (again, as generation may not repeat)
        for _ in range(3):
            prompt, generated = _returned_ids(
                sample.path, _send(vllm_url, sample.path, _with_ids(sample.request))
            )
            if generated == stored:
                break
    assert json.loads(call["prompt_token_ids"]) == prompt
    assert stored == generated
    if request.get("logprobs"):
        for choice in choices:
            assert len(json.loads(choice["logprobs"])) == len(json.loads(choice["token_ids"]))


def test_stored_prompt_ids_equal_vllms_tokenize(vllm_url: str, vllm_proxy: Proxy) -> None:
    messages = [{"role": "user", "content": "Tokenize me, exactly as vLLM does."}]
    tokenized = httpx.post(
        vllm_url + "/tokenize",
        json={"model": "tiny", "messages": messages, "add_generation_prompt": True},
    ).json()["tokens"]
    httpx.post(
        vllm_proxy.url + "/v1/chat/completions",
        json={"model": "tiny", "messages": messages, "max_tokens": 2},
        timeout=60,
    )
    prompt = {"model": "tiny", "prompt": "def tokenize(text):", "max_tokens": 2}
    httpx.post(vllm_proxy.url + "/v1/completions", json=prompt, timeout=60)
    text_tokens = httpx.post(vllm_url + "/tokenize", json={"model": "tiny", "prompt": prompt["prompt"]})
    vllm_proxy.wait_records(2)
    rows = vllm_proxy.rows("SELECT route, prompt_token_ids FROM llm_calls ORDER BY received_at")
    assert json.loads(rows[0]["prompt_token_ids"]) == tokenized
    assert json.loads(rows[1]["prompt_token_ids"]) == text_tokens.json()["tokens"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/models", None),
        ("GET", "/health", None),
        ("GET", "/version", None),
        ("POST", "/tokenize", {"model": "tiny", "prompt": "hello world"}),
        ("POST", "/detokenize", {"model": "tiny", "tokens": [322, 606, 82]}),
        ("GET", "/no/such/path", None),
        ("DELETE", "/v1/models", None),
    ],
)
def test_unrecorded_routes_pass_through_unchanged(
    vllm_url: str, vllm_proxy: Proxy, method: str, path: str, body: Any
) -> None:
    direct = httpx.request(method, vllm_url + path, json=body)
    proxied = httpx.request(method, vllm_proxy.url + path, json=body)
    assert proxied.status_code == direct.status_code
    assert _normalise(proxied.content) == _normalise(direct.content)
    assert proxied.headers.get("content-type") == direct.headers.get("content-type")


def test_metrics_pass_through(vllm_url: str, vllm_proxy: Proxy) -> None:
    proxied = httpx.get(vllm_proxy.url + "/metrics")
    assert proxied.status_code == 200
    assert b"vllm:" in proxied.content
    assert proxied.headers["content-type"] == httpx.get(vllm_url + "/metrics").headers["content-type"]


_TEN_MB = b'{"model":"tiny","messages":[{"role":"user","content":"' + b"a" * 10_000_000 + b'"}]}'


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"model":"tiny","messages":5}',
        b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":"many"}',
        b'{"model":"tiny","messages":[{"role":"user","content":"\xff\xfe"}]}',
        b"[]",
        _TEN_MB,
    ],
    ids=["invalid-json", "wrong-type", "wrong-param-type", "non-utf8", "array", "10MB"],
)
def test_bad_bodies_get_vllms_own_answer_and_the_proxy_keeps_serving(
    vllm_url: str, vllm_proxy: Proxy, body: bytes
) -> None:
    direct = _send(vllm_url, "/v1/chat/completions", body)
    proxied = _send(vllm_proxy.url, "/v1/chat/completions", body)
    assert 400 <= proxied.status_code < 500
    assert proxied.status_code == direct.status_code
    assert _normalise(proxied.content) == _normalise(direct.content)
    vllm_proxy.wait_records(1)
    (row,) = vllm_proxy.rows("SELECT outcome, status_code FROM llm_calls")
    assert row == {"outcome": "upstream_error", "status_code": direct.status_code}
    assert httpx.get(vllm_proxy.url + "/tokentrail/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
    ],
)
def test_relayed_answers_carry_the_header_names_vllm_sends_once_each(
    vllm_url: str, vllm_proxy: Proxy, method: str, path: str, body: Any
) -> None:
    direct = httpx.request(method, vllm_url + path, json=body)
    proxied = httpx.request(method, vllm_proxy.url + path, json=body)
    names = sorted(name.lower() for name, _ in proxied.headers.raw)
    assert names == sorted(name.lower() for name, _ in direct.headers.raw)
    assert names.count(b"date") == names.count(b"server") == 1
