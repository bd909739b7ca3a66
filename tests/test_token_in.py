"""Token-in without vLLM: the message comparison, the drift classification, the writer's diagnosis on
SQLite and PostgreSQL, the migration, and the fallbacks against a fake vLLM (a 400, a failing
/tokenize), with the X-TokenTrail-Token-In header never forwarded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import OperationalError

from tests.conftest import Proxy, running_proxy
from tests.fake_upstream import read_body
from tests.servers import serve_in_thread
from tokentrail.proxy.recording.records import CallRecord, ChoiceRecord, Integrity
from tokentrail.proxy.recording.writer import RecordWriter
from tokentrail.proxy.storage.engine import make_engine
from tokentrail.proxy.storage.migrate import alembic_config, upgrade_database
from tokentrail.proxy.storage.stored_calls import common_prefix
from tokentrail.proxy.token_in import planner
from tokentrail.proxy.token_in.planner import token_in_wanted, with_prompt_ids
from tokentrail.proxy.token_in.prompt import BuildFailed, Rendered
from tokentrail.proxy.trajectory.continuation import (
    Continuation,
    PastCall,
    PastChoice,
    Reason,
    best_continuation,
    continuation,
    normalise_message,
)
from tokentrail.proxy.trajectory.drift import Drift, DriftJudge, classify

CHAT = "/v1/chat/completions"
SYSTEM = {"role": "system", "content": "Be terse."}
USER = {"role": "user", "content": "Weather in Paris?"}
REPLY = {"role": "assistant", "content": "Sunny."}
CALL = {
    "id": "call-1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


def past(messages: list[Any], *replies: dict[str, Any], tools: Any = None, call_id: str = "c1") -> PastCall:
    request: dict[str, Any] = {"model": "m", "messages": messages}
    if tools is not None:
        request["tools"] = tools
    choices = tuple(PastChoice(i, [10 + i, 11 + i], r, "stop") for i, r in enumerate(replies))
    return PastCall(call_id, CHAT, request, [1, 2, 3], choices)


def request(*messages: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": list(messages), **extra}


# ---- the comparison by meaning ----


def test_a_reply_sent_back_by_the_openai_sdk_or_as_text_parts_continues_the_call() -> None:
    before = past([SYSTEM, USER], REPLY)
    sdk_form = {**REPLY, "refusal": None, "annotations": None, "audio": None, "tool_calls": None}
    parts = {
        "role": "assistant",
        "content": [{"type": "text", "text": "Sun"}, {"type": "text", "text": "ny."}],
    }
    for reply in (REPLY, sdk_form, parts):
        found = continuation(before, request(SYSTEM, USER, reply, {"role": "user", "content": "Rome?"}))
        assert isinstance(found, Continuation)
        assert found.kept == 3
        assert found.previous_ids == [1, 2, 3, 10, 11]


def test_tool_call_arguments_are_compared_as_json_not_as_bytes() -> None:
    tool_reply = {"role": "assistant", "content": None, "tool_calls": [CALL]}
    before = past([USER], tool_reply, tools=[{"type": "function"}])
    respaced = {
        **CALL,
        "id": "other-id",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
    }
    result = {"role": "tool", "tool_call_id": "call-1", "content": "sunny"}
    same = request(
        USER,
        {"role": "assistant", "content": "", "tool_calls": [respaced]},
        result,
        tools=[{"type": "function"}],
    )
    assert isinstance(continuation(before, same), Continuation)
    other = {**CALL, "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    changed = request(
        USER, {"role": "assistant", "tool_calls": [other]}, result, tools=[{"type": "function"}]
    )
    assert continuation(before, changed) == Reason.REPLY_EDITED


@pytest.mark.parametrize(
    ("messages", "extra", "reason"),
    [
        ([{"role": "system", "content": "Be verbose."}, USER, REPLY, USER], {}, Reason.SYSTEM_CHANGED),
        ([SYSTEM, {"role": "user", "content": "Other."}, REPLY, USER], {}, Reason.HISTORY_EDITED),
        ([SYSTEM, USER], {}, Reason.HISTORY_TRIMMED),
        ([SYSTEM, USER, {"role": "assistant", "content": "Rainy."}, USER], {}, Reason.REPLY_EDITED),
        ([SYSTEM, USER, REPLY], {}, Reason.NO_NEW_MESSAGE),
        ([SYSTEM, USER, REPLY, USER], {"tools": [{"type": "function"}]}, Reason.TOOLS_CHANGED),
        ([SYSTEM, USER, REPLY, USER], {"chat_template_kwargs": {"x": 1}}, Reason.OPTIONS_CHANGED),
    ],
    ids=["system", "edited", "trimmed", "reply", "no-new", "tools", "options"],
)
def test_a_request_that_does_not_continue_says_why(
    messages: list[Any], extra: dict[str, Any], reason: str
) -> None:
    assert continuation(past([SYSTEM, USER], REPLY), request(*messages, **extra)) == reason


def test_an_n2_call_is_continued_on_the_choice_the_client_sent_back_and_only_then() -> None:
    other = {"role": "assistant", "content": "Rainy."}
    forked = past([USER], REPLY, other)
    found = continuation(forked, request(USER, other, USER))
    assert isinstance(found, Continuation)
    assert found.choice.index == 1
    assert continuation(forked, request(USER, {"role": "assistant", "content": "Snow."}, USER)) == (
        Reason.CHOICE_UNIDENTIFIED
    )
    twins = PastCall(
        "c", CHAT, {"messages": [USER]}, [1], (PastChoice(0, [5], REPLY), PastChoice(1, [6, 7], REPLY))
    )
    assert (
        continuation(twins, request(USER, REPLY, USER)) == Reason.CHOICE_UNIDENTIFIED
    )  # same text, other IDs


def test_the_latest_call_a_request_continues_is_chosen_among_parallel_sub_agents() -> None:
    agent_a = past([{"role": "system", "content": "A"}, USER], REPLY, call_id="a")
    agent_b = past([{"role": "system", "content": "B"}, USER], REPLY, call_id="b")
    found = best_continuation(
        [agent_a, agent_b], request({"role": "system", "content": "A"}, USER, REPLY, USER)
    )
    assert isinstance(found, Continuation)
    assert found.past.call_id == "a"
    assert best_continuation([], request(USER)) == Reason.FIRST_CALL
    assert best_continuation([agent_b], request(USER)) == Reason.SYSTEM_CHANGED


def test_normalise_message_drops_what_clients_add_and_keeps_what_they_say() -> None:
    assert normalise_message({"role": "user", "content": "x", "name": None}) == {
        "role": "user",
        "content": "x",
    }
    assert normalise_message({"role": "assistant", "content": None, "reasoning": "hmm"}) == {
        "role": "assistant"
    }


# ---- classification ----


@pytest.mark.parametrize(
    ("prompt", "built", "drift", "position"),
    [
        ([1, 2, 3, 10, 11, 2, 9], False, Drift.EXTENDS, None),
        ([1, 2, 3, 10, 11, 2, 9], True, Drift.TOKEN_IN, None),
        ([1, 2, 3, 10, 12, 2, 9], False, Drift.RETOKENIZED, 4),
        ([1, 5, 3, 10, 11, 2, 9], False, Drift.TEMPLATE, 1),
    ],
)
def test_the_drift_is_where_the_prompt_leaves_the_previous_prompt_and_generated_ids(
    prompt: list[int], built: bool, drift: Drift, position: int | None
) -> None:
    found = continuation(past([USER], REPLY), request(USER, REPLY, USER))
    assert classify(prompt, found, None, built) == (drift, position)


def test_calls_that_do_not_continue_are_first_or_edited() -> None:
    latest = past([USER], REPLY)
    assert classify([1, 2], Reason.FIRST_CALL, None, False) == (Drift.FIRST, None)
    assert classify([1, 2, 9], Reason.HISTORY_EDITED, latest, False) == (Drift.EDITED, 2)
    # A text completion with a prompt of token IDs: only the IDs can say.
    assert classify([1, 2, 3, 10, 11, 5], Reason.NOT_CHAT, latest, False) == (Drift.EXTENDS, None)
    assert classify([1, 2, 4], Reason.NOT_CHAT, latest, False) == (Drift.EDITED, 2)


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix([1, 2, 3], [1, 9, 3]) == 1
    assert common_prefix(list(range(1000)), [*range(777), -1]) == 777
    assert common_prefix([], [1]) == 0


def test_the_prompt_ids_go_into_the_body_and_the_header_decides_per_call() -> None:
    body = with_prompt_ids(b'{"model":"m","messages":[]}', [1, 2])
    assert json.loads(body) == {
        "kv_transfer_params": {"prompt_token_ids": [1, 2]},
        "model": "m",
        "messages": [],
    }
    assert json.loads(with_prompt_ids(b" {} ", [3])) == {"kv_transfer_params": {"prompt_token_ids": [3]}}
    explicit_null = with_prompt_ids(b'{"kv_transfer_params": null, "model": "m"}', [4])
    assert json.loads(explicit_null) == {"kv_transfer_params": {"prompt_token_ids": [4]}, "model": "m"}
    assert explicit_null.count(b"kv_transfer_params") == 1  # vLLM reads the last of two keys
    in_text = b'{"messages": [{"role": "user", "content": "\\"kv_transfer_params\\""}]}'
    assert json.loads(with_prompt_ids(in_text, [5]))["messages"] == json.loads(in_text)["messages"]
    assert token_in_wanted([(b"X-TokenTrail-Token-In", b"true")], False) is True
    assert token_in_wanted([(b"x-tokentrail-token-in", b"FALSE")], True) is False
    assert token_in_wanted([(b"x-tokentrail-token-in", b"maybe")], True) is True


# ---- the writer's diagnosis, on SQLite and PostgreSQL ----


def _record(writer: RecordWriter, messages: list[Any], prompt: list[int], generated: list[int]) -> CallRecord:
    record = CallRecord(
        call_id=f"call-{time.monotonic_ns()}",
        trajectory_id="judged",
        route=CHAT,
        received_at=time.time(),
        seq=writer.next_ordinal("judged"),
        integrity=Integrity.OK,
        request={"model": "m", "messages": messages},
        prompt_token_ids=prompt,
    )
    record.choices = [
        ChoiceRecord(0, list(generated), message={"role": "assistant", "content": f"r{len(prompt)}"})
    ]
    return record


def test_the_writer_judges_every_call_and_a_restarted_writer_reads_the_previous_one(
    tmp_path: Path, db_url: str
) -> None:
    upgrade_database(db_url)
    user = {"role": "user", "content": "q"}
    reply = {"role": "assistant", "content": "r3"}
    steps = [
        ([user], [1, 2, 3], [4]),  # first
        ([user, reply, user], [1, 2, 3, 4, 2, 5], [6]),  # extends
        ([user, reply, user, {"role": "assistant", "content": "r6"}, user], [1, 2, 3, 4, 2, 5, 7, 2, 5], [8]),
        ([{"role": "user", "content": "other"}], [1, 9], [4]),  # edited
    ]
    drifts = []
    for number, (messages, prompt, generated) in enumerate(steps):
        writer = RecordWriter(  # a new writer (a restarted proxy) from the third call on
            make_engine(db_url),
            queue_size=10,
            batch_size=10,
            retries=0,
            fallback_path=tmp_path / f"f{number}",
            judge=DriftJudge(),
        )
        writer.start()
        writer.submit(_record(writer, messages, prompt, generated))
        writer.close()
        writer._engine.dispose()
        engine = create_engine(db_url)
        with engine.connect() as connection:
            drifts = connection.execute(
                text("SELECT drift, drift_position FROM turns WHERE trajectory_id = 'judged' ORDER BY seq")
            ).all()
            summary = connection.execute(
                text("SELECT one_sequence, retokenized_breaks, edited_breaks FROM trajectory_summary")
            ).one()
        engine.dispose()
        if number == 1:
            assert tuple(summary) == (1, 0, 0)
    assert [tuple(d) for d in drifts] == [
        ("first", None),
        ("extends", None),
        ("retokenized", 6),
        ("edited", 1),
    ]
    assert tuple(summary) == (0, 1, 1)


def test_the_migration_adds_the_columns_and_views_and_goes_back(db_url: str) -> None:
    upgrade_database(db_url)
    engine = create_engine(db_url)
    try:
        columns = {c["name"] for c in inspect(engine).get_columns("llm_calls")}
        assert {"drift", "drift_position", "token_in_fallback"} <= columns
        with engine.connect() as connection:
            connection.execute(text("SELECT drift, drift_position, token_in_fallback FROM turns")).all()
            connection.execute(
                text("SELECT one_sequence, token_in_calls, template_breaks FROM trajectory_summary")
            )
        config = alembic_config(db_url)
        command.downgrade(config, "0003_upstream")
        assert "drift" not in {c["name"] for c in inspect(engine).get_columns("llm_calls")}
        with engine.connect() as connection:
            connection.execute(text("SELECT integrity_problems FROM trajectory_summary")).all()
        command.upgrade(config, "head")
    finally:
        engine.dispose()


# ---- fallbacks against a fake vLLM ----


class TokenInFake:
    """A fake vLLM: /tokenize renders one token per message (an assistant one by its text, then 2 as
    its end of turn) and 7 as the generation prompt; chat refuses kv_transfer_params with ``refuse`` (400)."""

    def __init__(self) -> None:
        self.chats: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.refuse = False
        self.refuse_status = 400  # what a refusal answers (a 5xx: vLLM may have run the request)
        self.tokenize_status = 200
        self.ignore_ids = False  # answer as if the token-in IDs were not used (vLLM renders the messages)
        self.history_without_end = False  # a template whose last assistant turn has no end-of-turn
        self.end_of_turn = 2  # the token the template writes after an assistant turn
        self.hold_next = False  # the next chat request waits until ``release`` is set
        self.held = threading.Event()
        # what every chat answer "samples" ([..., 2]: it stopped on its end of turn)
        self.generated = [300, 301]
        self.hold_tokenize = threading.Event()  # set: /tokenize waits until ``release_tokenize``
        self.tokenize_held = threading.Event()
        self.release_tokenize = threading.Event()
        self.control: list[str] = []
        self.release = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = await read_body(receive)
        if scope["path"] in ("/pause", "/resume", "/weight_info"):  # vLLM's RL control plane
            self.control.append(scope["path"])
            await _answer(send, 200, {"weight_version": "default"})
            return
        parsed = json.loads(raw)
        if scope["path"] == "/tokenize":
            if self.hold_tokenize.is_set():
                self.tokenize_held.set()
                await asyncio.to_thread(self.release_tokenize.wait, 30)
            if self.tokenize_status != 200:
                await _answer(send, self.tokenize_status, {"error": {"message": "no"}})
                return
            tokens = []
            for m in parsed["messages"]:
                content = m.get("content") or ""
                tokens += (
                    [100 + sum(map(ord, content)) % 100, self.end_of_turn]
                    if m["role"] == "assistant"
                    else [50]
                )
            probe = parsed["messages"][0].get("content") == "x"  # the proxy's template-tail probe
            if self.history_without_end and not parsed["add_generation_prompt"] and not probe:
                tokens = tokens[:-1]
            tokens += [7] if parsed["add_generation_prompt"] else []
            await _answer(send, 200, {"count": len(tokens), "max_model_len": 99, "tokens": tokens})
            return
        self.chats.append(parsed)
        if self.hold_next:
            self.hold_next = False
            self.held.set()
            await asyncio.to_thread(self.release.wait, 30)
        self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        kv = parsed.get("kv_transfer_params")
        if kv is not None and self.refuse:
            await _answer(
                send,
                self.refuse_status,
                {"error": {"message": "bad ids", "type": "BadRequestError", "code": self.refuse_status}},
            )
            return
        used = kv is not None and not self.ignore_ids
        prompt = kv["prompt_token_ids"] if used else [50] * len(parsed["messages"]) + [7]
        answer = {
            "id": "x",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop" if self.generated[-1:] == [2] else "length",
                    "token_ids": self.generated,
                }
            ],
            "usage": {
                "prompt_tokens": len(prompt),
                "completion_tokens": len(self.generated),
                "total_tokens": len(prompt) + len(self.generated),
            },
            "prompt_token_ids": prompt,
            "kv_transfer_params": None,
        }
        await _answer(send, 200, answer)


async def _answer(send: Any, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    await send(
        {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": data})


@pytest.fixture
def token_in_fake(tmp_path: Path) -> Iterator[tuple[TokenInFake, Proxy]]:
    fake = TokenInFake()
    with serve_in_thread(fake) as url, running_proxy(url, tmp_path, token_in=True) as proxy:
        yield fake, proxy


def _two_calls(proxy_url: str, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    sent = {"X-Trajectory-Id": "fake", **(headers or {})}
    answers = []
    messages: list[dict[str, Any]] = [USER]
    for _ in range(2):
        response = httpx.post(
            proxy_url + "/v1/chat/completions",
            json={"model": "m", "messages": messages},
            headers=sent,
            timeout=30,
        )
        assert response.status_code == 200
        answers.append(response.json())
        messages = [*messages, {"role": "assistant", "content": "ok"}, USER]
    return answers


def test_a_token_in_body_refused_with_400_is_sent_again_without_the_ids_and_the_reason_kept(
    token_in_fake: tuple[TokenInFake, Proxy],
) -> None:
    fake, proxy = token_in_fake
    fake.refuse = True
    answers = _two_calls(proxy.url, {"X-TokenTrail-Token-In": "true"})
    assert answers[1]["prompt_token_ids"] is None  # the client did not ask for IDs: as vLLM sends them
    assert [("kv_transfer_params" in c) for c in fake.chats] == [False, True, False]
    assert fake.chats[1]["kv_transfer_params"]["prompt_token_ids"] == [50, 7, 300, 301, 2, 50, 7]
    assert all("x-tokentrail-token-in" not in h for h in fake.headers)
    rows = _rows(proxy)
    assert [r["token_in_fallback"] for r in rows] == ["first_call", "upstream_refused"]


def test_a_token_in_call_vllm_answered_with_a_5xx_is_not_sent_again(
    token_in_fake: tuple[TokenInFake, Proxy],
) -> None:
    """Only a 4xx says vLLM ran nothing of the token-in body; after a 5xx it may have, so the client
    gets vLLM's answer and the call is never sent a second time."""
    fake, proxy = token_in_fake
    fake.refuse, fake.refuse_status = True, 500
    messages: list[dict[str, Any]] = [USER]
    statuses = []
    for _ in range(2):
        response = httpx.post(
            proxy.url + "/v1/chat/completions",
            json={"model": "m", "messages": messages},
            headers={"X-Trajectory-Id": "fake", "X-TokenTrail-Token-In": "true"},
            timeout=30,
        )
        statuses.append(response.status_code)
        messages = [*messages, {"role": "assistant", "content": "ok"}, USER]
    assert statuses == [200, 500]
    assert [("kv_transfer_params" in c) for c in fake.chats] == [False, True]
    proxy.wait_all_records()
    rows = proxy.rows("SELECT seq, outcome, token_in_fallback FROM llm_calls ORDER BY seq")
    assert [(r["outcome"], r["token_in_fallback"]) for r in rows] == [
        ("ok", "first_call"),
        ("upstream_error", None),
    ]


