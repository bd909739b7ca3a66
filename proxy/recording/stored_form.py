"""The writer's side of ``storage/stored_calls.py``: which earlier call a new call is stored against.

The drift judge already holds each trajectory's few most recent finished calls with their full prompt
and generated IDs (in memory, or read back from the database). The base is the one whose prompt +
generated IDs of one choice share the longest prefix with the new prompt, so that the least is
stored again; its messages are shared as far as they are the same JSON, key order included, so the
request read back is the one that came in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokentrail.proxy import jsonio
from tokentrail.proxy.recording.records import PastCall, PastChoice
from tokentrail.proxy.storage.stored_calls import StoredForm, common_prefix, whole


def shared_tokens(prompt_ids: list[int], before: Sequence[int], generated: Sequence[int]) -> int:
    """How many of ``prompt_ids`` are ``before`` + ``generated`` (without joining the two)."""
    shared = common_prefix(prompt_ids, before)
    if shared < len(before) or shared == len(prompt_ids):
        return shared
    return shared + common_prefix(prompt_ids[shared:], generated)


class PrefixMeter:
    """How many of one prompt's IDs each earlier call's prompt + choice shares, each measured once:
    the drift judge and the stored form ask about the same pairs, and with prompts of 15,000 IDs
    the comparison was the writer thread's largest cost."""

    def __init__(self, prompt_ids: list[int]) -> None:
        self.prompt_ids = prompt_ids
        self._known: dict[tuple[str, int], int] = {}

    def shared(self, past: PastCall, choice: PastChoice) -> int:
        key = (past.call_id, choice.index)
        found = self._known.get(key)
        if found is None:
            found = self._known[key] = shared_tokens(self.prompt_ids, past.prompt_ids, choice.token_ids)
        return found


def shared_messages(messages: list[Any], base_messages: list[Any]) -> int:
    """How many leading messages are the same JSON as the base's (values first, then the text)."""
    count = 0
    for mine, theirs in zip(messages, base_messages, strict=False):
        if mine != theirs:
            break
        count += 1
    while count and jsonio.dumps_text(messages[:count]) != jsonio.dumps_text(base_messages[:count]):
        count -= 1  # equal values in another key order: share fewer (rare, so simply step back)
    return count


def split(
    prompt_ids: list[int] | None,
    request: dict[str, Any] | None,
    candidates: Sequence[PastCall],
    meter: PrefixMeter | None = None,
) -> StoredForm:
    """The stored form of a call with this prompt and request, given its trajectory's recent finished
    calls (oldest first)."""
    best: PastCall | None = None
    best_choice, best_shared = 0, 0
    if prompt_ids:
        meter = meter or PrefixMeter(prompt_ids)
        for past in reversed(candidates):  # the latest first: it usually shares the most
            for choice in past.choices:
                if len(past.prompt_ids) + len(choice.token_ids) <= best_shared:
                    continue  # cannot share more than the best so far
                shared = meter.shared(past, choice)
                if shared > best_shared:
                    best, best_choice, best_shared = past, choice.index, shared
    messages = request.get("messages") if isinstance(request, dict) else None
    if best is None and isinstance(messages, list) and candidates:
        best = candidates[-1]  # no prompt IDs shared (none recorded): the messages still can be
    if best is None:
        return whole(prompt_ids, request)
    shared_count = 0
    base_messages = best.request.get("messages")
    if isinstance(messages, list) and isinstance(base_messages, list):
        shared_count = shared_messages(messages, base_messages)
    if not best_shared and not shared_count:
        return whole(prompt_ids, request)
    rest_request = request
    if shared_count and request is not None:
        rest_request = dict(request, messages=messages[shared_count:])  # type: ignore[index]
    return StoredForm(
        base_call_id=best.call_id,
        base_choice_index=best_choice if best_shared else None,
        prompt_shared_tokens=best_shared,
        prompt_rest_ids=prompt_ids[best_shared:] if prompt_ids is not None else None,
        request_shared_messages=shared_count,
        request_rest=rest_request,
    )
