"""tokentrail.client with real Strands agents, through the real proxy, to the real CPU vLLM."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from strands import Agent, tool
from strands.hooks import AfterModelCallEvent, BeforeModelCallEvent
from strands.types.exceptions import MaxTokensReachedException

from tests.conftest import Proxy
from tokentrail.client import (
    VLLMModel,
    VLLMTokenRecorder,
    VLLMToolValidationHooks,
    current_trajectory_id,
    trajectory,
)

pytestmark = pytest.mark.vllm

GREEDY = {"temperature": 0, "max_tokens": 24}
WEATHER_PROMPT = "What is the weather in Paris?"
_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    trace.set_tracer_provider(provider)
    yield _EXPORTER
    provider.shutdown()


def run_agent(agent: Agent, prompt: str) -> None:
    """Run one agent turn; the tiny model may stop at max_tokens, which Strands raises."""
    with contextlib.suppress(MaxTokensReachedException):
        agent(prompt)


def _calls(proxy: Proxy, trajectory_id: str) -> list[dict[str, Any]]:
    rows = proxy.rows(
        "SELECT c.seq, c.prompt_token_ids, c.request, c.outcome, d.token_ids, d.message "
        "FROM llm_calls c JOIN completions d ON d.call_id = c.id AND d.choice_index = 0 "
        "WHERE c.trajectory_id = :t ORDER BY c.seq",
        t=trajectory_id,
    )
    for row in rows:
        for key in ("prompt_token_ids", "token_ids", "request", "message"):
            row[key] = json.loads(row[key])
    return rows


def test_recorder_ids_equal_what_the_proxy_stored_and_land_on_chat_spans(
    vllm_proxy: Proxy, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    model = VLLMModel(base_url=vllm_proxy.url + "/v1", model_id="tiny", return_token_ids=True, params=GREEDY)
    recorder = VLLMTokenRecorder()
    agent = Agent(model=model, callback_handler=recorder)
    with trajectory("agent-run-1") as run:
        run_agent(agent, "What is the capital of France?")
        run_agent(agent, "Hello!")
    assert run.id == "agent-run-1"
    assert recorder.trajectory_id == "agent-run-1"
    vllm_proxy.wait_records(2)
    stored = _calls(vllm_proxy, "agent-run-1")
    assert [row["seq"] for row in stored] == [0, 1]
    assert len(recorder.history) == 2
    for entry, row in zip(recorder.history, stored, strict=True):
        assert entry["prompt_token_ids"] == row["prompt_token_ids"]
        assert entry["token_ids"] == row["token_ids"]
        assert entry["trajectory_id"] == "agent-run-1"
    assert recorder.token_ids == stored[-1]["token_ids"]
    chat_spans = [s for s in spans.get_finished_spans() if s.name == "chat"]
    assert len(chat_spans) == 2
    for span, row in zip(chat_spans, stored, strict=True):
        attributes = span.attributes or {}
        assert list(attributes["llm.hosted_vllm.prompt_token_ids"]) == row["prompt_token_ids"]  # type: ignore[arg-type]
        assert list(attributes["llm.hosted_vllm.response_token_ids"]) == row["token_ids"]  # type: ignore[arg-type]
        assert attributes["llm.token_count.prompt"] == len(row["prompt_token_ids"])
        assert attributes["llm.token_count.completion"] == len(row["token_ids"])


def test_without_return_token_ids_the_client_gets_none_but_the_proxy_keeps_them(vllm_proxy: Proxy) -> None:
    model = VLLMModel(base_url=vllm_proxy.url + "/v1", model_id="tiny", params=GREEDY, trajectory_id="plain")
    recorder = VLLMTokenRecorder()
    run_agent(Agent(model=model, callback_handler=recorder), "Hello!")
    assert recorder.history == []
    assert recorder.trajectory_id == "plain"
    vllm_proxy.wait_records(1)
    (row,) = _calls(vllm_proxy, "plain")
    assert row["prompt_token_ids"]
    assert row["token_ids"]


def test_non_streaming_calls_keep_their_token_ids(vllm_proxy: Proxy) -> None:
    model = VLLMModel(
        base_url=vllm_proxy.url + "/v1",
        model_id="tiny",
        return_token_ids=True,
        params={**GREEDY, "stream": False},
        trajectory_id="no-stream",
    )
    recorder = VLLMTokenRecorder()
    run_agent(Agent(model=model, callback_handler=recorder), "Hello!")
    vllm_proxy.wait_records(1)
    (row,) = _calls(vllm_proxy, "no-stream")
    assert recorder.history[0]["token_ids"] == row["token_ids"]
    assert recorder.history[0]["prompt_token_ids"] == row["prompt_token_ids"]
    assert row["request"]["stream"] is False


@tool
def get_weather(city: str = "Paris") -> str:
    """Get the current weather for a city."""
    return f"WEATHER-MARKER sunny in {city}"


def _free_after_first_call(model: VLLMModel) -> Any:
    """A hook that lets the first model call be forced to use a tool, and no later one."""
    seen = {"calls": 0}

    def hook(event: BeforeModelCallEvent) -> None:
        seen["calls"] += 1
        if seen["calls"] > 1:
            model.update_config(params=GREEDY)

    return hook


def test_a_tool_call_result_reaches_the_next_prompt_and_all_turns_are_stored(
    vllm_url: str, vllm_proxy: Proxy
) -> None:
    model = VLLMModel(
        base_url=vllm_proxy.url + "/v1",
        model_id="tiny",
        return_token_ids=True,
        params={**GREEDY, "max_tokens": 64, "tool_choice": "required"},
    )
    agent = Agent(model=model, tools=[get_weather], callback_handler=None)
    agent.hooks.add_callback(BeforeModelCallEvent, _free_after_first_call(model))
    with trajectory() as run:
        run_agent(agent, WEATHER_PROMPT)
    vllm_proxy.wait_records(2)
    first, second = _calls(vllm_proxy, run.id)
    assert first["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    tool_messages = [m for m in second["request"]["messages"] if m["role"] == "tool"]
    assert "WEATHER-MARKER sunny in Paris" in json.dumps(tool_messages)
    prompt_text = httpx.post(
        vllm_url + "/detokenize", json={"model": "tiny", "tokens": second["prompt_token_ids"]}
    ).json()["prompt"]
    assert "WEATHER-MARKER sunny in Paris" in prompt_text


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression."""
    return "42"


