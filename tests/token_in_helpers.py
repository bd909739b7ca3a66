"""Multi-turn conversations driven the way agents drive them, and the checks of one exact sequence.

Shared by the token-in tests on the real vLLM and by ``bench/token_in_check.py``: the client appends
the assistant reply it received (content and/or tool calls) and a new user or tool message, then
sends the whole history again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
USER_TURNS = [
    "What is the weather in Paris?",
    "And in Rome?",
    "Compare both, briefly.",
    "Thanks. One more: Oslo?",
    "Summarise everything.",
]


@dataclass
class Turn:
    """What the client saw of one call."""

    prompt_ids: list[int]
    generated_ids: list[list[int]]  # per choice
    messages: list[dict[str, Any]]  # per choice: the assistant message as the client assembled it
    finish_reasons: list[str | None]
    seconds: float = 0.0  # from sending the request to the end of the answer


@dataclass
class Conversation:
    trajectory_id: str
    turns: list[Turn] = field(default_factory=list)


def chat(
    client: httpx.Client,
    base: str,
    trajectory_id: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> Turn:
    """One chat call through the proxy (streamed when ``body["stream"]``), as the client sees it."""
    sent = {"X-Trajectory-Id": trajectory_id, **(headers or {})}
    started = time.perf_counter()
    turn = _chat(client, base, body, sent)
    turn.seconds = time.perf_counter() - started
    return turn


def _chat(client: httpx.Client, base: str, body: dict[str, Any], sent: dict[str, str]) -> Turn:
    if not body.get("stream"):
        response = client.post(base + "/v1/chat/completions", json=body, headers=sent)
        response.raise_for_status()
        answer = response.json()
        choices = sorted(answer["choices"], key=lambda c: c["index"])
        return Turn(
            answer["prompt_token_ids"],
            [c["token_ids"] for c in choices],
            [_as_sent(c["message"]) for c in choices],
            [c["finish_reason"] for c in choices],
        )
    prompt: list[int] = []
    ids: dict[int, list[int]] = {}
    messages: dict[int, dict[str, Any]] = {}
    finish: dict[int, str | None] = {}
    with client.stream("POST", base + "/v1/chat/completions", json=body, headers=sent) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("prompt_token_ids"):
                prompt = chunk["prompt_token_ids"]
            for choice in chunk.get("choices") or []:
                index = choice["index"]
                ids.setdefault(index, []).extend(choice.get("token_ids") or [])
                message = messages.setdefault(index, {"role": "assistant", "content": ""})
                delta = choice.get("delta") or {}
                message["content"] += delta.get("content") or ""
                for call in delta.get("tool_calls") or []:
                    calls = message.setdefault("tool_calls", [])
                    while len(calls) <= call["index"]:
                        empty = {"name": "", "arguments": ""}
                        calls.append({"id": "", "type": "function", "function": empty})
                    target = calls[call["index"]]
                    target["id"] = call.get("id") or target["id"]
                    function = call.get("function") or {}
                    target["function"]["name"] += function.get("name") or ""
                    target["function"]["arguments"] += function.get("arguments") or ""
                if choice.get("finish_reason"):
                    finish[index] = choice["finish_reason"]
    order = sorted(ids)
    return Turn(prompt, [ids[i] for i in order], [messages[i] for i in order], [finish.get(i) for i in order])


def _as_sent(message: dict[str, Any]) -> dict[str, Any]:
    """The assistant message as an agent sends it back (the openai SDK keeps the null fields)."""
    kept = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        kept["tool_calls"] = message["tool_calls"]
    return kept


def converse(
    client: httpx.Client,
    base: str,
    trajectory_id: str,
    *,
    turns: int = 3,
    stream: bool = False,
    max_tokens: int = 8,
    tool_first: bool = False,
    headers: dict[str, str] | None = None,
    system: str = "You are terse.",
    extra_body: dict[str, Any] | None = None,
) -> Conversation:
    """A multi-turn chat; with ``tool_first`` the first call is a forced tool call and the second
    message after it is the tool's result."""
    conversation = Conversation(trajectory_id)
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for number in range(turns):
        messages.append({"role": "user", "content": USER_TURNS[number % len(USER_TURNS)]})
        body: dict[str, Any] = {
            "model": "tiny",
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "return_token_ids": True,
            "stream": stream,
            **(extra_body or {}),
        }
        if tool_first:
            body["tools"] = TOOLS
            if number == 0:
                body["tool_choice"] = "required"
                body["max_tokens"] = 64
                body.pop("ignore_eos", None)  # the forced call must end after its one tool call
        turn = chat(client, base, trajectory_id, body, headers)
        conversation.turns.append(turn)
        reply = turn.messages[0]
        messages = [*messages, reply]
        for call in reply.get("tool_calls") or []:
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"})
    return conversation


def one_sequence_problems(base: str, conversation: Conversation) -> list[str]:
    """What keeps the trajectory from being one exact sequence (empty: it is one).

    One merged sequence, no prefix mismatch, equal to the last call's prompt + generated IDs, and the
    loss mask 1 exactly on the generated tokens of every call.
    """
    body = httpx.get(f"{base}/tokentrail/v1/trajectories/{conversation.trajectory_id}/sequences").json()
    problems = []
    if len(body["sequences"]) != 1:
        problems.append(f"{len(body['sequences'])} sequences")
    if body["prefix_mismatches"]:
        problems.append(f"mismatches {body['prefix_mismatches']}")
    if problems:
        return problems
    sequence = body["sequences"][0]
    last = conversation.turns[-1]
    if sequence["input_ids"] != last.prompt_ids + last.generated_ids[0]:
        problems.append("input_ids != last prompt + last generated")
    mask = [0] * len(sequence["input_ids"])
    for turn in conversation.turns:
        start = len(turn.prompt_ids)
        for position in range(start, start + len(turn.generated_ids[0])):
            if position < len(mask):
                mask[position] = 1
    if sequence["loss_mask"] != mask:
        problems.append("loss mask is not 1 exactly on the generated tokens")
    return problems


def calls_of(base: str, trajectory_id: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{base}/tokentrail/v1/trajectories/{trajectory_id}")
    response.raise_for_status()
    calls: list[dict[str, Any]] = response.json()["calls"]
    return calls
