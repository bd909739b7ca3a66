"""Retokenization drift: how often decoding recorded token IDs and encoding the text again changes them.

This is what training on text instead of the recorded IDs would do to a sequence: the same string
can have several tokenizations (``HAVING`` as ``H+AVING`` or ``HAV+ING``), and a tokenizer only ever
produces one of them. ``drift_report`` says where the two differ, so a user can see on their own
rollouts why TokenTrail keeps the IDs. Works with a ``tokenizers.Tokenizer`` or a ``transformers``
tokenizer; ``load_tokenizer`` reads a ``tokenizer.json`` (or a model folder holding one).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DriftSpan:
    """One place where the recorded IDs and the re-encoded IDs differ."""

    position: int  # index into the recorded IDs
    recorded: list[int]
    retokenized: list[int]


@dataclass(frozen=True)
class DriftReport:
    """The comparison of one recorded token sequence with its decode-then-encode round trip."""

    recorded_length: int
    retokenized_length: int
    spans: list[DriftSpan] = field(default_factory=list)

    @property
    def drifted(self) -> bool:
        return bool(self.spans)

    @property
    def first_position(self) -> int | None:
        return self.spans[0].position if self.spans else None

    @property
    def differing_tokens(self) -> int:
        """Recorded tokens that the round trip does not reproduce."""
        return sum(max(len(s.recorded), 1) for s in self.spans)


def load_tokenizer(path: str | Path) -> Any:
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` or from a model folder that holds one."""
    from tokenizers import Tokenizer

    location = Path(path)
    if location.is_dir():
        location = location / "tokenizer.json"
    if not location.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {location}")
    return Tokenizer.from_file(str(location))


def _decode(tokenizer: Any, token_ids: list[int]) -> str:
    try:
        text = tokenizer.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    except TypeError:  # tokenizers.Tokenizer takes no clean_up argument
        text = tokenizer.decode(token_ids, skip_special_tokens=False)
    return str(text)


def _encode(tokenizer: Any, text: str) -> list[int]:
    encoded = tokenizer.encode(text, add_special_tokens=False)
    ids = getattr(encoded, "ids", encoded)
    return [int(i) for i in ids]


def drift_report(token_ids: list[int], tokenizer: Any) -> DriftReport:
    """Decode ``token_ids``, encode the text again, and list where the two ID sequences differ."""
    retokenized = _encode(tokenizer, _decode(tokenizer, token_ids))
    matcher = difflib.SequenceMatcher(a=token_ids, b=retokenized, autojunk=False)
    spans = [
        DriftSpan(position=a0, recorded=token_ids[a0:a1], retokenized=retokenized[b0:b1])
        for tag, a0, a1, b0, b1 in matcher.get_opcodes()
        if tag != "equal"
    ]
    return DriftReport(len(token_ids), len(retokenized), spans)
