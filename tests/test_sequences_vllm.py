"""Training sequences of a real multi-turn run through the proxy to the CPU vLLM."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Proxy

pytestmark = pytest.mark.vllm

TURNS = ["What is the weather in Paris?", "And in Rome?", "Thanks. Summarise both."]


def converse(proxy: Proxy, trajectory_id: str, systems: list[str]) -> list[dict[str, Any]]:
    """A chat whose message list grows turn by turn, as the openai SDK user would write it."""
    messages: list[dict[str, str]] = []
    reported = []
    for system, user in zip(systems, TURNS, strict=True):
        messages = [{"role": "system", "content": system}, *messages[1:]]
        messages.append({"role": "user", "content": user})
        body = {
            "model": "tiny",
            "messages": messages,
            "max_tokens": 8,
            "temperature": 0,
            "return_token_ids": True,
        }
        response = httpx.post(
            proxy.url + "/v1/chat/completions",
            json=body,
            headers={"X-Trajectory-Id": trajectory_id},
            timeout=60,
        )
        answer = response.json()
        choice = answer["choices"][0]
        reported.append({"prompt": answer["prompt_token_ids"], "generated": choice["token_ids"]})
        messages.append({"role": "assistant", "content": choice["message"]["content"]})
    return reported


def expected_mismatches(reported: list[dict[str, Any]]) -> list[int]:
    """Turns whose prompt does not start with the previous prompt + generated IDs, found independently."""
    found = []
    for turn in range(1, len(reported)):
        before = reported[turn - 1]["prompt"] + reported[turn - 1]["generated"]
        if reported[turn]["prompt"][: len(before)] != before:
            found.append(turn)
    return found


def sequences(proxy: Proxy, trajectory_id: str) -> dict[str, Any]:
    proxy.wait_all_records()
    response = httpx.get(proxy.url + f"/tokentrail/v1/trajectories/{trajectory_id}/sequences")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_exported_sequences_hold_vllms_prompt_ids_turn_by_turn_and_mask_exactly_the_generated(
    vllm_proxy: Proxy,
) -> None:
    reported = converse(vllm_proxy, "multi-turn", ["You are terse."] * 3)
    body = sequences(vllm_proxy, "multi-turn")
    mismatching = expected_mismatches(reported)
    print(f"\nmulti-turn run: prefix mismatches at turns {mismatching} of {len(reported)}")
    assert [m["seq"] for m in body["prefix_mismatches"]] == mismatching
    assert len(body["sequences"]) == 1 + len(mismatching)
    calls = {c: s for s in body["sequences"] for c in s["call_ids"]}
    detail = httpx.get(vllm_proxy.url + "/tokentrail/v1/trajectories/multi-turn").json()
    for call, turn in zip(detail["calls"], reported, strict=True):
        sequence = calls[call["id"]]
        prompt, generated = turn["prompt"], turn["generated"]
        assert sequence["input_ids"][: len(prompt)] == prompt
        assert sequence["input_ids"][len(prompt) : len(prompt) + len(generated)] == generated
        assert sequence["loss_mask"][len(prompt) : len(prompt) + len(generated)] == [1] * len(generated)
    for sequence in body["sequences"]:
        assert len(sequence["input_ids"]) == len(sequence["loss_mask"]) == len(sequence["logprobs"])
        generated_here = sum(
            len(t["generated"])
            for c, t in zip(detail["calls"], reported, strict=True)
            if calls[c["id"]] is sequence
        )
        assert sum(sequence["loss_mask"]) == generated_here


def test_a_changed_system_prompt_breaks_the_prefix_and_is_counted(vllm_proxy: Proxy) -> None:
    reported = converse(
        vllm_proxy, "broken", ["You are terse.", "You are verbose and kind.", "You are verbose and kind."]
    )
    body = sequences(vllm_proxy, "broken")
    mismatching = expected_mismatches(reported)
    assert 1 in mismatching, "the changed system prompt must break the prefix at turn 1"
    assert [m["seq"] for m in body["prefix_mismatches"]] == mismatching
    first = next(m for m in body["prefix_mismatches"] if m["seq"] == 1)
    system_end = reported[0]["prompt"].index(2)  # <|im_end|> closes the system message
    assert first["position"] <= system_end
    assert len(body["sequences"]) == 1 + len(mismatching)