def test_a_token_in_call_whose_ids_vllm_did_not_use_is_recorded_as_fallen_back(
    token_in_fake: tuple[TokenInFake, Proxy],
) -> None:
    """vLLM's prompt IDs are the truth: when they are not the ones the proxy sent, the call is not
    recorded as token-in (its drift is judged on what vLLM used)."""
    fake, proxy = token_in_fake
    fake.ignore_ids = True
    _two_calls(proxy.url)
    assert [("kv_transfer_params" in c) for c in fake.chats] == [False, True]
    rows = _rows(proxy)
    assert [r["token_in_fallback"] for r in rows] == ["first_call", "upstream_ignored_ids"]
    assert rows[1]["drift"] != "token_in"


def test_a_history_render_without_the_template_tail_falls_back(
    token_in_fake: tuple[TokenInFake, Proxy],
) -> None:
    """The previous reply is followed by the template's tail only if the history render ends with it;
    a template that renders the last turn otherwise gives no exact continuation, so no IDs are sent."""
    fake, proxy = token_in_fake
    fake.history_without_end = True
    _two_calls(proxy.url)
    assert [("kv_transfer_params" in c) for c in fake.chats] == [False, False]
    assert [r["token_in_fallback"] for r in _rows(proxy)] == ["first_call", "template_tail_unknown"]


