"""``VLLMTokenRecorder``: a Strands callback handler that keeps each model call's token IDs.

Same API as strands-vllm 0.0.6: ``prompt_token_ids`` and ``token_ids`` hold the last model call,
``history`` one entry per call, and the OpenTelemetry attributes Agent Lightning reads are set on
the span current at the end of the call (Strands' ``chat`` span). Added to each history entry when
known: the call's ``logprobs`` (one per generated token, when ``params`` asked for them) and its
``trajectory_id``; ``trajectory_id`` is the last call's id, for attaching a reward afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from opentelemetry import trace as trace_api

logger = logging.getLogger(__name__)

PROMPT_COUNT_ATTRIBUTE = "llm.token_count.prompt"
COMPLETION_COUNT_ATTRIBUTE = "llm.token_count.completion"
PROMPT_IDS_ATTRIBUTE = "llm.hosted_vllm.prompt_token_ids"
RESPONSE_IDS_ATTRIBUTE = "llm.hosted_vllm.response_token_ids"


def int_list(value: Any) -> list[int] | None:
    """The value if it is a list of ints (bools excluded), else None."""
    if isinstance(value, list | tuple) and all(type(x) is int for x in value):
        return list(value)
    return None


class VLLMTokenRecorder:
    """Records the token IDs the model attached to each ``messageStop`` event."""

    def __init__(self, inner: Any | None = None, add_to_span: bool = True) -> None:
        self.inner: Callable[..., Any] | None = inner
        self.add_to_span = add_to_span
        self.prompt_token_ids: list[int] | None = None
        self.token_ids: list[int] | None = None
        self.trajectory_id: str | None = None
        self.history: list[dict[str, Any]] = []

    def reset(self) -> None:
        self.prompt_token_ids = None
        self.token_ids = None
        self.trajectory_id = None
        self.history = []

    @staticmethod
    def _coerce_int_list(value: Any) -> list[int] | None:
        return int_list(value)

    def __call__(self, **kwargs: Any) -> None:
        if self.inner is not None:
            self.inner(**kwargs)
        event = kwargs.get("event")
        if not isinstance(event, dict):
            return
        stop = event.get("messageStop")
        if not isinstance(stop, dict):
            return
        fields = stop.get("additionalModelResponseFields")
        if not isinstance(fields, dict):
            return
        if isinstance(fields.get("trajectory_id"), str):
            self.trajectory_id = fields["trajectory_id"]
        prompt_ids = int_list(fields.get("prompt_token_ids"))
        token_ids = int_list(fields.get("token_ids"))
        if prompt_ids is None and token_ids is None:
            return
        if prompt_ids is not None:
            self.prompt_token_ids = prompt_ids
        if token_ids is not None:
            self.token_ids = token_ids
        entry: dict[str, Any] = {"prompt_token_ids": prompt_ids, "token_ids": token_ids}
        if isinstance(fields.get("logprobs"), list):
            entry["logprobs"] = fields["logprobs"]
        if self.trajectory_id is not None:
            entry["trajectory_id"] = self.trajectory_id
        self.history.append(entry)
        if self.add_to_span:
            self._add_token_ids_to_span(prompt_ids, token_ids)

    def _add_token_ids_to_span(self, prompt_token_ids: list[int] | None, token_ids: list[int] | None) -> None:
        try:
            span = trace_api.get_current_span()
            if not span.is_recording():
                return
            if prompt_token_ids is not None:
                span.set_attribute(PROMPT_COUNT_ATTRIBUTE, len(prompt_token_ids))
                span.set_attribute(PROMPT_IDS_ATTRIBUTE, prompt_token_ids)
            if token_ids is not None:
                span.set_attribute(COMPLETION_COUNT_ATTRIBUTE, len(token_ids))
                span.set_attribute(RESPONSE_IDS_ATTRIBUTE, token_ids)
        except Exception as exc:  # a tracing failure must never break the agent
            logger.debug("error=<%s> | could not add token ids to the span", type(exc).__name__)
