"""How ``llm_calls_stored`` holds a call, and how full calls are read back from it.

Why: agents re-send their whole history every turn. Stored whole, each call repeats every earlier
call's prompt and messages, so a trajectory's bytes grew with its turns squared (23 and 58 bytes per
trajectory token at 4 and 16 turns on the real vLLM). Instead, a call is stored against a *base*: an
earlier finished call of the same trajectory.

* Prompt IDs: the first ``prompt_shared_tokens`` IDs equal the base's prompt IDs followed by its
  choice ``base_choice_index``'s generated IDs; ``prompt_rest_ids`` holds the IDs after them. This is
  exact whatever the drift: where the history was re-encoded differently (default mode), the shared
  prefix simply ends there and the rest is stored as is.
* Request: its first ``request_shared_messages`` messages equal the base request's (full) messages;
  ``request_rest`` is the request with only the messages after them.

Bases chain back to the trajectory's first call, so what a call stores is what it adds: storage is
linear in the trajectory's tokens. Nobody reads this form: the ``llm_calls`` view (SQL users) and
``rebuild``/``full_calls`` (the API, the export, token-in, drift) give full prompts and requests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select

from tokentrail.proxy.storage.models import Completion, LlmCall

CALLS = LlmCall.__table__  # type: ignore[attr-defined]
COMPLETIONS = Completion.__table__  # type: ignore[attr-defined]

# The columns that hold a call's prompt and request in stored form.
STORED_FORM_COLUMNS = (
    "base_call_id",
    "base_choice_index",
    "prompt_shared_tokens",
    "prompt_rest_ids",
    "request_shared_messages",
    "request_rest",
)


class StoredFormError(RuntimeError):
    """A stored call refers to a base the database does not hold (it was edited by hand)."""


@dataclass(frozen=True, slots=True)
class StoredForm:
    """A call's prompt and request as ``llm_calls_stored`` holds them."""

    base_call_id: str | None = None
    base_choice_index: int | None = None
    prompt_shared_tokens: int = 0
    prompt_rest_ids: list[int] | None = None
    request_shared_messages: int = 0
    request_rest: dict[str, Any] | None = None


def whole(prompt_ids: list[int] | None, request: dict[str, Any] | None) -> StoredForm:
    """The form of a call stored without a base (a first call, or nothing shared)."""
    return StoredForm(prompt_rest_ids=prompt_ids, request_rest=request)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two ID sequences (bisecting on slice compares,
    which run at C speed: a Python loop over 15,000 IDs costs a millisecond)."""
    a = a if isinstance(a, list) else list(a)
    b = b if isinstance(b, list) else list(b)
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # a[:low] == b[:low] and a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


@dataclass(frozen=True, slots=True)
class StoredCall:
    """One row of ``llm_calls_stored``, as far as its prompt and request go."""

    id: str
    form: StoredForm


@dataclass(frozen=True, slots=True)
class FullCall:
    request: dict[str, Any] | None
    prompt_token_ids: list[int] | None


def rebuild(
    calls: Iterable[StoredCall],
    generated: dict[tuple[str, int], list[int]],
    wanted: Iterable[str] | None = None,
) -> dict[str, FullCall]:
    """The full request and prompt IDs of the ``wanted`` calls (all of ``calls`` by default).
    ``calls`` must include every base they refer to (a whole trajectory does); ``generated`` holds
    the generated IDs of the bases' choices (``base_choices``).

    Each call is assembled by walking its chain of bases once, as the SQL view does: a link gives
    the positions from its shared count up to what the calls after it use. Nothing but the wanted
    calls is built, so a cache miss that needs the latest calls of a long trajectory does not build
    every earlier call's prompt."""
    by_id = {call.id: call for call in calls}
    prompt_part = _prompt_part(generated)
    full = {}
    for call_id in by_id if wanted is None else wanted:
        call = by_id[call_id]
        form = call.form
        prompt, request = form.prompt_rest_ids, form.request_rest
        if form.prompt_shared_tokens:
            prompt = _assemble(call, by_id, prompt_part)
        if form.request_shared_messages and request is not None:
            request = dict(request, messages=_assemble(call, by_id, _messages_part))
        full[call_id] = FullCall(request, prompt)
    return full