def test_an_upstream_back_after_being_down_is_learned_again(tmp_path: Path) -> None:
    """vLLM goes away and comes back on its port with another chat template (another end-of-turn
    token). What token-in learned of it (the template's tail, kept renders, trust) is learned again
    once it answers, so trajectories go on token-in, with the new template's tail."""
    with contextlib.ExitStack() as stack:
        first = contextlib.ExitStack()
        url = first.enter_context(serve_in_thread(TokenInFake()))
        proxy = stack.enter_context(running_proxy(url, tmp_path, token_in=True))
        _two_calls(proxy.url, {"X-Trajectory-Id": "before"})  # learns the tail: 2
        first.close()  # vLLM goes away ...
        gone = httpx.post(
            proxy.url + "/v1/chat/completions", json={"model": "m", "messages": [USER]}, timeout=30
        )
        assert gone.status_code == 502
        restarted = TokenInFake()  # ... and comes back on its port, its template ending turns with 3
        restarted.end_of_turn = 3
        stack.enter_context(serve_in_thread(restarted, port=int(url.rsplit(":", 1)[1])))
        _two_calls(proxy.url, {"X-Trajectory-Id": "after"})
        proxy.wait_all_records()
        rows = proxy.rows(
            "SELECT drift, token_in_fallback FROM llm_calls WHERE trajectory_id = 'after' ORDER BY seq"
        )
    sent = restarted.chats[1].get("kv_transfer_params") or {}
    assert sent.get("prompt_token_ids") == [50, 7, 300, 301, 3, 50, 7]
    assert [(r["drift"], r["token_in_fallback"]) for r in rows] == [
        ("first", "first_call"),
        ("token_in", None),
    ]


