"""Whether a request continues an earlier call of its trajectory, compared by meaning, not by bytes.

A chat call continues an earlier one when its ``messages`` are that call's messages, then the
assistant reply the client received (its content and/or tool calls), then at least one new message,
and everything that shapes the chat template's rendering (tools, template, template arguments) is
unchanged. Clients re-serialise what they send back: the openai SDK adds ``"refusal": null``, an
agent turns a string content into a list of text parts, tool-call arguments come back with other
spacing. So messages are compared after ``normalise_message``: empty values dropped, text parts
joined, tool-call arguments parsed, ids and reasoning (which clients drop) ignored.

A text completion continues an earlier one when its prompt starts with that prompt + its text.

Pure functions, no I/O: the token-in planner (event loop) and the drift judge (writer thread) both
use them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokentrail.proxy.recording.capture import CHAT_ROUTE, RENDER_FIELDS
from tokentrail.proxy.recording.records import PastCall, PastChoice

__all__ = [
    "Continuation",
    "PastCall",
    "PastChoice",
    "Reason",
    "answered_by_a_later_call",
    "best_continuation",
    "continuation",
    "holds_a_reply",
    "last_received_reply",
    "repeats_then_replies",
    "reply_asked_for",
    "suffix_has_reply",
]

# Message keys that do not change the meaning of a message the client sends back.
_IGNORED_KEYS = frozenset(
    {"reasoning", "reasoning_content", "refusal", "annotations", "audio", "function_call"}
)


class Reason:
    """Why a call does not continue a previous one (``llm_calls.token_in_fallback`` holds these too)."""

    FIRST_CALL = "first_call"  # no earlier finished call in the trajectory
    NOT_CHAT = "not_chat"  # not a chat call with a messages list
    TOOLS_CHANGED = "tools_changed"
    OPTIONS_CHANGED = "options_changed"  # chat_template, chat_template_kwargs, documents, ...
    SYSTEM_CHANGED = "system_changed"
    HISTORY_EDITED = "history_edited"  # an earlier message differs
    HISTORY_TRIMMED = "history_trimmed"  # fewer messages than the previous call + its reply
    REPLY_EDITED = "reply_edited"  # the assistant reply differs from what the client received
    CHOICE_UNIDENTIFIED = "choice_unidentified"  # n > 1: no choice, or several different ones, match
    NO_NEW_MESSAGE = "no_new_message"  # the history ends with the reply


@dataclass(frozen=True, slots=True)
class Continuation:
    """``past``'s choice ``choice`` is continued; the request's first ``kept`` messages repeat it."""

    past: PastCall
    choice: PastChoice
    kept: int

    @property
    def previous_ids(self) -> list[int]:
        """The previous prompt + the continued choice's generated IDs."""
        return [*self.past.prompt_ids, *self.choice.token_ids]


def _text_of(content: Any) -> Any:
    """A content as one string when it is text (a string, or a list of text parts); else as is."""
    if content is None:
        return ""
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    return content


