"""The viewer's token view over a conversation recorded through the real CPU vLLM: each token is shown
as vLLM's own /detokenize says, and the generated ones spell the replies the agent received."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect

from tests.browser import LAPTOP, chromium, screenshot_dir, shoot
from tests.conftest import Proxy

pytestmark = [pytest.mark.vllm, pytest.mark.browser]

TURNS = ["What is the weather in Paris?", "And in Rome?"]


def test_tokens_are_decoded_by_vllm_and_spell_the_replies(
    vllm_proxy: Proxy, vllm_url: str, tmp_path: Path
) -> None:
    messages: list[dict[str, str]] = [{"role": "system", "content": "Answer briefly."}]
    replies = []
    for text in TURNS:
        messages.append({"role": "user", "content": text})
        body = {"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0, "logprobs": True}
        response = httpx.post(
            vllm_proxy.url + "/v1/chat/completions",
            json=body,
            headers={"X-Trajectory-Id": "vllm-view"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        reply = response.json()["choices"][0]["message"]["content"]
        replies.append(reply)
        messages.append({"role": "assistant", "content": reply})
    vllm_proxy.wait_all_records()
    with chromium() as browser:
        page = browser.new_page(viewport=LAPTOP)
        page.goto(vllm_proxy.url + "/tokentrail/ui/#/t/vllm-view")
        expect(page.locator("main[data-ready=trajectory]")).to_be_attached(timeout=120_000)
        shown = page.locator(".tokens .tok").evaluate_all(
            "els => els.map(e => [Number(e.dataset.id), e.dataset.mask, e.textContent, e.title])"
        )
        shoot(
            page, screenshot_dir(Path(os.environ.get("TOKENTRAIL_SCREENSHOTS") or tmp_path)), "08-vllm-tokens"
        )
    with httpx.Client(timeout=60) as client:
        for token_id in sorted({i for i, *_ in shown})[:200]:
            direct = client.post(
                vllm_url + "/detokenize", json={"model": "tiny", "tokens": [token_id]}
            ).json()
            texts = {t for i, _m, t, _title in shown if i == token_id}
            assert texts == {direct["prompt"].replace("\n", "↵\n")}, token_id
    generated = "".join(t for _i, mask, t, _title in shown if mask == "1").replace("↵\n", "\n")
    assert generated == "".join(replies)
    assert all("logprob" in title for _i, mask, _t, title in shown if mask == "1")
