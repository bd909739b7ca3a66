"""``VLLMModel``: Strands' OpenAI model for vLLM, keeping vLLM's token IDs and tagging trajectories.

API-compatible with strands-vllm 0.0.6 (``VLLMModel``, ``VLLMModelConfig``,
``make_vllm_openai_model``), with its bugs fixed:

* every request carries ``X-Trajectory-Id`` (see ``trajectory.py``), streaming or not;
* non-streaming requests (``params={"stream": False}``) work and keep their token IDs;
* with ``n`` > 1 only choice 0 drives the agent and its IDs are not mixed with other choices';
* logprobs, when ``params`` ask for them, reach ``additionalModelResponseFields["logprobs"]``;
* ``make_vllm_openai_model`` returns a ``VLLMModel``, so its token IDs are no longer thrown away;
* ``update_config(return_token_ids=..., disable_tools=...)`` takes effect;
* vLLM's errors are mapped like the SDK maps OpenAI's (context overflow, throttling), and newer
  vLLM's ``delta.reasoning`` is read; ``agent_metadata`` reaches ``format_request``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Any, TypedDict, cast

import openai
from strands.models.openai import OpenAIModel
from strands.types.content import Messages
from strands.types.exceptions import ContextWindowOverflowException, ModelThrottledException
from strands.types.streaming import StreamEvent
from strands.types.tools import ToolChoice, ToolSpec

from tokentrail.client.recorder import int_list
from tokentrail.client.trajectory import TRAJECTORY_HEADER, current_trajectory_id, new_trajectory_id

logger = logging.getLogger(__name__)


def _error_kind(error: BaseException) -> str | None:
    """The SDK's classification of an OpenAI error; vLLM's int error codes make the message decide."""
    try:
        from strands.models._openai_errors import classify_openai_error
    except ImportError:  # an SDK without the classifier
        if isinstance(error, openai.RateLimitError):
            return "throttling"
        message = str(error).lower()
        return "context_overflow" if "context length" in message or "context window" in message else None
    return classify_openai_error(error)


class VLLMModelConfig(TypedDict, total=False):
    """Configuration keys of a vLLM endpoint (``update_config`` accepts the last two as well)."""

    base_url: str
    api_key: str
    model_id: str
    params: dict[str, Any] | None
    return_token_ids: bool
    disable_tools: bool


def _merge_params(
    params: dict[str, Any] | None, return_token_ids: bool, disable_tools: bool
) -> dict[str, Any]:
    merged: dict[str, Any] = dict(params or {})
    if return_token_ids:
        extra_body = dict(cast(dict[str, Any], merged.get("extra_body") or {}))
        extra_body.setdefault("return_token_ids", True)
        merged["extra_body"] = extra_body
    if disable_tools:
        merged.setdefault("tool_choice", "none")
    return merged


def make_vllm_openai_model(
    *,
    base_url: str,
    model_id: str,
    api_key: str = "EMPTY",
    params: dict[str, Any] | None = None,
    return_token_ids: bool = False,
    disable_tools: bool = False,
) -> OpenAIModel:
    """An OpenAI-compatible model for a vLLM server (a ``VLLMModel``, so token IDs are kept)."""
    return VLLMModel(
        base_url=base_url,
        model_id=model_id,
        api_key=api_key,
        params=params,
        return_token_ids=return_token_ids,
        disable_tools=disable_tools,
    )


class _ChoiceIds:
    """Token IDs and logprobs of each choice, gathered from stream chunks or a whole response."""

    def __init__(self) -> None:
        self.prompt_token_ids: list[int] | None = None
        self.token_ids: dict[int, list[int]] = {}
        self.logprobs: dict[int, list[float | None]] = {}

    def feed(self, data: dict[str, Any]) -> None:
        prompt = int_list(data.get("prompt_token_ids"))
        if prompt is not None and self.prompt_token_ids is None:
            self.prompt_token_ids = prompt
        for choice in data.get("choices") or []:
            if not isinstance(choice, dict) or not isinstance(choice.get("index"), int):
                continue
            index = choice["index"]
            ids = int_list(choice.get("token_ids"))
            if ids is not None:
                self.token_ids.setdefault(index, []).extend(ids)
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
                values = [e.get("logprob") if isinstance(e, dict) else None for e in logprobs["content"]]
                self.logprobs.setdefault(index, []).extend(values)

    def fields(self, trajectory_id: str) -> dict[str, Any]:
        """``additionalModelResponseFields`` for choice 0."""
        fields: dict[str, Any] = {"trajectory_id": trajectory_id}
        if self.prompt_token_ids is not None:
            fields["prompt_token_ids"] = self.prompt_token_ids
        if self.token_ids.get(0):
            fields["token_ids"] = self.token_ids[0]
        if self.logprobs.get(0):
            fields["logprobs"] = self.logprobs[0]
        return fields


def _as_dict(obj: Any) -> dict[str, Any]:
    """An openai response object as a plain dict, vLLM's extra fields included."""
    try:
        data = obj.model_dump()
    except Exception:  # not a pydantic object: nothing to read
        return {}
    return data if isinstance(data, dict) else {}


