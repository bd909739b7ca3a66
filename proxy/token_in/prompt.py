"""The prompt IDs of a continuing chat call, built from the previous call's IDs and vLLM's renderer.

For a call whose messages are the previous call's messages ``M``, its reply ``R`` and new messages
``N`` (see ``messages.continuation``), the prompt is::

    P + G + tail[k:] + new

* ``P``, ``G``: the previous call's prompt IDs and the continued choice's generated IDs, exactly as
  vLLM used and sampled them.
* ``tail``: the tokens the chat template writes after an assistant message's content (for ChatML
  ``<|im_end|>`` and a newline), found once per template by rendering ``[user, assistant "a"]`` and
  ``[user, assistant "b"]`` and taking their common suffix. ``k``: how much of it the model sampled
  itself (``G`` ends with ``<|im_end|>`` when it stopped; a reply cut at ``max_tokens`` does not).
* ``new``: what the template writes for ``N`` and the generation prompt after ``R``:
  ``render(H + R + N, generation prompt) - render(H + R)``, through ``POST /tokenize`` on the same
  vLLM with the request's ``tools``, ``chat_template`` and ``chat_template_kwargs``. The second
  render must be a token prefix of the first and end with ``tail``; otherwise (a template that
  renders earlier turns differently once the conversation goes on) there is no exact continuation
  and the call falls back.

**Which history ``H``.** With ``H = M`` (a *full* render) both renders hold the whole history: on a
long agent trajectory vLLM tokenizes twice 60 KB per call, for a few hundred new tokens. So ``H`` is
a *stand-in*: ``M``'s system message (if it has one), then one short user message (see
``stand_in_history``). Work is then proportional to the system prompt, the reply and the new
messages, never to the history. That is exact when the template writes ``N`` after ``R`` without
looking further back than ``R`` and the system message; most templates do (ChatML, Qwen, Llama 3,
Hermes tool formats), but nothing guarantees it, so it is *learned per template* (``TemplateTrust``,
keyed by upstream, model, chat template, its arguments and the tools): the first
``check_first`` calls of a template render both ways at once and use the full render; the stand-in
is used once that many agreed, and one call in ``check_every`` after that is checked again. A
template whose two ``new`` ever differ renders in full for good. ``Built.how`` says which happened
(``llm_calls`` does not store it; the metric ``tokentrail_token_in_renders`` counts it).

**One round trip.** A plain-text reply is itself replaced by a stand-in reply, so the stand-in history
is the same for every call of a trajectory: its render is kept (``_after_stand_in``) and a trusted call
sends one ``/tokenize`` request, whose render must start with the kept one. The renders a call does
need go out at once; the template tail is cached per upstream, model and template; everything learned
of an upstream is forgotten when it comes back after being down (``forget``).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from tokentrail.proxy import jsonio
from tokentrail.proxy.recording.capture import RENDER_FIELDS
from tokentrail.proxy.trajectory.continuation import Continuation
from tokentrail.proxy.upstream.client import UpstreamClient, UpstreamError

logger = logging.getLogger(__name__)

TOKENIZE_PATH = "/tokenize"
_PROBES = tuple([{"role": "user", "content": "x"}, {"role": "assistant", "content": c}] for c in ("a", "b"))
_MAX_TAILS = 256
_MAX_STAND_IN_RENDERS = 1024  # distinct system prompts x templates, each a few KB of token IDs
_MAX_ERROR_TEXT = 200
_TOKENS_KEY = b'"tokens":['  # an unescaped quote cannot be inside a JSON string: this is the key


class BuildFailed(Exception):
    """The prompt cannot be built; ``reason`` goes to ``llm_calls.token_in_fallback``."""

    def __init__(self, reason: str, detail: str = "", *, transport: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
        self.transport = transport  # the upstream could not be reached or failed, not the template


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


class How(enum.StrEnum):
    """How a call's new tokens were found (``Built.how``; the label of ``tokentrail_token_in_renders``)."""

    STAND_IN = "stand_in"  # after a stand-in history: work proportional to the new messages
    FULL = "full"  # after the whole history (short history, or a template not trusted yet)
    CHECKED = "checked"  # both, and they agreed: the full one was used
    DIFFERS = "differs"  # both, and they differed: the template renders in full from now on
    UNTRUSTED = "untrusted"  # in full, because the template once differed


