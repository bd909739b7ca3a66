"""Token-in's new tokens from a stand-in history, learned per template, and the field the IDs go in,
against a fake vLLM whose template and prompt field a test chooses (the real vLLM's are in
``test_token_in_vllm.py``).

The fake renders one token per message (an assistant one as its text's token, then 2 as its end of
turn) and 7 as the generation prompt. With ``counting`` its template writes each user message with
how many messages came before it, so what it writes for new messages depends on the whole history: a
stand-in history gives other tokens there, which the checks must catch. With ``after_reply`` it writes
a message after an assistant reply with that reply's text (so the stand-in reply differs); with
``refuse_stand_in`` its ``/tokenize`` refuses the stand-in user message (as a template that raises on
it would, with a 400); ``epoch`` is written into the system message (a template that writes today's
date), for a test to change between calls.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Proxy, running_proxy
from tests.fake_upstream import read_body
from tests.servers import serve_in_thread

CHAT = "/v1/chat/completions"
STAND_IN_USER = {"role": "user", "content": "."}  # token-in's stand-in history holds it
GENERATED = [300, 301]  # what every answer "samples": cut before its end of turn


class TemplateFake:
    """A fake vLLM that takes prompt IDs in one field only: ``kv_transfer_params`` (vLLM 0.32) or the
    first-class ``prompt_token_ids`` (vllm-project/vllm#55771, listed in its OpenAPI schema). The
    other field is ignored, as an unknown field is by vLLM: the call is then rendered from text."""

    def __init__(
        self,
        field: str = "kv_transfer_params",
        counting: bool = False,
        after_reply: bool = False,
        refuse_stand_in: bool = False,
    ) -> None:
        self.field = field
        self.counting = counting
        self.after_reply = after_reply
        self.refuse_stand_in = refuse_stand_in
        self.epoch = 0
        self.tokenize_status = 200  # anything else: /tokenize answers a stand-in render with it
        self.chats: list[dict[str, Any]] = []
        self.tokenized: list[list[dict[str, Any]]] = []  # the messages of each /tokenize request
        self.schema_requests = 0

    def render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> list[int]:
        tokens: list[int] = []
        for position, message in enumerate(messages):
            content = message.get("content") or ""
            before = messages[position - 1] if position else {}
            if message["role"] == "assistant":
                tokens += [100 + sum(map(ord, content)) % 100, 2]
            elif message["role"] == "system":
                tokens += [40 + self.epoch]
            elif self.after_reply and before.get("role") == "assistant":
                tokens += [200 + sum(map(ord, before.get("content") or "")) % 100]
            else:
                tokens += [50 + (position if self.counting and message["role"] == "user" else 0)]
        return tokens + ([7] if generation_prompt else [])

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = await read_body(receive)
        path = scope["path"]
        if path == "/openapi.json":
            self.schema_requests += 1
            properties = {"messages": {}, "kv_transfer_params": {}}
            if self.field == "prompt_token_ids":
                properties["prompt_token_ids"] = {"type": "array"}
            schema = {"components": {"schemas": {"ChatCompletionRequest": {"properties": properties}}}}
            await _answer(send, 200 if self.field == "prompt_token_ids" else 404, schema)
            return
        if path != CHAT and path != "/tokenize":
            await _answer(send, 404, {"error": {"message": "not here"}})
            return
        parsed = json.loads(raw)
        if path == "/tokenize":
            if self.tokenize_status != 200 and STAND_IN_USER in parsed["messages"]:
                await _answer(send, self.tokenize_status, {"error": {"message": "not now"}})
                return
            self.tokenized.append(parsed["messages"])
            if self.refuse_stand_in and STAND_IN_USER in parsed["messages"]:
                await _answer(send, 400, {"error": {"message": "roles must alternate", "code": 400}})
                return
            tokens = self.render(parsed["messages"], parsed["add_generation_prompt"])
            await _answer(send, 200, {"count": len(tokens), "max_model_len": 99, "tokens": tokens})
            return
        self.chats.append(parsed)
        if self.field == "prompt_token_ids":
            given = parsed.get("prompt_token_ids")
        else:
            given = (parsed.get("kv_transfer_params") or {}).get("prompt_token_ids")
        prompt = given or self.render(parsed["messages"], True)
        await _answer(
            send,
            200,
            {
                "id": "x",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "ok"},
                        "finish_reason": "length",
                        "token_ids": GENERATED,
                    }
                ],
                "usage": {
                    "prompt_tokens": len(prompt),
                    "completion_tokens": len(GENERATED),
                    "total_tokens": len(prompt) + len(GENERATED),
                },
                "prompt_token_ids": prompt,
                "kv_transfer_params": None,
            },
        )


async def _answer(send: Any, status: int, payload: dict[str, Any]) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


@pytest.fixture
def fake_and_proxy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[TemplateFake, Proxy]]:
    fake_options, proxy_options = request.param
    fake = TemplateFake(**fake_options)
    with serve_in_thread(fake) as url, running_proxy(url, tmp_path, token_in=True, **proxy_options) as proxy:
        yield fake, proxy


def _converse(
    proxy: Proxy,
    calls: int,
    between: Callable[[int], None] | None = None,
    reply: dict[str, Any] | None = None,
    **extra: Any,
) -> list[list[dict[str, Any]]]:
    """An agent loop: system, user, then per call the reply and a tool result and a user message
    (``between(number)`` runs after call ``number``)."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Start."},
    ]
    sent = []
    for number in range(calls):
        body = {"model": "m", "messages": messages, "return_token_ids": True, **extra}
        response = httpx.post(proxy.url + CHAT, json=body, headers={"X-Trajectory-Id": "t"}, timeout=30)
        assert response.status_code == 200
        sent.append(messages)
        if between is not None:
            between(number)
        messages = [
            *messages,
            reply or {"role": "assistant", "content": "ok"},
            {"role": "tool", "tool_call_id": "c", "content": f"result {number}"},
            {"role": "user", "content": f"Next {number}."},
        ]
    proxy.wait_all_records()
    return sent