class VLLMModel(OpenAIModel):
    """Strands model for vLLM's OpenAI-compatible server (directly or through the TokenTrail proxy)."""

    def __init__(
        self,
        *,
        base_url: str,
        model_id: str,
        api_key: str = "EMPTY",
        params: dict[str, Any] | None = None,
        return_token_ids: bool = False,
        disable_tools: bool = False,
        client: Any | None = None,
        trajectory_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self._disable_tools = disable_tools
        # sent with every request, e.g. X-Trajectory-Group (a GRPO group) or X-Policy-Version
        self.headers = dict(headers or {})
        self.trajectory_id: str = trajectory_id or new_trajectory_id()
        merged = _merge_params(params, return_token_ids, disable_tools)
        if client is not None:
            super().__init__(client=client, model_id=model_id, params=merged)
        else:
            super().__init__(
                client_args={"api_key": api_key, "base_url": base_url}, model_id=model_id, params=merged
            )

    def new_trajectory(self, trajectory_id: str | None = None) -> str:
        """Start a new trajectory for this model's later requests; return its id."""
        self.trajectory_id = trajectory_id or new_trajectory_id()
        return self.trajectory_id

    def update_config(self, **model_config: Any) -> None:
        """As the SDK's, plus ``return_token_ids`` and ``disable_tools`` (strands-vllm ignored them)."""
        return_token_ids = model_config.pop("return_token_ids", None)
        disable_tools = model_config.pop("disable_tools", None)
        if model_config:
            super().update_config(**model_config)
        if return_token_ids is None and disable_tools is None:
            return
        params: dict[str, Any] = dict(cast(dict[str, Any], self.config.get("params") or {}))
        if disable_tools is not None:
            self._disable_tools = bool(disable_tools)
            if disable_tools:
                params.setdefault("tool_choice", "none")
            elif params.get("tool_choice") == "none":
                params.pop("tool_choice")
        if return_token_ids is not None:
            extra_body = dict(params.get("extra_body") or {})
            extra_body["return_token_ids"] = bool(return_token_ids)
            params["extra_body"] = extra_body
        self.config["params"] = params

    @staticmethod
    def _coerce_int_list(value: Any) -> list[int] | None:
        return int_list(value)

    @classmethod
    def _extract_token_fields_from_openai_chunk(
        cls, chunk_dict: dict[str, Any]
    ) -> tuple[list[int] | None, list[int] | None]:
        """(prompt IDs, choice 0's IDs) of one chunk; kept from strands-vllm's private API."""
        ids = _ChoiceIds()
        ids.feed(chunk_dict)
        return ids.prompt_token_ids, ids.token_ids.get(0)

    def _trajectory_for(self, invocation_state: Any) -> str:
        if isinstance(invocation_state, dict) and isinstance(invocation_state.get("trajectory_id"), str):
            return cast(str, invocation_state["trajectory_id"])
        return current_trajectory_id() or self.trajectory_id

    async def stream(
        self,
        messages: Messages,
        tool_specs: list[ToolSpec] | None = None,
        system_prompt: str | None = None,
        *,
        tool_choice: ToolChoice | None = None,
        **kwargs: Any,
    ) -> AsyncGenerator[StreamEvent, None]:
        """Stream one model call; the ``messageStop`` event carries vLLM's token IDs of choice 0."""
        request = self.format_request(
            messages, tool_specs, system_prompt, tool_choice, agent_metadata=kwargs.get("agent_metadata")
        )
        if (self._disable_tools and not tool_specs) or request.get("tools") == []:
            # vLLM 0.32 rejects "tools": [] ("must not be an empty array"), which the SDK sends for an
            # agent without tools; a tool_choice without tools is rejected too.
            request.pop("tools", None)
            request.pop("tool_choice", None)
        trajectory_id = self._trajectory_for(kwargs.get("invocation_state"))
        request["extra_headers"] = {
            **self.headers,
            **(request.get("extra_headers") or {}),
            TRAJECTORY_HEADER: trajectory_id,
        }
        async with self._get_client() as client:
            try:
                response = await client.chat.completions.create(**request)
                if not request.get("stream", True):
                    for event in self._whole_response_events(response, trajectory_id):
                        yield event
                    return
                async for event in self._stream_events(response, trajectory_id):
                    yield event
            except openai.APIError as error:
                kind = _error_kind(error)
                if kind == "throttling":
                    raise ModelThrottledException(str(error)) from error
                if kind == "context_overflow":
                    raise ContextWindowOverflowException(str(error)) from error
                raise

    def _whole_response_events(self, response: Any, trajectory_id: str) -> list[StreamEvent]:
        ids = _ChoiceIds()
        ids.feed(_as_dict(response))
        events = self._format_non_streaming_response(response)
        for event in events:
            if "messageStop" in event:
                event["messageStop"]["additionalModelResponseFields"] = ids.fields(trajectory_id)
        return events

    async def _stream_events(self, response: Any, trajectory_id: str) -> AsyncGenerator[StreamEvent, None]:
        ids = _ChoiceIds()
        yield self.format_chunk({"chunk_type": "message_start"})
        tool_calls: dict[int, list[Any]] = {}
        data_type: str | None = None
        finish_reason: str | None = None
        usage: Any = None
        async for chunk in response:
            ids.feed(_as_dict(chunk))
            if getattr(chunk, "usage", None):
                usage = chunk.usage
            choice = next((c for c in getattr(chunk, "choices", None) or [] if c.index == 0), None)
            if choice is None:
                continue
            reasoning = getattr(choice.delta, "reasoning_content", None)
            if not isinstance(reasoning, str) or not reasoning:
                reasoning = getattr(choice.delta, "reasoning", None)
            if isinstance(reasoning, str) and reasoning:
                events, data_type = self._stream_switch_content("reasoning_content", data_type)
                for event in events:
                    yield event
                yield self.format_chunk(
                    {"chunk_type": "content_delta", "data_type": data_type, "data": reasoning}
                )
            if choice.delta.content:
                events, data_type = self._stream_switch_content("text", data_type)
                for event in events:
                    yield event
                yield self.format_chunk(
                    {"chunk_type": "content_delta", "data_type": data_type, "data": choice.delta.content}
                )
            for tool_call in choice.delta.tool_calls or []:
                tool_calls.setdefault(tool_call.index, []).append(tool_call)
            if choice.finish_reason:
                finish_reason = choice.finish_reason
                if data_type:
                    yield self.format_chunk({"chunk_type": "content_stop", "data_type": data_type})
                break
        for tool_deltas in tool_calls.values():
            yield self.format_chunk(
                {"chunk_type": "content_start", "data_type": "tool", "data": tool_deltas[0]}
            )
            for tool_delta in tool_deltas:
                yield self.format_chunk(
                    {"chunk_type": "content_delta", "data_type": "tool", "data": tool_delta}
                )
            yield self.format_chunk({"chunk_type": "content_stop", "data_type": "tool"})
        stop_reason = finish_reason or "end_turn"
        if stop_reason == "tool_calls" and not tool_calls:
            stop_reason = "end_turn"
        stop = self.format_chunk({"chunk_type": "message_stop", "data": stop_reason})
        stop["messageStop"]["additionalModelResponseFields"] = ids.fields(trajectory_id)
        yield stop
        async for chunk in response:  # the rest: other choices and the usage chunk
            if getattr(chunk, "usage", None):
                usage = chunk.usage
        if usage is not None:
            yield self.format_chunk({"chunk_type": "metadata", "data": usage})
