"""capture.py on the real vLLM samples: token IDs, messages, integrity, and flag-less restoration."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fake_upstream import SAMPLES, load_sample, sample_names, sse_events
from tokentrail.proxy.recording.capture import (
    CHAT_ROUTE,
    COMPLETIONS_ROUTE,
    ClientAsk,
    RawAnswer,
    ResponseCapture,
    StreamTap,
    prepare_request,
    read_raw_answer,
    strip_token_ids,
)
from tokentrail.proxy.recording.records import CallRecord, Integrity

STREAM_SAMPLES = [
    n
    for n in sample_names()
    if load_sample(n).status == 200 and load_sample(n).content_type.startswith("text/event-stream")
]
_ID = re.compile(rb'"id":"[^"]*"')


def _capture(name: str, splits: list[int] | None = None) -> tuple[CallRecord, bytes]:
    sample = load_sample(name)
    prepared = prepare_request(sample.path, sample.request)
    record = CallRecord("c", "t", sample.path, 0.0)
    capture = ResponseCapture(record, prepared.ask, chat=sample.path == CHAT_ROUTE)
    out = b""
    if sample.content_type.startswith("text/event-stream"):
        tap = StreamTap(capture, strip=False)
        cuts = [0, *(splits or []), len(sample.response)]
        for start, end in itertools.pairwise(cuts):
            out += tap.feed(sample.response[start:end])
        tap.close()
    else:
        capture.feed_body(sample.response)
        out = sample.response
    capture.finish(True)
    record.load_prompt_ids()  # as the writer does (a long prompt stays text until then)
    return record, out


@pytest.mark.parametrize("name", STREAM_SAMPLES)
def test_stream_capture_is_identical_for_every_split_point(name: str) -> None:
    whole, _ = _capture(name)
    size = len(load_sample(name).response)
    for cut in range(1, size, max(1, size // 300)):
        split, out = _capture(name, [cut])
        assert split == whole, f"split at byte {cut} changed the record"
        assert out == load_sample(name).response


@pytest.mark.parametrize(
    "name",
    [
        n
        for n in sample_names()
        if load_sample(n).status == 200
        and load_sample(n).path in (CHAT_ROUTE, COMPLETIONS_ROUTE)
        and json.loads(load_sample(n).request).get("return_token_ids") is True
    ],
)
def test_samples_with_token_ids_and_usage_pass_integrity(name: str) -> None:
    record, _ = _capture(name)
    sample = load_sample(name)
    request = json.loads(sample.request)
    assert record.prompt_token_ids, "no prompt token IDs captured"
    for choice in record.choices:
        assert choice.token_ids, f"choice {choice.index} has no token IDs"
        assert choice.finish_reason is not None
    include_usage = (request.get("stream_options") or {}).get("include_usage")
    expected = Integrity.OK if (not request.get("stream") or include_usage) else Integrity.NO_USAGE
    assert record.integrity == expected


def test_tool_call_deltas_are_assembled_into_one_call() -> None:
    sample = load_sample("06e_tools_named_strict_stream")
    arguments = ""
    for event in sse_events(sample.response):
        data = event[len(b"data: ") :].strip()
        if data.startswith(b"{"):
            for choice in json.loads(data)["choices"]:
                for call in choice.get("delta", {}).get("tool_calls") or []:
                    arguments += call.get("function", {}).get("arguments") or ""
    streamed, _ = _capture(sample.name)
    calls = streamed.choices[0].message["tool_calls"]
    assert len(calls) == 1
    assert calls[0]["function"] == {"name": "get_weather", "arguments": arguments}
    assert set(json.loads(arguments)) == {"city", "unit"}  # split over many deltas, whole again
    assert calls[0]["id"].startswith("chatcmpl-tool-")
    assert streamed.choices[0].finish_reason == "stop"  # vLLM's reason for a named tool choice


def test_n2_stream_keeps_choices_apart() -> None:
    record, _ = _capture("05b_chat_stream_n2_token_ids")
    assert [c.index for c in record.choices] == [0, 1]
    assert record.choices[0].token_ids == [1397, 3917, 2767]
    assert record.choices[1].token_ids == [1632, 2284, 2936]
    assert record.choices[1].message["content"] == " ),umberlogits"


def test_logprobs_one_entry_per_token() -> None:
    record, _ = _capture("04b_chat_stream_logprobs_token_ids")
    choice = record.choices[0]
    assert choice.logprobs is not None
    assert len(choice.logprobs) == len(choice.token_ids) == 3
    assert record.integrity == Integrity.OK


def _normalise(body: bytes) -> bytes:
    return _ID.sub(b'"id":"X"', body)


@pytest.mark.parametrize(
    ("with_ids", "plain"),
    [("02b_chat_stream_token_ids_usage", "03b_chat_stream_plain")],
)
def test_stripping_a_stream_gives_what_vllm_sends_without_the_flag(with_ids: str, plain: str) -> None:
    sample = load_sample(with_ids)
    record = CallRecord("c", "t", CHAT_ROUTE, 0.0)
    tap = StreamTap(ResponseCapture(record, ClientAsk(flag_added=True), chat=True), strip=True)
    out = b"".join(tap.feed(event) for event in sse_events(sample.response)) + tap.close()
    assert _normalise(out) == _normalise(load_sample(plain).response)


def test_stripping_drops_chunks_that_exist_only_for_the_flag() -> None:
    sample = load_sample("08a_partial_utf8_stream")
    record = CallRecord("c", "t", CHAT_ROUTE, 0.0)
    tap = StreamTap(ResponseCapture(record, ClientAsk(flag_added=True), chat=True), strip=True)
    out = tap.feed(sample.response) + tap.close()
    tap.capture.finish(True)
    flag_only = sample.response.count(b'"delta":{}')  # token IDs of a partial UTF-8 character
    assert flag_only > 0, "the sample no longer shows a partial character: recapture it"
    assert b'"delta":{}' not in out
    assert out.count(b"data: ") == len(sse_events(sample.response)) - flag_only
    assert sum(len(c.token_ids) for c in record.choices) == 8


def test_strip_token_ids_on_a_body() -> None:
    body = load_sample("01_chat_nonstream_token_ids").response
    plain = load_sample("03a_chat_nonstream_plain").response
    assert _normalise(strip_token_ids(body)) == _normalise(plain)


def test_strip_ignores_token_ids_text_inside_strings() -> None:
    body = b'{"content":"x\\",\\"token_ids\\":[1,2]","token_ids":[5]}'
    assert strip_token_ids(body) == b'{"content":"x\\",\\"token_ids\\":[1,2]","token_ids":null}'


def test_prepare_request_adds_the_flag_and_remembers_the_ask() -> None:
    prepared = prepare_request(CHAT_ROUTE, b'{"model":"tiny","messages":[],"stream":true,"api_key":"s"}')
    assert json.loads(prepared.body)["return_token_ids"] is True
    assert prepared.ask.flag_added
    assert prepared.ask.stream
    assert not prepared.ask.token_ids
    assert prepared.request == {"model": "tiny", "messages": [], "stream": True}


@pytest.mark.parametrize("body", [b"{not json", b"[1,2]", b"\xff\xfe", b""])
def test_prepare_request_leaves_non_objects_alone(body: bytes) -> None:
    prepared = prepare_request(CHAT_ROUTE, body)
    assert prepared.body is body
    assert prepared.request is None


def test_completion_echo_is_not_given_the_flag() -> None:
    body = b'{"model":"tiny","prompt":"x","echo":true}'
    assert prepare_request(COMPLETIONS_ROUTE, body).body is body


_KEY_THEN_ARRAY = re.compile(rb'([{,]\s*"(?:prompt_)?token_ids"\s*:\s*)\[[^\]]*\]')
_PIECES = [
    b"{",
    b",",
    b" ",
    b"\n",
    b'"',
    b'token_ids"',
    b"prompt_",
    b":",
    b"[1,2]",
    b"[]",
    b"]",
    b"x",
    b'\\"',
]


@settings(max_examples=3000, derandomize=True, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=14))
def test_strip_token_ids_matches_the_plain_regex_on_any_bytes(pieces: list[bytes]) -> None:
    """The find-then-match fast path must change exactly what one regex over the payload changes."""
    payload = b"".join(pieces)
    assert strip_token_ids(payload) == _KEY_THEN_ARRAY.sub(rb"\1null", payload)


@pytest.mark.parametrize("name", [n for n in sample_names() if "token_ids" in n])
def test_strip_token_ids_matches_the_plain_regex_on_every_sample(name: str) -> None:
    response = load_sample(name).response
    assert strip_token_ids(response) == _KEY_THEN_ARRAY.sub(rb"\1null", response)


def test_every_sample_request_has_its_captured_response() -> None:
    """The fixtures are complete: a sample lost or renamed fails here, not as a silently smaller suite."""
    wanted = [spec["name"] for spec in json.loads((SAMPLES / "requests.json").read_text())]
    assert len(wanted) >= 40
    assert sample_names() == sorted(wanted)
    for name in wanted:
        sample = load_sample(name)
        assert sample.status in (200, 400, 404), name
        assert sample.response or sample.path == "/health", name


def _capture_edited(name: str, edit: Any) -> CallRecord:
    """The record of sample ``name``'s whole (non-streamed) answer after ``edit`` changed it."""
    sample = load_sample(name)
    assert _capture(sample.name)[0].integrity == Integrity.OK
    body = json.loads(sample.response)
    edit(body)
    record = CallRecord("c", "t", sample.path, 0.0)
    capture = ResponseCapture(record, prepare_request(sample.path, sample.request).ask, chat=True)
    capture.feed_body(json.dumps(body).encode())
    capture.finish(True)
    record.load_prompt_ids()
    return record