def _arguments(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _tool_call(call: Any) -> Any:
    if not isinstance(call, dict):
        return call
    function = call.get("function")
    if not isinstance(function, dict):
        return call
    return (function.get("name"), _arguments(function.get("arguments")))


def normalise_message(message: Any) -> Any:
    """A message reduced to its meaning (see the module docstring)."""
    if not isinstance(message, dict):
        return message
    kept: dict[str, Any] = {}
    for key, value in message.items():
        if key in _IGNORED_KEYS or value is None or value == [] or value == {}:
            continue
        if key == "content":
            value = _text_of(value)
            if value == "":
                continue
        elif key == "tool_calls" and isinstance(value, list):
            value = [_tool_call(c) for c in value]
        kept[key] = value
    kept.setdefault("role", "assistant")
    return kept


def has_non_text_content(messages: Sequence[Any]) -> bool:
    """Whether a message carries media (images, audio, files): vLLM then renders, never reuses IDs."""
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and not isinstance(_text_of(content), str):
            return True
    return False


def _render_options(request: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(request.get(name) for name in RENDER_FIELDS)


def continuation(past: PastCall, request: dict[str, Any]) -> Continuation | str:
    """How ``request`` continues ``past``: a ``Continuation``, or the ``Reason`` it does not."""
    if past.route != CHAT_ROUTE:
        return _completion_continuation(past, request)
    previous, current = past.request.get("messages"), request.get("messages")
    if not isinstance(previous, list) or not isinstance(current, list):
        return Reason.NOT_CHAT
    if request.get("tools") != past.request.get("tools"):
        return Reason.TOOLS_CHANGED
    if _render_options(request) != _render_options(past.request):
        return Reason.OPTIONS_CHANGED
    for position, (before, now) in enumerate(zip(previous, current, strict=False)):
        if before is not now and before != now and normalise_message(before) != normalise_message(now):
            roles = {m.get("role") for m in (before, now) if isinstance(m, dict)}
            return Reason.SYSTEM_CHANGED if position == 0 and "system" in roles else Reason.HISTORY_EDITED
    if len(current) <= len(previous):
        return Reason.HISTORY_TRIMMED
    reply = normalise_message(current[len(previous)])
    matching = [c for c in past.choices if normalise_message(c.message) == reply]
    if len({tuple(c.token_ids) for c in matching}) != 1:
        return Reason.CHOICE_UNIDENTIFIED if len(past.choices) > 1 else Reason.REPLY_EDITED
    if len(current) == len(previous) + 1:
        return Reason.NO_NEW_MESSAGE
    return Continuation(past, matching[0], len(previous) + 1)


def _completion_continuation(past: PastCall, request: dict[str, Any]) -> Continuation | str:
    previous, current = past.request.get("prompt"), request.get("prompt")
    if not isinstance(previous, str) or not isinstance(current, str) or len(past.choices) != 1:
        return Reason.NOT_CHAT
    choice = past.choices[0]
    text = choice.message.get("text")
    if not isinstance(text, str) or not current.startswith(previous + text):
        return Reason.HISTORY_EDITED
    return Continuation(past, choice, 0)


def best_continuation(candidates: Sequence[PastCall], request: dict[str, Any]) -> Continuation | str:
    """The latest of ``candidates`` (oldest first) that ``request`` continues, else the reason the
    latest one is not continued (``first_call`` when there is none)."""
    reason: str = Reason.FIRST_CALL
    for past in reversed(candidates):
        found = continuation(past, request)
        if isinstance(found, Continuation):
            return found
        if reason == Reason.FIRST_CALL:
            reason = found
    return reason


def holds_a_reply(messages: Sequence[Any]) -> bool:
    """Whether ``messages`` hold a model's reply."""
    return any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages)


def suffix_has_reply(found: Continuation | str, request: dict[str, Any]) -> bool:
    """Whether the new messages after the continued reply hold another assistant reply: then a call
    this process does not know of (another worker or replica) came in between, and what it knows
    of the trajectory is stale."""
    if not isinstance(found, Continuation) or found.kept == 0:
        return False
    return holds_a_reply((request.get("messages") or [])[found.kept :])


def answered_by_a_later_call(calls: Sequence[PastCall], found: Continuation, request: dict[str, Any]) -> bool:
    """Whether a call after ``found``'s base had exactly the request's messages up to a reply: then the
    reply in the request's new messages is that call's, edited by the client, not one on its way."""
    later = calls[next(i for i, c in enumerate(calls) if c is found.past) + 1 :]
    return any(
        repeats_then_replies(call.request.get("messages") or [], request["messages"]) for call in later
    )


def repeats_then_replies(theirs: Sequence[Any], mine: Sequence[Any]) -> bool:
    """Whether ``mine`` is ``theirs`` (by meaning), then an assistant reply (to them), then more."""
    if len(mine) <= len(theirs):
        return False
    reply = mine[len(theirs)]
    if not (isinstance(reply, dict) and reply.get("role") == "assistant"):
        return False
    repeated = zip(theirs, mine[: len(theirs)], strict=True)
    return all(a == b or normalise_message(a) == normalise_message(b) for a, b in repeated)


def last_received_reply(messages: Sequence[Any]) -> int | None:
    """The index of the last model reply the client received and went on after (an assistant
    message followed by another message; a trailing one is a prefill, not a reply), else None."""
    for index in range(len(messages) - 2, -1, -1):
        message = messages[index]
        if isinstance(message, dict) and message.get("role") == "assistant":
            return index
    return None


def reply_asked_for(histories: Sequence[Sequence[Any]], messages: Sequence[Any], index: int) -> bool:
    """Whether one of ``histories`` (the messages of recorded calls) is the history before the reply
    at ``messages[index]``: the call answered with that reply is recorded (the client may have edited
    the reply since; it is that call's all the same). Replies are not compared: an agent's replies
    repeat ("OK", the same tool call), and a match by text would find an earlier turn's."""
    return any(len(history) == index and repeats_then_replies(history, messages) for history in histories)