def test_a_failing_tokenize_falls_back_to_the_call_as_it_is(token_in_fake: tuple[TokenInFake, Proxy]) -> None:
    fake, proxy = token_in_fake
    fake.tokenize_status = 500
    _two_calls(proxy.url)
    assert [("kv_transfer_params" in c) for c in fake.chats] == [False, False]
    assert [r["token_in_fallback"] for r in _rows(proxy)] == ["first_call", "tokenize_failed"]


def test_without_a_refusal_the_ids_are_used_and_the_call_is_token_in(
    token_in_fake: tuple[TokenInFake, Proxy],
) -> None:
    fake, proxy = token_in_fake
    _two_calls(proxy.url)
    assert [("kv_transfer_params" in c) for c in fake.chats] == [False, True]
    rows = _rows(proxy)
    assert [(r["drift"], r["token_in_fallback"]) for r in rows] == [
        ("first", "first_call"),
        ("token_in", None),
    ]


def test_a_body_with_an_explicit_null_kv_transfer_params_still_carries_the_ids(
    token_in_fake: tuple[TokenInFake, Proxy],
) -> None:
    fake, proxy = token_in_fake
    messages: list[dict[str, Any]] = [USER]
    for _ in range(2):
        body = {"model": "m", "messages": messages, "kv_transfer_params": None}
        response = httpx.post(proxy.url + CHAT, json=body, headers={"X-Trajectory-Id": "null"}, timeout=30)
        assert response.status_code == 200
        messages = [*messages, {"role": "assistant", "content": "ok"}, USER]
    assert fake.chats[1]["kv_transfer_params"] == {"prompt_token_ids": [50, 7, 300, 301, 2, 50, 7]}
    assert [r["token_in_fallback"] for r in _rows(proxy)] == ["first_call", None]