def _expected_prompts(fake: TemplateFake, sent: list[list[dict[str, Any]]]) -> list[list[int]]:
    """Token-in's prompts with full renders: previous prompt + generated + the end of turn the reply
    was cut before + render(all) - render(history ending with the reply)."""
    prompts = [fake.render(sent[0], True)]
    for before, now in itertools.pairwise(sent):
        history = fake.render(now[: len(before) + 1], False)
        new = fake.render(now, True)[len(history) :]
        prompts.append([*prompts[-1], *GENERATED, 2, *new])
    return prompts


def _renders(proxy: Proxy) -> dict[str, float]:
    text = httpx.get(proxy.url + "/tokentrail/metrics", timeout=30).text
    found = {}
    for line in text.splitlines():
        if line.startswith("tokentrail_token_in_renders_total{"):
            how = line.split('how="', 1)[1].split('"', 1)[0]
            found[how] = float(line.rsplit(" ", 1)[1])
    return found


# vLLM's own reply object, appended by an agent as it came: null and empty fields are plain text too
AS_VLLM_SENT = {
    "role": "assistant",
    "content": "ok",
    "refusal": None,
    "annotations": None,
    "audio": None,
    "function_call": None,
    "tool_calls": [],
    "reasoning": None,
}


@pytest.mark.parametrize("reply", [None, AS_VLLM_SENT], ids=["role-and-content", "as-vllm-sent-it"])
@pytest.mark.parametrize(
    "fake_and_proxy",
    [({}, {"token_in_check_first": 2, "token_in_check_every": 4})],
    indirect=True,
)
def test_new_tokens_come_from_a_stand_in_history_once_the_template_agreed_and_stay_exact(
    fake_and_proxy: tuple[TemplateFake, Proxy], reply: dict[str, Any] | None
) -> None:
    fake, proxy = fake_and_proxy
    sent = _converse(proxy, 8, reply=reply)
    prompts = [c["kv_transfer_params"]["prompt_token_ids"] for c in fake.chats[1:]]
    assert prompts == _expected_prompts(fake, sent)[1:]
    rows = proxy.rows("SELECT drift, token_in_fallback FROM llm_calls ORDER BY seq")
    assert [r["drift"] for r in rows] == ["first"] + ["token_in"] * 7
    # call 1's history is as short as a stand-in (full); calls 2 and 3 are checked (both ways), so
    # is call 5 (the 4th with a stand-in); calls 4, 6, 7 render only the stand-in
    assert _renders(proxy) == {"full": 1, "checked": 3, "stand_in": 3}
    longest = max(len(m) for m in fake.tokenized)
    stand_in_renders = [m for m in fake.tokenized if m[1] == {"role": "user", "content": "."}]
    # two per checked call; one per stand-in call, whose stand-in history's render is kept
    assert len(stand_in_renders) == 2 * 3 + 3
    assert all(len(m) <= 6 for m in stand_in_renders)  # system, stand-in user, reply, 3 new
    assert all(m[2] == {"role": "assistant", "content": "."} for m in stand_in_renders)  # plain reply
    assert longest == len(sent[5])  # the last full render (call 5, checked) holds its whole history
    (trust,) = proxy.runtime.relay.token_in.templates().values()  # type: ignore[union-attr]
    assert (trust.agreed, trust.differs) == (3, False)


