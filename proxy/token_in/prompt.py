"""The prompt IDs of a continuing chat call, built from the previous call's IDs and vLLM's renderer.

For a call whose messages are the previous call's messages ``M``, its reply ``R`` and new messages
``N`` (see ``messages.continuation``), the prompt is::

    P + G + tail[k:] + (render(M + R + N, generation prompt) - render(M + R))

* ``P``, ``G``: the previous call's prompt IDs and the continued choice's generated IDs, exactly as
  vLLM used and sampled them.
* ``tail``: the tokens the chat template writes after an assistant message's content (for ChatML
  ``<|im_end|>`` and a newline), found once per template by rendering ``[user, assistant "a"]`` and
  ``[user, assistant "b"]`` and taking their common suffix. ``k``: how much of it the model sampled
  itself (``G`` ends with ``<|im_end|>`` when it stopped; a reply cut at ``max_tokens`` does not).
* ``render``: ``POST /tokenize`` with ``messages`` on the same vLLM, with the request's ``tools``,
  ``chat_template`` and ``chat_template_kwargs``. The second render must be a token prefix of the
  first and end with ``tail``; otherwise (a template that renders earlier turns differently once the
  conversation goes on) there is no exact continuation and the call falls back.

The two renders go out at once; the template tail is cached per upstream, model and template.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tokentrail.proxy import jsonio
from tokentrail.proxy.trajectory.continuation import Continuation
from tokentrail.proxy.upstream.client import UpstreamClient, UpstreamError

logger = logging.getLogger(__name__)

TOKENIZE_PATH = "/tokenize"
_TEMPLATE_FIELDS = ("tools", "chat_template", "chat_template_kwargs", "add_special_tokens")
_PROBES = tuple([{"role": "user", "content": "x"}, {"role": "assistant", "content": c}] for c in ("a", "b"))
_MAX_TAILS = 256
_MAX_ERROR_TEXT = 200
_TOKENS_KEY = b'"tokens":['  # an unescaped quote cannot be inside a JSON string: this is the key


class BuildFailed(Exception):
    """The prompt cannot be built; ``reason`` goes to ``llm_calls.token_in_fallback``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


class Rendered:
    """A ``/tokenize`` answer's token IDs, kept as the JSON text vLLM sent until needed.

    The two renders of a continuing call share all but their last tokens: they are compared and cut
    as text, and only the new tokens and the template tail are parsed (parsing two renders of 15,000
    IDs cost the event loop ~0.6 ms a call). Any text this does not recognise is parsed whole.
    """

    __slots__ = ("_ids", "text")

    def __init__(self, text: bytes | None, ids: list[int] | None = None) -> None:
        self.text = text  # "[1,2,3]", or None when only the list is known
        self._ids = ids

    def ids(self) -> list[int]:
        if self._ids is None:
            self._ids = _int_list(self.text or b"")
        return self._ids

    def after(self, shorter: Rendered) -> list[int]:
        """The IDs that follow ``shorter``'s; ``BuildFailed`` when ``shorter`` is not a prefix."""
        mine, theirs = self.text, shorter.text
        if mine is not None and theirs is not None and len(theirs) >= 2 and len(mine) >= len(theirs):
            cut = len(theirs) - 1  # at the "]" of the shorter one
            if theirs == b"[]":
                return self.ids()
            if mine.startswith(theirs[:cut]):
                follows = mine[cut : cut + 1]
                if follows == b"]" and len(mine) == len(theirs):
                    return []
                if follows == b",":
                    return _int_list(b"[" + mine[cut + 1 :])
        longer, prefix = self.ids(), shorter.ids()  # not recognised as text: compared as lists
        if longer[: len(prefix)] != prefix:
            raise BuildFailed("render_not_prefix")
        return longer[len(prefix) :]

    def last(self, count: int) -> list[int]:
        """The last ``count`` IDs (parsing only those)."""
        text = self.text
        if text is None or count <= 0:
            return self.ids()[len(self.ids()) - max(count, 0) :]
        end = len(text) - 1
        cut = end
        for _ in range(count):
            cut = text.rfind(b",", 0, cut)
            if cut < 0:
                return self.ids()[-count:]
        return _int_list(b"[" + text[cut + 1 :])