@pytest.mark.parametrize("delta", [1, -1], ids=["usage-counts-more", "usage-counts-fewer"])
@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("completion_tokens", Integrity.COMPLETION_IDS_MISMATCH),
        ("prompt_tokens", Integrity.PROMPT_IDS_MISMATCH),
    ],
)
def test_ids_that_disagree_with_vllms_usage_are_flagged(field: str, expected: str, delta: int) -> None:
    """A token lost or added on the way (usage counts one more or one fewer than the IDs) is never
    judged ok, whichever way it disagrees."""

    def edit(body: dict[str, Any]) -> None:
        body["usage"][field] += delta

    assert _capture_edited("01_chat_nonstream_token_ids", edit).integrity == expected


@pytest.mark.parametrize("change", ["one-missing", "one-extra"])
def test_logprobs_that_are_not_one_per_token_are_flagged(change: str) -> None:
    """A logprob lost or added would shift every later one against its token in training."""

    def edit(body: dict[str, Any]) -> None:
        entries = body["choices"][0]["logprobs"]["content"]
        if change == "one-missing":
            entries.pop()
        else:
            entries.append(entries[-1])

    record = _capture_edited("04a_chat_nonstream_logprobs_token_ids", edit)
    assert record.integrity == Integrity.LOGPROBS_MISMATCH


