"""Trajectories as training sequences: ``input_ids``, ``loss_mask`` over generated tokens, ``logprobs``.

Pure functions over recorded calls; the read API and ``tokentrail export`` both use them.

``merged`` (the default): consecutive calls whose prompt IDs start with the previous call's prompt +
response IDs become one sequence, so every token is in it once and the loss mask is 1 exactly on the
tokens the model generated. Where a prompt does not extend the previous one (the chat template
rendered the history differently, a system prompt changed, the agent trimmed its context) a new
sequence starts and the mismatch is counted with the position of the first differing token, never
hidden. A call with ``n`` > 1 choices forks one branch per choice; the branch the next call extends
goes on, the others end there. ``per_call``: one sequence per call and choice (prompt + response).
``last_turn``: only the last call. Only calls that finished normally (outcome ``ok``) are used.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from tokentrail.proxy.storage.call_tokens import CallTokens, ChoiceTokens
from tokentrail.proxy.storage.stored_calls import common_prefix


class SequenceMode(enum.StrEnum):
    MERGED = "merged"
    PER_CALL = "per_call"
    LAST_TURN = "last_turn"


@dataclass(frozen=True, slots=True)
class PrefixMismatch:
    """A call whose prompt does not start with the previous call's prompt + response."""

    call_id: str
    seq: int
    position: int  # index of the first token that differs (or where the prompt ended)
    expected_length: int  # length of the previous prompt + response


@dataclass(slots=True)
class TrainingSequence:
    trajectory_id: str
    index: int
    input_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float | None]
    reward: float | None
    call_ids: list[str]
    choice_indexes: list[int]
    # Filled by the export (proxy/training/policy.py): the oldest policy version among the sequence's
    # calls, how many versions it is behind the newest seen, and its trajectory's GRPO group.
    weight_version: str | None = None
    staleness: int | None = None
    group_id: str | None = None
    advantage: float | None = None
    # The certificate every call of the sequence was made under (recording/certificate.py); None
    # when its calls have different ones, or none.
    certificate_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "trajectory_id": self.trajectory_id,
            "sequence_index": self.index,
            "input_ids": self.input_ids,
            "loss_mask": self.loss_mask,
            "logprobs": self.logprobs,
            "reward": self.reward,
            "call_ids": self.call_ids,
            "choice_indexes": self.choice_indexes,
            "num_tokens": len(self.input_ids),
            "num_generated": sum(self.loss_mask),
            "weight_version": self.weight_version,
            "staleness": self.staleness,
            "group_id": self.group_id,
            "advantage": self.advantage,
            "certificate_id": self.certificate_id,
        }


@dataclass(slots=True)
class TrajectorySequences:
    trajectory_id: str
    sequences: list[TrainingSequence] = field(default_factory=list)
    mismatches: list[PrefixMismatch] = field(default_factory=list)


@dataclass(slots=True)
class _Branch:
    input_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    call_ids: list[str] = field(default_factory=list)
    choice_indexes: list[int] = field(default_factory=list)

    def extended(self, call: CallTokens, choice: ChoiceTokens) -> _Branch:
        tail = call.prompt_token_ids[len(self.input_ids) :]
        generated = choice.token_ids
        logprobs = list(choice.logprobs or [])
        logprobs = (logprobs + [None] * len(generated))[: len(generated)]
        return _Branch(
            input_ids=self.input_ids + tail + generated,
            loss_mask=self.loss_mask + [0] * len(tail) + [1] * len(generated),
            logprobs=self.logprobs + [None] * len(tail) + logprobs,
            call_ids=[*self.call_ids, call.call_id],
            choice_indexes=[*self.choice_indexes, choice.index],
        )


def _merge(calls: list[CallTokens], mismatches: list[PrefixMismatch]) -> list[_Branch]:
    done: list[_Branch] = []
    open_branches: list[_Branch] = []
    for call in calls:
        parent = next(
            (b for b in open_branches if call.prompt_token_ids[: len(b.input_ids)] == b.input_ids), None
        )
        if parent is None:
            if open_branches:
                latest = open_branches[0]
                mismatches.append(
                    PrefixMismatch(
                        call.call_id,
                        call.seq,
                        common_prefix(call.prompt_token_ids, latest.input_ids),
                        len(latest.input_ids),
                    )
                )
            done.extend(open_branches)
            parent = _Branch()
        else:
            done.extend(b for b in open_branches if b is not parent)
        open_branches = [parent.extended(call, choice) for choice in call.choices]
    return done + open_branches


def build_sequences(
    trajectory_id: str,
    calls: list[CallTokens],
    reward: float | None,
    mode: SequenceMode = SequenceMode.MERGED,
) -> TrajectorySequences:
    """Turn the ``ok`` calls of one trajectory (in ``seq`` order) into training sequences."""
    result = TrajectorySequences(trajectory_id)
    usable = [c for c in calls if c.choices]
    if mode is SequenceMode.MERGED:
        branches = _merge(usable, result.mismatches)
    else:
        chosen = usable[-1:] if mode is SequenceMode.LAST_TURN else usable
        branches = [_Branch().extended(call, choice) for call in chosen for choice in call.choices]
    result.sequences = [
        TrainingSequence(
            trajectory_id,
            index,
            branch.input_ids,
            branch.loss_mask,
            branch.logprobs,
            reward,
            branch.call_ids,
            branch.choice_indexes,
        )
        for index, branch in enumerate(branches)
    ]
    return result


@dataclass(frozen=True)
class SequenceShape:
    """How a trajectory merges into training sequences (``merged`` mode)."""

    sequences: int
    prefix_breaks: int


def sequence_shapes(calls: dict[str, list[CallTokens]]) -> dict[str, SequenceShape]:
    """For each trajectory's calls, its merged sequences and prefix breaks."""
    shapes = {}
    for trajectory_id, its_calls in calls.items():
        built = build_sequences(trajectory_id, its_calls, None, SequenceMode.MERGED)
        shapes[trajectory_id] = SequenceShape(len(built.sequences), len(built.mismatches))
    return shapes