def test_the_end_of_turn_the_model_sampled_itself_is_not_added_again(
    token_in_fake: tuple[TokenInFake, Proxy],
) -> None:
    """A reply that stopped on the template's end-of-turn token already holds that part of the tail."""
    fake, proxy = token_in_fake
    fake.generated = [300, 2]  # the model stopped: its last token is the template's end of turn
    _two_calls(proxy.url)
    assert fake.chats[1]["kv_transfer_params"]["prompt_token_ids"] == [50, 7, 300, 2, 50, 7]
    assert [r["token_in_fallback"] for r in _rows(proxy)] == ["first_call", None]


def test_a_call_whose_prompt_was_being_built_when_the_pause_came_waits_at_the_gate(
    token_in_fake: tuple[TokenInFake, Proxy],
) -> None:
    """The gate is checked before the prompt is built (a database read, renders through vLLM): a
    pause that comes meanwhile must still hold the call, never let it reach a paused vLLM."""
    fake, proxy = token_in_fake
    statuses: list[int] = []
    _post(proxy, [USER], statuses)
    fake.hold_tokenize.set()
    follow_up = threading.Thread(
        target=_post, args=(proxy, [USER, {"role": "assistant", "content": "ok"}, USER], statuses)
    )
    follow_up.start()
    assert fake.tokenize_held.wait(30), "the follow-up never rendered its prompt"
    httpx.post(proxy.url + "/tokentrail/v1/pause?mode=keep", timeout=30).raise_for_status()
    fake.release_tokenize.set()

    def held_or_sent() -> bool:
        return len(fake.chats) > 1 or httpx.get(proxy.url + "/tokentrail/v1/pause").json()["held_now"] > 0

    deadline = time.monotonic() + 30
    while not held_or_sent():
        assert time.monotonic() < deadline, "the follow-up neither waited nor went out"
        time.sleep(0.01)
    assert len(fake.chats) == 1, "a call reached vLLM while the fleet was paused"
    httpx.post(proxy.url + "/tokentrail/v1/resume", timeout=30).raise_for_status()
    follow_up.join(30)
    assert statuses == [200, 200]
    assert fake.control[-2:] == ["/resume", "/weight_info"]
    assert [r["token_in_fallback"] for r in _rows(proxy)] == ["first_call", None]