@pytest.mark.parametrize(
    "fake_and_proxy",
    [({"counting": True}, {"token_in_check_first": 2, "token_in_check_every": 4})],
    indirect=True,
)
def test_a_template_that_looks_back_further_goes_back_to_full_renders_for_good_and_says_so(
    fake_and_proxy: tuple[TemplateFake, Proxy],
) -> None:
    fake, proxy = fake_and_proxy
    sent = _converse(proxy, 6)
    prompts = [c["kv_transfer_params"]["prompt_token_ids"] for c in fake.chats[1:]]
    assert prompts == _expected_prompts(fake, sent)[1:]  # exact all along: the full render was used
    rows = proxy.rows("SELECT drift FROM llm_calls ORDER BY seq")
    assert [r["drift"] for r in rows] == ["first"] + ["token_in"] * 5
    assert _renders(proxy) == {"full": 1, "differs": 1, "untrusted": 3}
    (trust,) = proxy.runtime.relay.token_in.templates().values()  # type: ignore[union-attr]
    assert trust.differs


@pytest.mark.parametrize(
    "fake_and_proxy",
    [({"field": "prompt_token_ids"}, {}), ({"field": "kv_transfer_params"}, {})],
    indirect=True,
    ids=["first-class", "kv-transfer-params"],
)
def test_the_ids_go_in_the_field_the_upstream_takes_learned_once(
    fake_and_proxy: tuple[TemplateFake, Proxy],
) -> None:
    fake, proxy = fake_and_proxy
    sent = _converse(proxy, 4, kv_transfer_params=None, prompt_token_ids=None)  # explicit nulls
    expected = _expected_prompts(fake, sent)
    other = "kv_transfer_params" if fake.field == "prompt_token_ids" else "prompt_token_ids"
    for chat, prompt in zip(fake.chats[1:], expected[1:], strict=True):
        carried = (
            chat[fake.field] if fake.field == "prompt_token_ids" else chat[fake.field]["prompt_token_ids"]
        )
        assert carried == prompt
        assert chat.get(other) is None  # the client's null stays (or goes): never a second field
    assert fake.schema_requests == 1
    rows = proxy.rows("SELECT drift, token_in_fallback FROM llm_calls ORDER BY seq")
    assert [(r["drift"], r["token_in_fallback"]) for r in rows] == [("first", "first_call")] + [
        ("token_in", None)
    ] * 3


@pytest.mark.parametrize("fake_and_proxy", [({"field": "prompt_token_ids"}, {})], indirect=True)
def test_a_client_sending_its_own_prompt_token_ids_is_left_alone(
    fake_and_proxy: tuple[TemplateFake, Proxy],
) -> None:
    fake, proxy = fake_and_proxy
    _converse(proxy, 2, prompt_token_ids=[50, 7])
    assert [c["prompt_token_ids"] for c in fake.chats] == [[50, 7], [50, 7]]
    rows = proxy.rows("SELECT token_in_fallback FROM llm_calls ORDER BY seq")
    assert [r["token_in_fallback"] for r in rows] == ["client_prompt_token_ids"] * 2


@pytest.mark.parametrize("fake_and_proxy", [({}, {"token_in_stand_in": False})], indirect=True)
def test_with_the_stand_in_off_every_call_renders_its_whole_history(
    fake_and_proxy: tuple[TemplateFake, Proxy],
) -> None:
    fake, proxy = fake_and_proxy
    sent = _converse(proxy, 5)
    prompts = [c["kv_transfer_params"]["prompt_token_ids"] for c in fake.chats[1:]]
    assert prompts == _expected_prompts(fake, sent)[1:]
    assert _renders(proxy) == {"full": 4}
    assert not any(m[1] == {"role": "user", "content": "."} for m in fake.tokenized if len(m) > 1)