@tool
def search(query: str) -> str:
    """Search the web."""
    return "nothing found"


@tool
def forecast(city: str) -> str:
    """Get tomorrow's weather for a city."""
    return "rain"


def _tool_results(agent: Agent) -> list[str]:
    return [
        block["toolResult"]["content"][0]["text"]
        for message in agent.messages
        for block in message["content"]
        if "toolResult" in block
    ]


def test_hook_reports_a_missing_argument_the_model_left_out(vllm_proxy: Proxy) -> None:
    model = VLLMModel(
        base_url=vllm_proxy.url + "/v1",
        model_id="tiny",
        params={**GREEDY, "max_tokens": 64, "tool_choice": "required"},
    )
    agent = Agent(model=model, tools=[forecast], hooks=[VLLMToolValidationHooks()], callback_handler=None)
    agent.hooks.add_callback(BeforeModelCallEvent, _free_after_first_call(model))
    with trajectory() as run:
        run_agent(agent, WEATHER_PROMPT)
    assert _tool_results(agent)[0] == "Error: tool_name=<forecast> | missing required argument(s): city"
    vllm_proxy.wait_records(2)
    second = _calls(vllm_proxy, run.id)[1]
    assert "missing required argument(s): city" in json.dumps(second["request"]["messages"])


@pytest.mark.parametrize(
    ("hooks", "expected"),
    [
        (VLLMToolValidationHooks(), "Error: unknown tool: fake_tool | allowed_tools=[calculator, search]"),
        (VLLMToolValidationHooks(include_allowed_tools_in_errors=False), "Error: unknown tool: fake_tool"),
        (
            VLLMToolValidationHooks(max_allowed_tools_in_error=1),
            "Error: unknown tool: fake_tool | allowed_tools=[calculator, ... (+1 more)]",
        ),
    ],
    ids=["with-allowed-tools", "without-allowed-tools", "truncated"],
)
def test_hook_reports_an_unknown_tool(
    vllm_proxy: Proxy, hooks: VLLMToolValidationHooks, expected: str
) -> None:
    @tool
    def fake_tool() -> str:
        """A tool that disappears once the model has chosen it."""
        return "never"

    model = VLLMModel(
        base_url=vllm_proxy.url + "/v1",
        model_id="tiny",
        params={
            **GREEDY,
            "max_tokens": 64,
            "tool_choice": {"type": "function", "function": {"name": "fake_tool"}},
        },
    )
    agent = Agent(model=model, tools=[calculator, search, fake_tool], hooks=[hooks], callback_handler=None)
    agent.hooks.add_callback(BeforeModelCallEvent, _free_after_first_call(model))

    def forget_fake_tool(event: AfterModelCallEvent) -> None:
        event.agent.tool_registry.registry.pop("fake_tool", None)

    agent.hooks.add_callback(AfterModelCallEvent, forget_fake_tool)
    run_agent(agent, "Use a tool.")
    assert _tool_results(agent)[0] == expected