def _rows(proxy: Proxy) -> list[dict[str, Any]]:
    proxy.wait_all_records()
    return proxy.rows("SELECT seq, drift, token_in_fallback FROM llm_calls ORDER BY seq")


def _post(proxy: Proxy, messages: list[dict[str, Any]], answers: list[Any]) -> None:
    response = httpx.post(
        proxy.url + "/v1/chat/completions",
        json={"model": "m", "messages": messages},
        headers={"X-Trajectory-Id": "fake"},
        timeout=30,
    )
    answers.append(response.status_code)


def _wait_open_calls(proxy: Proxy, count: int) -> None:
    token_in = proxy.runtime.relay.token_in
    assert token_in is not None
    deadline = time.monotonic() + 30
    while len(token_in._open) < count:
        assert time.monotonic() < deadline, "the call did not arrive"
        time.sleep(0.01)


def _first_then_held_follow_up(
    fake: TokenInFake, proxy: Proxy, statuses: list[int]
) -> tuple[list[dict[str, Any]], threading.Thread]:
    """Call 0, then its follow-up in a thread, held at the fake vLLM (built on call 0) until released."""
    _post(proxy, [USER], statuses)
    follow_up = [USER, {"role": "assistant", "content": "ok"}, USER]
    fake.hold_next = True
    thread = threading.Thread(target=_post, args=(proxy, follow_up, statuses))
    thread.start()
    assert fake.held.wait(30)
    return follow_up, thread