@dataclass(slots=True)
class TemplateTrust:
    """What this process learned of one template: how many checks agreed, whether one differed."""

    agreed: int = 0
    differs: bool = False
    calls: int = 0  # calls with a stand-in history, checked or not (for the sampled checks)


@dataclass(frozen=True, slots=True)
class Built:
    ids: list[int]
    how: How


_STAND_IN_USER = {"role": "user", "content": "."}
_STAND_IN_REPLY = {"role": "assistant", "content": "."}
_HEAD_ROLES = frozenset({"system", "developer"})
_PLAIN_REPLY_KEYS = frozenset({"role", "content"})


def stand_in_history(messages: list[Any], kept: int) -> list[Any] | None:
    """A short history to render the new messages after: the system message of the real history (if
    it has one), one short user message, then the reply ``messages[kept - 1]``, itself a short
    stand-in when it is plain text (no tool calls, reasoning or name: nothing a later message may
    refer to). None when the real history is no longer than that (a full render is as cheap).

    With a plain reply the stand-in history is the same for every call of a trajectory, so its
    render is kept (``PromptBuilder``) and a call needs one ``/tokenize`` round trip, not two."""
    history = messages[: kept - 1]
    head = (
        history[:1]
        if history and isinstance(history[0], dict) and history[0].get("role") in _HEAD_ROLES
        else []
    )
    reply = messages[kept - 1]
    if _is_plain_reply(reply):
        reply = _STAND_IN_REPLY
    stand_in = [*head, _STAND_IN_USER, reply]
    return stand_in if len(stand_in) < kept else None


def _is_plain_reply(message: Any) -> bool:
    """Text and nothing else: vLLM's own reply object (``refusal``, ``tool_calls: []``, ``reasoning``
    and the like, all null or empty) appended as it came counts."""
    return (
        isinstance(message, dict)
        and isinstance(message.get("content"), str)
        and all(k in _PLAIN_REPLY_KEYS or v is None or v == [] for k, v in message.items())
    )


def template_key(upstream_url: str, request: dict[str, Any]) -> str:
    """Which template a request renders with: upstream, model, and every field that changes rendering."""
    fields = [upstream_url, request.get("model"), *(request.get(name) for name in RENDER_FIELDS)]
    return hashlib.sha256(jsonio.dumps_text(fields).encode()).hexdigest()


