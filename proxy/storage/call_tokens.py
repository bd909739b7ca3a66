"""A call's token IDs as the training side reads them: prompt, and each choice's generated IDs and
logprobs (what ``storage.queries.load_call_tokens`` returns and ``training.sequences`` merges)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ChoiceTokens:
    index: int
    token_ids: list[int]
    logprobs: list[float | None] | None = None


@dataclass(frozen=True, slots=True)
class CallTokens:
    call_id: str
    seq: int
    prompt_token_ids: list[int]
    choices: list[ChoiceTokens]


def logprob_values(entries: Any) -> list[float | None] | None:
    """The sampled token's logprob of each stored entry (chat and completions store dicts)."""
    if not isinstance(entries, list):
        return None
    values: list[float | None] = []
    for entry in entries:
        value = entry.get("logprob") if isinstance(entry, dict) else None
        values.append(float(value) if isinstance(value, int | float) else None)
    return values