def test_two_open_calls_are_never_built_on_the_same_previous_call(
    token_in_fake: tuple[TokenInFake, Proxy],
) -> None:
    fake, proxy = token_in_fake
    statuses: list[int] = []
    follow_up, first = _first_then_held_follow_up(fake, proxy, statuses)
    _post(proxy, follow_up, statuses)  # a parallel sub-agent with the same history
    fake.release.set()
    first.join(30)
    assert statuses == [200, 200, 200]
    assert [("kv_transfer_params" in c) for c in fake.chats] == [False, True, False]
    assert [r["token_in_fallback"] for r in _rows(proxy)] == ["first_call", None, "concurrent_same_base"]


def test_a_call_sent_before_its_predecessor_is_recorded_waits_for_it_and_continues_it(
    token_in_fake: tuple[TokenInFake, Proxy],
) -> None:
    fake, proxy = token_in_fake
    statuses: list[int] = []
    second, held = _first_then_held_follow_up(fake, proxy, statuses)
    # The client already "has" the second answer and sends the third call while the second is open.
    third = threading.Thread(
        target=_post, args=(proxy, [*second, {"role": "assistant", "content": "ok"}, USER], statuses)
    )
    third.start()
    _wait_open_calls(proxy, 2)
    fake.release.set()
    held.join(30)
    third.join(30)
    assert statuses == [200, 200, 200]
    second_prompt = fake.chats[1]["kv_transfer_params"]["prompt_token_ids"]
    assert fake.chats[2]["kv_transfer_params"]["prompt_token_ids"] == [*second_prompt, 300, 301, 2, 50, 7]
    rows = _rows(proxy)
    assert [(r["drift"], r["token_in_fallback"]) for r in rows] == [
        ("first", "first_call"),
        ("token_in", None),
        ("token_in", None),
    ]


