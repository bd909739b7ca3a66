"""Token-in on the real CPU vLLM: every continuing call gets its trajectory's exact IDs.

For each token-in trajectory: one merged sequence, no prefix mismatch, equal to the last call's
prompt + generated IDs, the loss mask 1 exactly on every generated token of every call, and each
call's drift recorded (``first``, then ``token_in``). The tiny model's text is gibberish and where it
stops is machine-dependent, so the checks compare relations (IDs the client saw with IDs recorded),
never texts.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from strands.types.exceptions import MaxTokensReachedException

from tests.conftest import Proxy, running_proxy
from tests.token_in_helpers import TOOLS, Conversation, Turn, calls_of, chat, converse, one_sequence_problems
from tokentrail.proxy.storage.engine import make_engine
from tokentrail.proxy.storage.queries import TrajectoryFilter
from tokentrail.proxy.training.export import export

pytestmark = pytest.mark.vllm


@pytest.fixture
def token_in_proxy(vllm_url: str, tmp_path: Path) -> Iterator[Proxy]:
    with running_proxy(vllm_url, tmp_path, token_in=True) as proxy:
        yield proxy


@pytest.fixture
def stand_in_proxy(vllm_url: str, tmp_path: Path) -> Iterator[Proxy]:
    """Token-in that trusts the stand-in history at once and never checks it: every continuing call
    whose history is longer than a stand-in renders only the new messages."""
    with running_proxy(
        vllm_url, tmp_path, token_in=True, token_in_check_first=0, token_in_check_every=0
    ) as proxy:
        yield proxy


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=120) as http:
        yield http


def _text(proxy: Proxy, tokens: list[int]) -> str:
    response = httpx.post(proxy.url + "/detokenize", json={"model": "tiny", "tokens": tokens}, timeout=60)
    response.raise_for_status()
    text: str = response.json()["prompt"]
    return text


def assert_reads_as_the_template_renders_it(proxy: Proxy, call: dict[str, Any]) -> None:
    """The token-in prompt decodes to the text vLLM's template makes of the call's messages: the
    previous replies' IDs are the model's own, everything around them is the template's (end-of-turn
    tokens included). Holds for text replies (a tool call is rendered from parsed JSON instead)."""
    request = call["request"]
    rendered = httpx.post(
        proxy.url + "/tokenize",
        json={"model": "tiny", "messages": request["messages"], "add_generation_prompt": True},
        timeout=60,
    ).json()["tokens"]
    assert _text(proxy, call["prompt_token_ids"]) == _text(proxy, rendered)


def assert_token_in_trajectory(
    proxy: Proxy, conversation: Conversation, *, text_replies: bool = True
) -> list[dict[str, Any]]:
    proxy.wait_all_records()
    assert one_sequence_problems(proxy.url, conversation) == []
    calls = calls_of(proxy.url, conversation.trajectory_id)
    assert [c["drift"] for c in calls] == ["first"] + ["token_in"] * (len(calls) - 1)
    assert [c["token_in_fallback"] for c in calls] == ["first_call"] + [None] * (len(calls) - 1)
    # The client saw the IDs vLLM used, the ones recorded (tokentrail.client's TokenManager relies on it).
    assert [c["prompt_token_ids"] for c in calls] == [t.prompt_ids for t in conversation.turns]
    if text_replies:
        for call in calls[1:]:
            assert_reads_as_the_template_renders_it(proxy, call)
    token_in = proxy.runtime.relay.token_in
    assert token_in is not None
    assert not any(t.differs for t in token_in.templates().values())  # vLLM's template, both ways
    return calls


@pytest.mark.parametrize(
    ("stream", "max_tokens"),
    [(False, 24), (True, 24), (False, 3), (True, 3)],
    ids=["plain", "streamed", "cut-at-max-tokens", "streamed-cut"],
)
def test_a_multi_turn_chat_is_one_exact_sequence_with_token_in(
    token_in_proxy: Proxy, client: httpx.Client, stream: bool, max_tokens: int
) -> None:
    conversation = converse(
        client,
        token_in_proxy.url,
        f"chat-{stream}-{max_tokens}",
        turns=4,
        stream=stream,
        max_tokens=max_tokens,
    )
    assert_token_in_trajectory(token_in_proxy, conversation)
    if max_tokens == 3:  # cut: the model never sampled <|im_end|>, the template's tail was added
        assert all(t.finish_reasons == ["length"] for t in conversation.turns)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_tool_loop_is_one_exact_sequence_and_the_tool_call_still_comes_back_parsed(
    token_in_proxy: Proxy, client: httpx.Client, stream: bool
) -> None:
    conversation = converse(
        client, token_in_proxy.url, f"tools-{stream}", turns=4, stream=stream, tool_first=True
    )
    assert conversation.turns[0].messages[0]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert_token_in_trajectory(token_in_proxy, conversation, text_replies=False)
    # A forced tool call sent token-in still comes back parsed (messages drive the tool parser).
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather?"}]
    first = chat(
        client, token_in_proxy.url, "forced-again", _body(messages, tools=TOOLS, tool_choice="required")
    )
    call_id = first.messages[0]["tool_calls"][0]["id"]
    messages += [first.messages[0], {"role": "tool", "tool_call_id": call_id, "content": "sunny"}]
    second = chat(
        client, token_in_proxy.url, "forced-again", _body(messages, tools=TOOLS, tool_choice="required")
    )
    assert second.messages[0]["tool_calls"][0]["function"]["name"] == "get_weather"
    token_in_proxy.wait_all_records()
    assert [c["drift"] for c in calls_of(token_in_proxy.url, "forced-again")] == ["first", "token_in"]


@pytest.mark.parametrize(
    ("stream", "max_tokens", "tool_first"),
    [(False, 24, False), (True, 3, False), (False, 3, False), (False, 24, True), (True, 24, True)],
    ids=["plain", "streamed-cut", "cut-at-max-tokens", "tool-loop", "tool-loop-streamed"],
)
def test_new_tokens_rendered_after_a_stand_in_history_are_exactly_what_vllm_renders(
    stand_in_proxy: Proxy, client: httpx.Client, stream: bool, max_tokens: int, tool_first: bool
) -> None:
    """The proof of the stand-in on vLLM's own template: vLLM's prompt IDs are the IDs sent (the
    client's, the records' and token-in's agree, no ``upstream_ignored_ids``), and they decode to
    what vLLM's template makes of the messages, with tools, tool results and replies cut short."""
    conversation = converse(
        client,
        stand_in_proxy.url,
        f"stand-in-{stream}-{max_tokens}-{tool_first}",
        turns=5,
        stream=stream,
        max_tokens=max_tokens,
        tool_first=tool_first,
    )
    calls = assert_token_in_trajectory(stand_in_proxy, conversation, text_replies=not tool_first)
    if tool_first:  # the tool call is re-rendered from JSON by the template: compare after it
        for call in calls[2:]:
            assert_reads_as_the_template_renders_it_after_the_tool_call(stand_in_proxy, calls[1], call)
    metrics = httpx.get(stand_in_proxy.url + "/tokentrail/metrics", timeout=30).text
    assert 'tokentrail_token_in_renders_total{how="stand_in"} 3.0' in metrics  # calls 2, 3, 4


def assert_reads_as_the_template_renders_it_after_the_tool_call(
    proxy: Proxy, first_after: dict[str, Any], call: dict[str, Any]
) -> None:
    """After the forced tool call (whose IDs the template would re-render from JSON), the prompt of
    ``call`` decodes to vLLM's rendering of its messages, tools included: compared from where
    ``first_after``'s prompt ends, as text."""
    request = call["request"]
    rendered = httpx.post(
        proxy.url + "/tokenize",
        json={
            "model": "tiny",
            "messages": request["messages"],
            "tools": request["tools"],
            "add_generation_prompt": True,
        },
        timeout=60,
    ).json()["tokens"]
    before = httpx.post(
        proxy.url + "/tokenize",
        json={
            "model": "tiny",
            "messages": first_after["request"]["messages"],
            "tools": request["tools"],
            "add_generation_prompt": True,
        },
        timeout=60,
    ).json()["tokens"]
    assert rendered[: len(before)] == before
    mine = call["prompt_token_ids"][len(first_after["prompt_token_ids"]) :]
    assert _text(proxy, mine) == _text(proxy, rendered[len(before) :])


class NullSink:
    def write(self, sequences: list[Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _body(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "model": "tiny",
        "messages": messages,
        "max_tokens": 64,
        "temperature": 0,
        "return_token_ids": True,
        **extra,
    }


def test_an_n2_call_followed_by_one_branch_continues_that_branch(
    token_in_proxy: Proxy, client: httpx.Client
) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Tell me two things."}]
    forked = chat(
        client,
        token_in_proxy.url,
        "fork",
        _body(messages, n=2, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True),
    )
    assert len(forked.generated_ids) == 2
    branch = 1 if forked.messages[1] != forked.messages[0] else 0
    messages += [forked.messages[branch], {"role": "user", "content": "Go on."}]
    after = chat(client, token_in_proxy.url, "fork", _body(messages, max_tokens=6))
    token_in_proxy.wait_all_records()
    calls = calls_of(token_in_proxy.url, "fork")
    assert [c["drift"] for c in calls] == ["first", "token_in"]
    assert after.prompt_ids[: len(forked.prompt_ids) + 12] == forked.prompt_ids + forked.generated_ids[branch]
    body = httpx.get(f"{token_in_proxy.url}/tokentrail/v1/trajectories/fork/sequences").json()
    assert body["prefix_mismatches"] == []
    continued = next(s for s in body["sequences"] if len(s["call_ids"]) == 2)
    assert continued["choice_indexes"] == [branch, 0]
    assert continued["input_ids"] == after.prompt_ids + after.generated_ids[0]


def test_edited_history_falls_back_with_its_reason_and_the_call_goes_on(
    token_in_proxy: Proxy, client: httpx.Client
) -> None:
    conversation = converse(client, token_in_proxy.url, "edited", turns=2, max_tokens=6)
    history: list[dict[str, Any]] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Something else entirely."},  # the first question, rewritten
        conversation.turns[0].messages[0],
        {"role": "user", "content": "And?"},
    ]
    edited = chat(client, token_in_proxy.url, "edited", _body(history, max_tokens=6))
    system = [{**history[0], "content": "You are verbose."}, *history[1:]]
    changed = chat(client, token_in_proxy.url, "edited", _body(system, max_tokens=6))
    assert edited.generated_ids
    assert changed.generated_ids
    token_in_proxy.wait_all_records()
    calls = calls_of(token_in_proxy.url, "edited")
    assert [c["token_in_fallback"] for c in calls] == ["first_call", None, "history_edited", "system_changed"]
    assert [c["drift"] for c in calls] == ["first", "token_in", "edited", "edited"]
    assert all(c["outcome"] == "ok" for c in calls)
    summary = export(make_engine(token_in_proxy.db_url), NullSink(), TrajectoryFilter())
    assert summary.breaks == {"edited": 2}
    assert "2 prefix mismatches (edited 2), 0 trajectories as one sequence" in summary.line()
    assert calls[3]["drift_position"] is not None
    assert calls[3]["drift_position"] < 8


def test_the_header_turns_token_in_off_for_one_call_and_the_drift_is_still_diagnosed(
    token_in_proxy: Proxy, client: httpx.Client
) -> None:
    conversation = converse(
        client, token_in_proxy.url, "header-off", turns=3, headers={"X-TokenTrail-Token-In": "false"}
    )
    token_in_proxy.wait_all_records()
    calls = calls_of(token_in_proxy.url, "header-off")
    assert [c["token_in_fallback"] for c in calls] == [None, None, None]
    assert calls[0]["drift"] == "first"
    assert {c["drift"] for c in calls[1:]} <= {"extends", "retokenized", "template"}
    expected = [
        "extends"
        if t.prompt_ids[: len(p.prompt_ids) + len(p.generated_ids[0])] == p.prompt_ids + p.generated_ids[0]
        else "retokenized"
        for p, t in zip(conversation.turns, conversation.turns[1:], strict=False)
    ]
    assert [c["drift"] for c in calls[1:]] == expected


def test_a_restarted_proxy_continues_the_trajectory_from_the_database(
    vllm_url: str, tmp_path: Path, client: httpx.Client, db_url: str
) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Hello there"}]
    turns: list[Turn] = []
    for number in range(4):
        with running_proxy(vllm_url, tmp_path, db_url=db_url, token_in=True) as proxy:
            turn = chat(client, proxy.url, "restarted", _body(messages, max_tokens=5, stream=number % 2 == 1))
            turns.append(turn)
            proxy.wait_all_records()
            if number == 3:
                assert_token_in_trajectory(proxy, Conversation("restarted", turns))
        messages += [turn.messages[0], {"role": "user", "content": f"Next {number}."}]


def test_sixteen_concurrent_trajectories_each_stay_one_exact_sequence(
    token_in_proxy: Proxy, client: httpx.Client
) -> None:
    results: dict[int, Conversation] = {}
    errors: list[BaseException] = []

    def run(number: int) -> None:
        try:
            with httpx.Client(timeout=120) as own:
                results[number] = converse(
                    own,
                    token_in_proxy.url,
                    f"concurrent-{number}",
                    turns=3,
                    stream=number % 2 == 0,
                    max_tokens=4 + number % 5,
                    tool_first=number % 4 == 1,
                )
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for number in range(16):
        assert_token_in_trajectory(token_in_proxy, results[number], text_replies=number % 4 != 1)


def test_the_openai_sdk_sending_back_its_message_objects_gets_one_exact_sequence(
    token_in_proxy: Proxy,
) -> None:
    sdk = openai.OpenAI(
        base_url=token_in_proxy.url + "/v1",
        api_key="none",
        default_headers={"X-Trajectory-Id": "sdk"},
        max_retries=0,
    )
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    turns = []
    for number in range(3):
        response = sdk.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=64 if number == 0 else 8,
            temperature=0,
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice="required" if number == 0 else "auto",
            extra_body={"return_token_ids": True},
        )
        data = response.model_dump()
        choice = data["choices"][0]
        turns.append(Turn(data["prompt_token_ids"], [choice["token_ids"]], [choice["message"]], [None]))
        message = response.choices[0].message
        messages.append(message)  # the SDK's own object, with its null fields
        for call in message.tool_calls or []:
            messages.append({"role": "tool", "tool_call_id": call.id, "content": "sunny"})
        messages.append({"role": "user", "content": "And now?"})
    assert_token_in_trajectory(token_in_proxy, Conversation("sdk", turns), text_replies=False)


def test_a_strands_agent_with_a_tool_through_tokentrail_client_stays_one_sequence(
    token_in_proxy: Proxy,
) -> None:
    from strands import Agent, tool
    from strands.hooks import BeforeModelCallEvent

    from tokentrail.client import TokenManager, VLLMModel, VLLMTokenRecorder, trajectory

    @tool
    def get_weather(city: str = "Paris") -> str:
        """Get the current weather for a city."""
        return f"sunny in {city}"

    greedy = {"temperature": 0, "max_tokens": 12}
    model = VLLMModel(
        base_url=token_in_proxy.url + "/v1",
        model_id="tiny",
        return_token_ids=True,
        params={**greedy, "max_tokens": 64, "tool_choice": "required"},
    )
    calls = {"n": 0}

    def free_after_first(event: BeforeModelCallEvent) -> None:
        calls["n"] += 1
        if calls["n"] > 1:
            model.update_config(params=greedy)

    recorder = VLLMTokenRecorder()
    agent = Agent(model=model, tools=[get_weather], callback_handler=recorder)
    agent.hooks.add_callback(BeforeModelCallEvent, free_after_first)
    with trajectory() as run:
        for prompt in ("What is the weather in Paris?", "And tomorrow?"):
            with contextlib.suppress(MaxTokensReachedException):
                agent(prompt)
    token_in_proxy.wait_all_records()
    stored = calls_of(token_in_proxy.url, run.id)
    assert len(stored) >= 3
    assert stored[0]["completions"][0]["message"]["tool_calls"]
    # The recorder saw exactly the IDs that were stored (Strands raises on a reply cut at
    # max_tokens before its callback, so those calls are not in its history).
    seen = [(c["prompt_token_ids"], c["completions"][0]["token_ids"]) for c in stored]
    assert recorder.history
    assert all((e["prompt_token_ids"], e["token_ids"]) in seen for e in recorder.history)
    turns = [Turn(prompt, [generated], [{}], [None]) for prompt, generated in seen]
    manager = TokenManager()
    assert all(manager.add_turn(t.prompt_ids, t.generated_ids[0]) for t in turns)
    assert_token_in_trajectory(token_in_proxy, Conversation(run.id, turns), text_replies=False)


def test_the_token_in_check_script_runs_and_token_in_makes_every_trajectory_one_sequence(
    vllm_url: str,
) -> None:
    done = subprocess.run(
        [sys.executable, "bench/token_in_check.py", "--upstream", vllm_url, "--turns", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    rows = {
        line.split("|")[1].strip(): line.split("|")
        for line in done.stdout.splitlines()
        if line.startswith("| ")
    }
    token_in = rows["token-in"]
    assert token_in[4].strip() == "10"  # merged sequences: one per trajectory
    assert token_in[5].strip() == "10/10"
    assert token_in[6].strip() == "0 (-)"
    assert int(rows["off"][3]) == int(token_in[3]) == 20  # the same calls in both modes
    assert "token-in fallbacks first_call 10" in done.stdout
