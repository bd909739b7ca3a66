"""The fake vLLM's chat model for agent-shaped benchmarks (``fake_vllm.py --agent-mode``).

Everything is a deterministic function of the request, so a benchmark can compute itself the IDs a
proxy must have stored:

* ``encode(text)``: one token per word with the white space before it (``\\s*\\S+``), its ID a CRC-32
  of the piece in a 32,000 vocabulary; the same text always gives the same IDs.
* ``render(messages, generation_prompt)``: a ChatML template, ``<|im_start|>`` role ``\\n`` content
  ``<|im_end|>`` ``\\n`` per message (the special tokens and the newlines are one ID each), then
  ``<|im_start|>assistant\\n`` for the generation prompt.
* ``reply(messages, tokens)``: ``tokens`` generated IDs and their text pieces, seeded by a hash of the
  messages. Each word is one sampled ID that re-encodes to itself, except the last word, which is
  sampled as two IDs (``" wab"`` + ``"cd"``) that re-encode as one (``" wabcd"``): as a real model's
  reply re-tokenizes differently near its end. The reply stops at ``max_tokens`` (``length``), so
  the end-of-turn token is never sampled: the template adds it when the reply is sent back.

Tokenizations of message contents are cached (agents re-send their whole history every turn), with
the rendered message kept as a JSON fragment, so a prompt's ``prompt_token_ids`` is a string join.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

VOCAB = 32000
IM_START, IM_END, NEWLINE = 1, 2, 3
_FIRST_WORD_ID = 16
_PIECE = re.compile(r"\s*\S+|\s+")
_CACHE_MAX = 200_000


def piece_id(piece: str) -> int:
    return _FIRST_WORD_ID + zlib.crc32(piece.encode()) % (VOCAB - _FIRST_WORD_ID)


def encode(text: str) -> list[int]:
    """The IDs of ``text``: one per word and the white space before it."""
    return [piece_id(piece) for piece in _PIECE.findall(text)]


GENERATION_PROMPT = [IM_START, *encode("assistant"), NEWLINE]
TEMPLATE_TAIL = [IM_END, NEWLINE]  # what the template writes after every message's content
_GENERATION_PROMPT_JSON = ",".join(map(str, GENERATION_PROMPT))


def message_ids(role: str, content: str) -> list[int]:
    return [IM_START, *encode(role), NEWLINE, *encode(content), *TEMPLATE_TAIL]


def _content(message: Any) -> tuple[str, str]:
    if not isinstance(message, dict):
        return "user", ""
    content = message.get("content")
    if isinstance(content, list):  # text parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(message.get("role") or "user"), content if isinstance(content, str) else ""


def render(messages: Sequence[Any], generation_prompt: bool) -> list[int]:
    """The prompt IDs of ``messages`` (a list of chat messages)."""
    ids = [token for message in messages for token in message_ids(*_content(message))]
    return ids + GENERATION_PROMPT if generation_prompt else ids


_fragments: dict[tuple[str, str], tuple[int, str]] = {}


def _fragment(message: Any) -> tuple[int, str]:
    """(count, comma-joined IDs) of one rendered message, cached."""
    key = _content(message)
    cached = _fragments.get(key)
    if cached is None:
        ids = message_ids(*key)
        cached = (len(ids), ",".join(map(str, ids)))
        if len(_fragments) >= _CACHE_MAX:
            _fragments.clear()
        _fragments[key] = cached
    return cached


def rendered_json(messages: Sequence[Any], generation_prompt: bool = True) -> tuple[int, str]:
    """(count, JSON list) of ``render(messages, generation_prompt)``, from the cache."""
    parts = [_fragment(message) for message in messages]
    if generation_prompt:
        parts.append((len(GENERATION_PROMPT), _GENERATION_PROMPT_JSON))
    return sum(n for n, _ in parts), "[" + ",".join(text for n, text in parts if n) + "]"


@dataclass(frozen=True, slots=True)
class Reply:
    pieces: tuple[str, ...]  # the text of each generated token, as streamed
    ids: tuple[int, ...]  # the generated (sampled) IDs, one per piece

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def _seed(messages: Sequence[Any]) -> int:
    seed = len(messages)
    for message in messages:
        role, content = _content(message)
        seed = zlib.crc32(content.encode(), zlib.crc32(role.encode(), seed))
    return seed


def reply(messages: Sequence[Any], tokens: int) -> Reply:
    """The reply to ``messages``: ``tokens`` sampled IDs (see the module docstring)."""
    seed = _seed(messages)
    words = [f"w{(seed + 2654435761 * i) % 1000003:06d}" for i in range(max(1, tokens - 1))]
    pieces = [words[0], *(" " + word for word in words[1:])]
    if tokens >= 2:  # the last word: sampled as two pieces, re-encoded as one
        last = pieces.pop()
        pieces += [last[:-3], last[-3:]]
    pieces = pieces[:tokens]
    return Reply(tuple(pieces), tuple(piece_id(piece) for piece in pieces))