def test_hook_reports_unknown_and_missing_arguments_of_direct_tool_calls(vllm_proxy: Proxy) -> None:
    model = VLLMModel(base_url=vllm_proxy.url + "/v1", model_id="tiny")
    agent = Agent(model=model, tools=[calculator], hooks=[VLLMToolValidationHooks()], callback_handler=None)
    unknown = agent.tool.calculator(expression="1+1", invalid_param="x")
    missing = agent.tool.calculator()
    assert (
        unknown["content"][0]["text"] == "Error: tool_name=<calculator> | unknown argument(s): invalid_param"
    )
    assert (
        missing["content"][0]["text"]
        == "Error: tool_name=<calculator> | missing required argument(s): expression"
    )


def test_two_concurrent_agents_in_one_process_make_two_trajectories(vllm_proxy: Proxy) -> None:
    async def one(name: str) -> str | None:
        model = VLLMModel(
            base_url=vllm_proxy.url + "/v1", model_id="tiny", return_token_ids=True, params=GREEDY
        )
        agent = Agent(model=model, callback_handler=None)
        with trajectory(name):
            for prompt in ("Hello!", "What is the capital of France?"):
                with contextlib.suppress(MaxTokensReachedException):
                    await agent.invoke_async(prompt)
            return current_trajectory_id()

    async def both() -> list[str | None]:
        return list(await asyncio.gather(one("left"), one("right")))

    assert asyncio.run(both()) == ["left", "right"]
    vllm_proxy.wait_records(4)
    rows = vllm_proxy.rows("SELECT trajectory_id, seq FROM llm_calls ORDER BY trajectory_id, seq")
    assert [(r["trajectory_id"], r["seq"]) for r in rows] == [
        ("left", 0),
        ("left", 1),
        ("right", 0),
        ("right", 1),
    ]


def test_invocation_state_overrides_the_context_and_the_model_default(vllm_proxy: Proxy) -> None:
    model = VLLMModel(
        base_url=vllm_proxy.url + "/v1", model_id="tiny", params=GREEDY, trajectory_id="default"
    )
    agent = Agent(model=model, callback_handler=None)
    with trajectory("from-context"), contextlib.suppress(MaxTokensReachedException):
        agent("Hello!", invocation_state={"trajectory_id": "from-call"})
    with contextlib.suppress(MaxTokensReachedException):
        agent("Hello!")
    vllm_proxy.wait_records(2)
    rows = vllm_proxy.rows("SELECT trajectory_id FROM llm_calls ORDER BY received_at")
    assert [r["trajectory_id"] for r in rows] == ["from-call", "default"]