# What one link of a chain holds of the value being rebuilt: (its shared count, its own part, given
# the call after it in the chain, or None for the call itself).
_Part = Callable[[StoredCall, StoredCall | None], tuple[int, list[Any]]]


def _prompt_part(generated: dict[tuple[str, int], list[int]]) -> _Part:
    def part(link: StoredCall, after: StoredCall | None) -> tuple[int, list[Any]]:
        own = list(link.form.prompt_rest_ids or [])
        if after is not None:  # the later call continued this one's choice: its generated IDs follow
            own += generated.get((link.id, after.form.base_choice_index or 0), [])
        return link.form.prompt_shared_tokens, own

    return part


def _messages_part(link: StoredCall, after: StoredCall | None) -> tuple[int, list[Any]]:
    return link.form.request_shared_messages, list((link.form.request_rest or {}).get("messages") or [])


def _assemble(call: StoredCall, by_id: dict[str, StoredCall], part: _Part) -> list[Any]:
    """The value of a call that shares part of it with its base (its shared count is not 0)."""
    shared, own = part(call, None)
    pieces = [own]
    walked = {call.id}
    link, cut = call, shared  # cut: how much of the next link's value the calls after it use
    while shared:
        base = by_id.get(link.form.base_call_id or "")
        if base is None or base.id in walked:  # only a hand-edited database can do either
            raise StoredFormError(f"call {call.id} is stored against a call that is missing or loops")
        walked.add(base.id)
        shared, own = part(base, link)
        pieces.append(own[: max(0, cut - shared)])
        link, cut = base, min(cut, shared)
    return [item for piece in reversed(pieces) for item in piece]


def stored_call(row: Any) -> StoredCall:
    """A ``StoredCall`` from a row (or mapping) that has ``id`` and the stored-form columns."""
    get = row.get if isinstance(row, dict) else row._mapping.get
    return StoredCall(
        str(get("id")),
        StoredForm(
            get("base_call_id"),
            get("base_choice_index"),
            get("prompt_shared_tokens") or 0,
            get("prompt_rest_ids"),
            get("request_shared_messages") or 0,
            get("request_rest"),
        ),
    )


def base_choices(calls: Iterable[StoredCall]) -> set[tuple[str, int]]:
    """The (call id, choice index) pairs whose generated IDs ``rebuild`` needs."""
    return {
        (c.form.base_call_id, c.form.base_choice_index or 0)
        for c in calls
        if c.form.prompt_shared_tokens and c.form.base_call_id is not None
    }


def load_generated(connection: Connection, wanted: set[tuple[str, int]]) -> dict[tuple[str, int], list[int]]:
    """The generated IDs of these (call id, choice index) pairs."""
    found: dict[tuple[str, int], list[int]] = {}
    call_ids = sorted({call_id for call_id, _ in wanted})
    for start in range(0, len(call_ids), 500):
        rows = connection.execute(
            select(COMPLETIONS.c.call_id, COMPLETIONS.c.choice_index, COMPLETIONS.c.token_ids).where(
                COMPLETIONS.c.call_id.in_(call_ids[start : start + 500])
            )
        )
        for call_id, choice_index, token_ids in rows:
            if (call_id, choice_index) in wanted:
                found[(call_id, choice_index)] = list(token_ids or [])
    return found


def full_calls(
    connection: Connection, trajectory_ids: Iterable[str], wanted: Iterable[str] | None = None
) -> dict[str, FullCall]:
    """The full request and prompt IDs of every call of these trajectories (or of the ``wanted``
    calls among them), by call id."""
    ids = list(dict.fromkeys(trajectory_ids))
    calls: list[StoredCall] = []
    columns = [CALLS.c.id, *(CALLS.c[name] for name in STORED_FORM_COLUMNS)]
    for start in range(0, len(ids), 500):
        query = select(*columns).where(CALLS.c.trajectory_id.in_(ids[start : start + 500]))
        calls.extend(stored_call(row) for row in connection.execute(query))
    return rebuild(calls, load_generated(connection, base_choices(calls)), wanted)
