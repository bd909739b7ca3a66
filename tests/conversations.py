"""Recorded agent conversations through the fake upstream's ``render`` mode, for the viewer's tests.

Each call sends the whole history so far (as an agent does), so its prompt IDs extend the previous
call's prompt and answer, unless ``break_at`` edits the first message from that call on: then that
call's prompt breaks the prefix (as when an agent trims or rewrites its context).
"""

from __future__ import annotations

from typing import Any

import httpx

CHAT = "/v1/chat/completions"


def record_conversation(
    proxy_url: str,
    trajectory_id: str,
    user_texts: list[str],
    *,
    max_tokens: int = 6,
    break_at: int | None = None,
    tags: str | None = None,
    fail_at: int | None = None,
    client: httpx.Client | None = None,
) -> list[dict[str, Any]]:
    """One call per user text; returns the replies. ``fail_at``: that call gets an upstream 500."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are terse."}]
    replies = []
    http = client or httpx.Client(timeout=60)
    try:
        for i, text in enumerate(user_texts):
            if i == break_at:
                messages[1] = {**messages[1], "content": messages[1]["content"] + " (trimmed)"}
            messages.append({"role": "user", "content": text})
            headers = {"X-Trajectory-Id": trajectory_id, "x-fake": "status:500" if i == fail_at else "render"}
            if tags:
                headers["X-Trajectory-Tags"] = tags
            body = {"model": "tiny", "messages": messages, "max_tokens": max_tokens, "logprobs": True}
            response = http.post(proxy_url + CHAT, json=body, headers=headers)
            if i == fail_at:
                assert response.status_code == 500, response.text
                messages.pop()
                continue
            assert response.status_code == 200, response.text
            reply = response.json()["choices"][0]["message"]
            replies.append(reply)
            messages.append({"role": "assistant", "content": reply["content"]})
    finally:
        if client is None:
            http.close()
    return replies