class PromptBuilder:
    """Renders through vLLM's ``/tokenize`` and splices the previous call's IDs in."""

    def __init__(
        self,
        client: UpstreamClient,
        timeout_s: float,
        *,
        stand_in: bool = True,
        check_first: int = 8,
        check_every: int = 100,
    ) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._tails: dict[tuple[str, str], list[int]] = {}
        self._trust: dict[str, TemplateTrust] = {}
        # (template, stand-in history) -> its render, least recently used first
        self._stand_in_renders: OrderedDict[tuple[str, str], Rendered] = OrderedDict()
        self._use_stand_in = stand_in
        self._check_first = check_first
        self._check_every = check_every

    def templates(self) -> dict[str, TemplateTrust]:
        """What was learned per template so far (for tests and the benchmark's report)."""
        return dict(self._trust)

    def forget(self, upstream_url: str) -> None:
        """The upstream came back (maybe restarted with another template under the same model name):
        its tails and kept renders are learned again. (Trust is keyed by a hash: all of it goes.)"""
        self._tails = {k: v for k, v in self._tails.items() if k[0] != upstream_url}
        self._stand_in_renders.clear()
        self._trust.clear()

    async def build(
        self,
        upstream_url: str,
        headers: list[tuple[bytes, bytes]],
        request: dict[str, Any],
        found: Continuation,
    ) -> Built:
        """The prompt IDs for ``request`` and how they were found; raises ``BuildFailed``."""
        messages = request["messages"]
        kept = found.kept
        stand_in = stand_in_history(messages, kept) if self._use_stand_in else None
        key = "" if stand_in is None else template_key(upstream_url, request)
        trust = self._trust_of(key) if stand_in is not None else None
        how = self._how(trust)
        if how == How.STAND_IN:
            assert stand_in is not None
            assert trust is not None
            standing_in = self._after_stand_in(
                upstream_url, headers, request, stand_in, kept, key, fresh=False
            )
            cached = self._tails.get(self._tail_key(upstream_url, request))
            if cached is None:
                tail, short = await asyncio.gather(self._tail(upstream_url, headers, request), standing_in)
            else:  # no tasks: under load each one costs the call a turn of the event loop
                tail, short = cached, await standing_in
            if not isinstance(short, BuildFailed):
                return self._built(found, tail, *short, how)
            refused: BuildFailed | None = short  # (a transport failure raised): render in full
        else:
            refused = None
        renders: list[Any] = [
            self._tail(upstream_url, headers, request),
            self._after_full(upstream_url, headers, request, kept),
        ]
        if how == How.CHECKED:
            assert stand_in is not None
            renders.append(
                self._after_stand_in(upstream_url, headers, request, stand_in, kept, key, fresh=True)
            )
        tail, (new, history), *checked = await asyncio.gather(*renders)
        # the full renders succeeded: a stand-in that failed or differs is the template's doing
        if checked:
            assert trust is not None
            short = checked[0]
            if isinstance(short, BuildFailed) or short[0] != new or short[1].last(len(tail)) != tail:
                refused = short if isinstance(short, BuildFailed) else None
                self._distrust(trust, upstream_url, request, refused)
                how = How.DIFFERS
            else:
                trust.agreed += 1
        elif refused is not None:
            assert trust is not None
            self._distrust(trust, upstream_url, request, refused)
            how = How.DIFFERS
        return self._built(found, tail, new, history, how)

    def _trust_of(self, key: str) -> TemplateTrust:
        trust = self._trust.get(key)
        if trust is None:
            if len(self._trust) >= _MAX_TAILS:
                self._trust.clear()
            trust = self._trust[key] = TemplateTrust()
        trust.calls += 1
        return trust

    def _how(self, trust: TemplateTrust | None) -> How:
        if trust is None:
            return How.FULL
        if trust.differs:
            return How.UNTRUSTED
        if trust.agreed < self._check_first or (
            self._check_every > 0 and trust.calls % self._check_every == 0
        ):
            return How.CHECKED
        return How.STAND_IN

    @staticmethod
    def _distrust(
        trust: TemplateTrust, upstream_url: str, request: dict[str, Any], failure: BuildFailed | None
    ) -> None:
        trust.differs = True
        logger.warning(
            "upstream=<%s>, model=<%s>, detail=<%s> | the stand-in history renders differently with this "
            "template: full renders from now on",
            upstream_url,
            request.get("model"),
            "" if failure is None else f"{failure.reason} {failure.detail}".strip(),
        )

    @staticmethod
    def _built(found: Continuation, tail: list[int], new: list[int], history: Rendered, how: How) -> Built:
        if not tail or history.last(len(tail)) != tail:
            raise BuildFailed("template_tail_unknown")
        generated = list(found.choice.token_ids)
        sampled = next(
            (k for k in range(len(tail), 0, -1) if generated[-k:] == tail[:k]), 0
        )  # the part of the tail the model sampled itself
        return Built([*found.past.prompt_ids, *generated, *tail[sampled:], *new], how)

    async def _after_full(
        self, upstream_url: str, headers: list[tuple[bytes, bytes]], request: dict[str, Any], kept: int
    ) -> tuple[list[int], Rendered]:
        """The new tokens after the whole history, and the history's render."""
        messages = request["messages"]
        return await self._new_after(upstream_url, headers, request, messages[:kept], messages)

    async def _new_after(
        self,
        upstream_url: str,
        headers: list[tuple[bytes, bytes]],
        request: dict[str, Any],
        history: list[Any],
        messages: list[Any],
    ) -> tuple[list[int], Rendered]:
        """``render(messages, generation prompt) - render(history)``, and the history's render (both
        asked at once); ``BuildFailed`` when the second is not a prefix of the first."""
        rendered, whole = await asyncio.gather(
            self._render(upstream_url, headers, request, history, generation_prompt=False),
            self._render(upstream_url, headers, request, messages, generation_prompt=True),
        )
        return whole.after(rendered), rendered

    async def _after_stand_in(
        self,
        upstream_url: str,
        headers: list[tuple[bytes, bytes]],
        request: dict[str, Any],
        stand_in: list[Any],
        kept: int,
        key: str,
        *,
        fresh: bool,
    ) -> tuple[list[int], Rendered] | BuildFailed:
        """The new tokens after ``stand_in``, and its render; the failure, returned, where the template
        does not take the stand-in (a transport failure is raised: it says nothing of the template).

        The stand-in history's render is kept per template and stand-in, and checked again by every
        call that uses it: it must be a prefix of the call's render, else (a template that writes
        today's date, say) it is rendered again. A checked call (``fresh``) renders it again anyway,
        so what is kept is checked as often as the template is."""
        messages = [*stand_in, *request["messages"][kept:]]
        # only a stand-in ending with the stand-in reply comes again: only that one's render is kept
        remembered = (key, jsonio.dumps_text(stand_in)) if stand_in[-1] is _STAND_IN_REPLY else None
        kept_render = None if fresh or remembered is None else self._stand_in_renders.get(remembered)
        if kept_render is not None and remembered is not None:
            self._stand_in_renders.move_to_end(remembered)
        try:
            if kept_render is not None:
                whole = await self._render(upstream_url, headers, request, messages, generation_prompt=True)
                try:
                    return whole.after(kept_render), kept_render
                except BuildFailed:
                    if remembered is not None:
                        self._stand_in_renders.pop(remembered, None)
                    history = await self._render(
                        upstream_url, headers, request, stand_in, generation_prompt=False
                    )
                new = whole.after(history)
            else:
                new, history = await self._new_after(upstream_url, headers, request, stand_in, messages)
        except BuildFailed as failed:
            if failed.transport:
                raise
            return failed
        if remembered is not None:
            self._stand_in_renders[remembered] = history
            if len(self._stand_in_renders) > _MAX_STAND_IN_RENDERS:
                self._stand_in_renders.popitem(last=False)  # the least recently used
        return new, history

    @staticmethod
    def _tail_key(upstream_url: str, request: dict[str, Any]) -> tuple[str, str]:
        options = {name: request.get(name) for name in RENDER_FIELDS if name != "tools"}
        return (upstream_url, jsonio.dumps_text([request.get("model"), options]))

    async def _tail(
        self, upstream_url: str, headers: list[tuple[bytes, bytes]], request: dict[str, Any]
    ) -> list[int]:
        key = self._tail_key(upstream_url, request)
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
        for name in RENDER_FIELDS:
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
            raise BuildFailed("tokenize_failed", type(exc).__name__, transport=True) from exc
        payload = b"".join(chunks)
        if response.status_code != 200:
            raise BuildFailed(
                "tokenize_failed",
                f"status {response.status_code}: {payload[:_MAX_ERROR_TEXT]!r}",
                # 400 and 422: vLLM refused these messages (their template); anything else (401,
                # 404, 429, 5xx) says nothing of the template
                transport=response.status_code not in (400, 422),
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