@pytest.mark.parametrize(
    "fake_and_proxy",
    [({"after_reply": True}, {"token_in_check_first": 2, "token_in_check_every": 4})],
    indirect=True,
)
def test_a_template_that_writes_the_reply_into_the_next_message_goes_back_to_full_renders(
    fake_and_proxy: tuple[TemplateFake, Proxy],
) -> None:
    """The stand-in reply is checked like the stand-in history: a template whose next message depends
    on the reply's text differs on the first check, and every call stays exact."""
    fake, proxy = fake_and_proxy
    sent = _converse(proxy, 5)
    prompts = [c["kv_transfer_params"]["prompt_token_ids"] for c in fake.chats[1:]]
    assert prompts == _expected_prompts(fake, sent)[1:]
    assert _renders(proxy) == {"full": 1, "differs": 1, "untrusted": 2}


@pytest.mark.parametrize(
    "fake_and_proxy",
    [({"refuse_stand_in": True}, {"token_in_check_first": 2, "token_in_check_every": 4})],
    indirect=True,
)
def test_a_template_that_refuses_the_stand_in_keeps_token_in_with_full_renders(
    fake_and_proxy: tuple[TemplateFake, Proxy],
) -> None:
    """A checked call whose stand-in render is refused uses its full render (it succeeded) and the
    template learns: later calls render in full rather than fall back."""
    fake, proxy = fake_and_proxy
    sent = _converse(proxy, 5)
    prompts = [c["kv_transfer_params"]["prompt_token_ids"] for c in fake.chats[1:]]
    assert prompts == _expected_prompts(fake, sent)[1:]
    rows = proxy.rows("SELECT drift, token_in_fallback FROM llm_calls ORDER BY seq")
    assert [(r["drift"], r["token_in_fallback"]) for r in rows] == [("first", "first_call")] + [
        ("token_in", None)
    ] * 4
    assert _renders(proxy) == {"full": 1, "differs": 1, "untrusted": 2}
    refused = [m for m in fake.tokenized if {"role": "user", "content": "."} in m]
    assert len(refused) == 2  # the first checked call's two stand-in renders, never again


@pytest.mark.parametrize(
    "fake_and_proxy",
    [({}, {"token_in_check_first": 1, "token_in_check_every": 0})],
    indirect=True,
)
def test_a_kept_stand_in_render_the_template_no_longer_gives_is_rendered_again(
    fake_and_proxy: tuple[TemplateFake, Proxy],
) -> None:
    """A template whose system message changes between calls (today's date): the kept render of the
    stand-in history is no longer a prefix, so it is rendered again and the call stays exact."""
    fake, proxy = fake_and_proxy

    def new_day(number: int) -> None:
        if number == 3:
            fake.epoch = 1

    sent = _converse(proxy, 6, between=new_day)
    fake.epoch = 0  # the first prompt, the only one holding the system message, was made before
    prompts = [c["kv_transfer_params"]["prompt_token_ids"] for c in fake.chats[1:]]
    assert prompts == _expected_prompts(fake, sent)[1:]
    assert _renders(proxy) == {"full": 1, "checked": 1, "stand_in": 3}
    histories = [m for m in fake.tokenized if m[-1] == {"role": "assistant", "content": "."}]
    assert len(histories) == 2  # rendered by the checked call, then again on the new day


@pytest.mark.parametrize(
    "fake_and_proxy",
    [({}, {"token_in_check_first": 1, "token_in_check_every": 0})],
    indirect=True,
)
def test_a_tokenize_failure_that_is_not_the_templates_falls_back_that_call_alone(
    fake_and_proxy: tuple[TemplateFake, Proxy],
) -> None:
    """A 429 (or 401, 404, 5xx) from /tokenize says nothing of the template, even when only the
    stand-in render got it: the calls meanwhile fall back, and the stand-in is used again once
    /tokenize answers."""
    fake, proxy = fake_and_proxy

    def busy(number: int) -> None:
        fake.tokenize_status = 429 if number in (2, 3) else 200

    _converse(proxy, 6, between=busy)
    rows = proxy.rows("SELECT drift, token_in_fallback FROM llm_calls ORDER BY seq")
    assert [r["token_in_fallback"] for r in rows] == [
        "first_call",
        None,
        None,
        "tokenize_failed",
        "tokenize_failed",
        None,
    ]
    (trust,) = proxy.runtime.relay.token_in.templates().values()  # type: ignore[union-attr]
    assert not trust.differs
    assert _renders(proxy) == {"full": 1, "checked": 1, "stand_in": 1}  # call 5: the stand-in again