def _long_prompt_stream(prompt_ids: list[int], prompt_tokens: int) -> bytes:
    """A vLLM-shaped chat stream whose role chunk carries a long prompt (the agents' case)."""
    events = [
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
            "prompt_token_ids": prompt_ids,
        },
        {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": "hi"}, "token_ids": [7]}]},
        {
            "id": "chatcmpl-1",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "token_ids": []}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": 1,
                "total_tokens": prompt_tokens + 1,
            },
        },
    ]
    return b"".join(b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events) + (
        b"data: [DONE]\n\n"
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 60_000), min_size=2, max_size=6))
def test_a_long_prompt_is_kept_as_text_on_the_loop_and_parsed_once_later(cuts: list[int]) -> None:
    prompt_ids = [(i * 7919) % 150_000 for i in range(6_000)]
    for stated, integrity in ((6_000, Integrity.OK), (5_999, Integrity.PROMPT_IDS_MISMATCH)):
        stream = _long_prompt_stream(prompt_ids, stated)
        record = CallRecord("c", "t", CHAT_ROUTE, 0.0)
        tap = StreamTap(
            ResponseCapture(record, ClientAsk(token_ids=True, stream=True), chat=True), strip=False
        )
        out = b""
        for start, end in itertools.pairwise([0, *sorted(c % len(stream) for c in cuts), len(stream)]):
            out += tap.feed(stream[start:end])
        out += tap.close()
        tap.capture.finish(True)
        assert out == stream  # relayed as it came
        assert record.prompt_token_ids is None  # not parsed on the event loop, nor counted
        assert record.load_prompt_ids() == prompt_ids
        assert record.integrity == integrity  # judged once parsed
        assert record.prompt_ids_text is None
        assert record.choices[0].token_ids == [7]