def test_a_call_sent_before_its_predecessor_is_written_continues_it_from_memory(
    token_in_fake: tuple[TokenInFake, Proxy], tmp_path: Path
) -> None:
    """The predecessor's record cannot be committed (another writer holds the database): its exact IDs
    come from memory, once the open call it continues has ended."""
    fake, proxy = token_in_fake
    statuses: list[int] = []
    second, held = _first_then_held_follow_up(fake, proxy, statuses)
    with contextlib.closing(sqlite3.connect(tmp_path / "tokentrail.db", isolation_level=None)) as lock:
        lock.execute("BEGIN IMMEDIATE")  # nothing is committed from here until the end of the test
        third = threading.Thread(
            target=_post, args=(proxy, [*second, {"role": "assistant", "content": "ok"}, USER], statuses)
        )
        third.start()
        _wait_open_calls(proxy, 2)
        fake.release.set()
        held.join(30)
        third.join(30)
        assert statuses == [200, 200, 200]
        second_prompt = fake.chats[1]["kv_transfer_params"]["prompt_token_ids"]
        assert fake.chats[2]["kv_transfer_params"]["prompt_token_ids"] == [*second_prompt, 300, 301, 2, 50, 7]
        lock.execute("ROLLBACK")


def test_a_database_that_cannot_be_read_falls_back_and_the_call_goes_on(
    token_in_fake: tuple[TokenInFake, Proxy], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, proxy = token_in_fake

    def unreadable(*args: Any) -> Any:
        raise OperationalError("SELECT", {}, Exception("database is locked"))

    monkeypatch.setattr(planner, "load_recent_calls", unreadable)
    _two_calls(proxy.url)  # a new trajectory: its first call already reads the database
    # The second call continues the first, which this proxy relayed: memory suffices.
    assert [("kv_transfer_params" in c) for c in fake.chats] == [False, True]
    assert [r["token_in_fallback"] for r in _rows(proxy)] == ["database_error", None]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 200_000), max_size=8),
    st.lists(st.integers(0, 200_000), max_size=5),
    st.booleans(),
    st.booleans(),
    st.integers(1, 4),
)
def test_renders_compared_and_cut_as_text_agree_with_lists(
    first: list[int], more: list[int], related: bool, spaced: bool, count: int
) -> None:
    """Two /tokenize answers are compared as JSON text; the answer must be the lists' own."""
    second = [*first, *more] if related else more
    separators = (", ", ": ") if spaced else (",", ":")
    shorter, longer = (Rendered(json.dumps(ids, separators=separators).encode()) for ids in (first, second))
    if second[: len(first)] == first:
        assert longer.after(shorter) == second[len(first) :]
    else:
        with pytest.raises(BuildFailed):
            longer.after(shorter)
    assert longer.last(count) == second[len(second) - min(count, len(second)) :]