def _int_list(text: bytes) -> list[int]:
    try:
        ids = jsonio.loads(text)
    except (ValueError, UnicodeDecodeError):
        ids = None
    if not isinstance(ids, list) or not all(type(t) is int for t in ids):
        raise BuildFailed("tokenize_failed", "no token list in the answer")
    return ids


class PromptBuilder:
    """Renders through vLLM's ``/tokenize`` and splices the previous call's IDs in."""

    def __init__(self, client: UpstreamClient, timeout_s: float) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._tails: dict[tuple[str, str], list[int]] = {}

    async def build(
        self,
        upstream_url: str,
        headers: list[tuple[bytes, bytes]],
        request: dict[str, Any],
        found: Continuation,
    ) -> list[int]:
        """The prompt IDs for ``request``; raises ``BuildFailed``."""
        messages = request["messages"]
        tail, history, rendered = await asyncio.gather(
            self._tail(upstream_url, headers, request),
            self._render(upstream_url, headers, request, messages[: found.kept], generation_prompt=False),
            self._render(upstream_url, headers, request, messages, generation_prompt=True),
        )
        new = rendered.after(history)
        if not tail or history.last(len(tail)) != tail:
            raise BuildFailed("template_tail_unknown")
        generated = list(found.choice.token_ids)
        sampled = next(
            (k for k in range(len(tail), 0, -1) if generated[-k:] == tail[:k]), 0
        )  # the part of the tail the model sampled itself
        return [*found.past.prompt_ids, *generated, *tail[sampled:], *new]

    async def _tail(
        self, upstream_url: str, headers: list[tuple[bytes, bytes]], request: dict[str, Any]
    ) -> list[int]:
        options = {name: request.get(name) for name in _TEMPLATE_FIELDS if name != "tools"}
        key = (upstream_url, jsonio.dumps_text([request.get("model"), options]))
        tail = self._tails.get(key)
        if tail is None:
            first, second = (
                r.ids()
                for r in await asyncio.gather(
                    *(
                        self._render(upstream_url, headers, request, p, generation_prompt=False)
                        for p in _PROBES
                    )
                )
            )
            size = 0
            while size < min(len(first), len(second)) and first[-1 - size] == second[-1 - size]:
                size += 1
            tail = first[len(first) - size :]
            if len(self._tails) >= _MAX_TAILS:
                self._tails.clear()
            self._tails[key] = tail
        return tail

    async def _render(
        self,
        upstream_url: str,
        headers: list[tuple[bytes, bytes]],
        request: dict[str, Any],
        messages: list[Any],
        *,
        generation_prompt: bool,
    ) -> Rendered:
        body: dict[str, Any] = {"messages": messages, "add_generation_prompt": generation_prompt}
        if request.get("model") is not None:
            body["model"] = request["model"]
        for name in _TEMPLATE_FIELDS:
            if request.get(name) is not None:
                body[name] = request[name]
        try:
            response = await self._client.send(
                "POST",
                upstream_url + TOKENIZE_PATH,
                [(b"content-type", b"application/json"), *headers],
                jsonio.dumps_text(body).encode(),
                timeout_s=self._timeout_s,
            )
            try:
                chunks = [chunk async for chunk in response.iter_raw()]
            finally:
                await response.aclose()
        except UpstreamError as exc:
            raise BuildFailed("tokenize_failed", type(exc).__name__) from exc
        payload = b"".join(chunks)
        if response.status_code != 200:
            raise BuildFailed(
                "tokenize_failed", f"status {response.status_code}: {payload[:_MAX_ERROR_TEXT]!r}"
            )
        start = payload.find(_TOKENS_KEY)
        end = payload.find(b"]", start) if start >= 0 else -1
        if end >= 0:  # vLLM's answer: {"count": N, "max_model_len": M, "tokens": [...], "token_strs": ...}
            return Rendered(payload[start + len(_TOKENS_KEY) - 1 : end + 1])
        try:
            tokens = jsonio.loads(payload).get("tokens")
        except (ValueError, UnicodeDecodeError, AttributeError):
            tokens = None
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            raise BuildFailed("tokenize_failed", "no token list in the answer")
        return Rendered(None, tokens)