@pytest.mark.parametrize(
    "name",
    ["01_chat_nonstream_token_ids", "02b_chat_stream_token_ids_usage", "07a_completions_nonstream_token_ids"],
)
def test_a_call_whose_ids_the_proxy_asked_for_is_checked_like_one_the_client_asked_for(name: str) -> None:
    """Most clients never ask for token IDs: the proxy adds the flag, and the record is still judged
    (a wrong count is flagged), not waved through as ``no_token_ids``."""
    sample = load_sample(name)
    request = json.loads(sample.request)
    del request["return_token_ids"]
    prepared = prepare_request(sample.path, json.dumps(request).encode())
    assert prepared.ask.flag_added
    assert not prepared.ask.token_ids
    for usage_delta, expected in ((0, Integrity.OK), (1, Integrity.COMPLETION_IDS_MISMATCH)):
        record = CallRecord("c", "t", sample.path, 0.0)
        capture = ResponseCapture(record, prepared.ask, chat=sample.path == CHAT_ROUTE)
        response = _add_to_usage(sample.response, usage_delta)
        if sample.content_type.startswith("text/event-stream"):
            tap = StreamTap(capture, strip=True)
            tap.feed(response)
            tap.close()
        else:
            capture.feed_body(response)
        capture.finish(True)
        assert record.integrity == expected


def _add_to_usage(response: bytes, delta: int) -> bytes:
    """``response`` with ``delta`` added to every ``completion_tokens`` count it gives."""
    return re.sub(
        rb'"completion_tokens":(\d+)',
        lambda m: b'"completion_tokens":%d' % (int(m.group(1)) + delta),
        response,
    )


def test_the_prompt_of_an_n2_completion_is_counted_once_per_prompt() -> None:
    """vLLM repeats the prompt IDs on each of the n choices; usage counts the prompt once."""
    sample = load_sample("07a_completions_nonstream_token_ids")
    body = json.loads(sample.response)
    first = body["choices"][0]
    second = dict(first, index=1)
    body["choices"] = [first, second]
    body["usage"]["completion_tokens"] *= 2
    request = dict(json.loads(sample.request), n=2)
    record = CallRecord("c", "t", COMPLETIONS_ROUTE, 0.0)
    capture = ResponseCapture(
        record, prepare_request(COMPLETIONS_ROUTE, json.dumps(request).encode()).ask, chat=False
    )
    capture.feed_body(json.dumps(body).encode())
    capture.finish(True)
    assert record.prompt_token_ids == first["prompt_token_ids"]
    assert record.integrity == Integrity.OK


RECORDED_SAMPLES = [
    n
    for n in sample_names()
    if load_sample(n).status == 200 and load_sample(n).path in (CHAT_ROUTE, COMPLETIONS_ROUTE)
]


@settings(max_examples=8, deadline=None)
@given(cuts=st.lists(st.integers(0, 100_000), max_size=5))
@pytest.mark.parametrize("name", RECORDED_SAMPLES)
@pytest.mark.parametrize("client_asked_for_ids", [True, False])
def test_an_answer_passed_on_unread_and_read_later_is_what_the_relay_reads_itself(
    name: str, client_asked_for_ids: bool, cuts: list[int]
) -> None:
    """The recorder process reads what the relay passed on unread (``read_raw_answer``): the client
    gets the same bytes, and the record is the same, as when the relay reads the answer itself (the
    oracle), over every real vLLM answer, cut into reads anywhere."""
    sample = load_sample(name)
    request = json.loads(sample.request)
    if not client_asked_for_ids:
        request.pop("return_token_ids", None)
    prepared = prepare_request(sample.path, json.dumps(request).encode())
    chat = sample.path == CHAT_ROUTE
    stream = sample.content_type.startswith("text/event-stream")
    strip = prepared.ask.flag_added
    response = sample.response
    bounds = [0, *sorted(c % (len(response) + 1) for c in cuts), len(response)]
    reads = [response[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    read_here = CallRecord("c", "t", sample.path, 0.0)
    read_later = CallRecord("c", "t", sample.path, 0.0)
    capture = ResponseCapture(read_here, prepared.ask, chat=chat)
    if stream:
        oracle, unread = StreamTap(capture, strip), StreamTap(None, strip, chat=chat)
        sent_oracle = b"".join(oracle.feed(r) for r in reads) + oracle.close()
        sent_unread = b"".join(unread.feed(r) for r in reads) + unread.close()
        assert sent_unread == sent_oracle
        read_later.answer = RawAnswer(unread.answer_bytes(), True, chat, prepared.ask)
    else:
        capture.feed_body(response)
        read_later.answer = RawAnswer(response, False, chat, prepared.ask)
    capture.finish(True)
    read_raw_answer(read_later)
    read_here.load_prompt_ids()
    read_later.load_prompt_ids()
    assert read_later == read_here
    assert read_later.answer is None
