"""``Token`` and ``TokenManager``: a token sequence with a loss mask, as strands-vllm 0.0.6 has it.

Same API as strands-vllm. Added: ``add_turn``, which appends one model call *merged* into the
sequence (only the part of the prompt that is new), where strands-vllm's recipe of
``add_prompt``/``add_response`` per call duplicates the whole context of every earlier turn.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Token:
    """One token: its id, its logprob (if known) and whether it counts in the loss."""

    token_id: int
    logprob: float | None = None
    loss_mask: bool = True


class TokenManager:
    """Prompt (loss_mask 0) and response (loss_mask 1) segments of one training sequence."""

    def __init__(self) -> None:
        self._segments: list[list[Token]] = []

    def reset(self) -> None:
        self._segments = []

    def _add(self, token_ids: list[int], logprobs: list[float] | None, is_output: bool) -> None:
        if not token_ids:
            return
        self._segments.append(
            [
                Token(
                    token_id,
                    logprob=logprobs[i] if logprobs and i < len(logprobs) else None,
                    loss_mask=is_output,
                )
                for i, token_id in enumerate(token_ids)
            ]
        )

    def add_prompt(self, token_ids: list[int], logprobs: list[float] | None = None) -> None:
        """Append a prompt segment (not trained on). An empty list adds nothing."""
        self._add(token_ids, logprobs, is_output=False)

    def add_response(self, token_ids: list[int], logprobs: list[float] | None = None) -> None:
        """Append a generated segment (trained on). An empty list adds nothing."""
        self._add(token_ids, logprobs, is_output=True)

    def add_turn(
        self,
        prompt_token_ids: list[int],
        token_ids: list[int],
        logprobs: list[float] | None = None,
    ) -> bool:
        """Append one model call, keeping a single sequence across the calls of a trajectory.

        The call's prompt must start with everything already in the manager (the previous prompt
        and response); only its new tail is added as a prompt segment. Returns False, and adds
        nothing, when it does not (the chat template re-rendered the history differently): start a
        new ``TokenManager`` for that call then.
        """
        have = self.token_ids
        if prompt_token_ids[: len(have)] != have:
            return False
        self.add_prompt(prompt_token_ids[len(have) :])
        self.add_response(token_ids, logprobs)
        return True

    @property
    def tokens(self) -> list[Token]:
        return [token for segment in self._segments for token in segment]

    @property
    def token_ids(self) -> list[int]:
        return [token.token_id for segment in self._segments for token in segment]

    @property
    def loss_mask(self) -> list[int]:
        return [int(token.loss_mask) for segment in self._segments for token in segment]

    @property
    def logprobs(self) -> list[float | None]:
        return [token.logprob for segment in self._segments for token in segment]

    @property
    def segments(self) -> list[list[Token]]:
        return [list(segment) for segment in self._segments]

    @property
    def segment_info(self) -> list[tuple[bool, int]]:
        """One ``(is_output, length)`` per segment."""
        return [(segment[0].loss_mask, len(segment)) for segment in self._segments]

    def __len__(self) -> int:
        return sum(len(segment) for segment in self._segments)

    def __repr__(self) -> str:
        outputs = sum(len(s) for s in self._segments if s[0].loss_mask)
        return f"TokenManager(segments={len(self._segments)}, tokens={len(self)}, output_tokens={outputs})"
