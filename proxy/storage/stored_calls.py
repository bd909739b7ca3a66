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

from collections.abc import Iterable, Sequence
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
    seq: int
    form: StoredForm


@dataclass(frozen=True, slots=True)
class FullCall:
    request: dict[str, Any] | None
    prompt_token_ids: list[int] | None


def rebuild(calls: Iterable[StoredCall], generated: dict[tuple[str, int], list[int]]) -> dict[str, FullCall]:
    """The full request and prompt IDs of each call. ``calls`` must include every base they refer to
    (a whole trajectory does); ``generated`` holds the generated IDs of the bases' choices."""
    full: dict[str, FullCall] = {}
    for call in sorted(calls, key=lambda c: c.seq):  # a base is always written before its calls
        form = call.form
        prompt, request = form.prompt_rest_ids, form.request_rest
        if form.prompt_shared_tokens or form.request_shared_messages:
            base = full.get(form.base_call_id or "")
            if base is None:
                raise StoredFormError(
                    f"call {call.id} is stored against {form.base_call_id}, which is missing"
                )
            if form.prompt_shared_tokens:
                before = list(base.prompt_token_ids or [])
                if len(before) < form.prompt_shared_tokens:
                    before += generated.get((form.base_call_id or "", form.base_choice_index or 0), [])
                prompt = before[: form.prompt_shared_tokens] + (prompt or [])
            if form.request_shared_messages and request is not None:
                shared = (base.request or {}).get("messages") or []
                request = dict(request, messages=shared[: form.request_shared_messages] + request["messages"])
        full[call.id] = FullCall(request, prompt)
    return full


def rebuild_some(
    calls: Iterable[StoredCall], generated: dict[tuple[str, int], list[int]], wanted: Iterable[str]
) -> dict[str, FullCall]:
    """Like ``rebuild``, for a few calls of a long trajectory: each is assembled by walking its chain
    of bases once (as the SQL view does), without building every earlier call's full prompt, which
    grew with turns x prompt length for a cache miss that needs only the latest calls."""
    by_id = {call.id: call for call in calls}
    return {
        call_id: FullCall(_request_of(call_id, by_id), _prompt_of(call_id, by_id, generated))
        for call_id in wanted
    }


def _base(form: StoredForm, by_id: dict[str, StoredCall], call_id: str, walked: set[str]) -> StoredCall:
    base = by_id.get(form.base_call_id or "")
    if base is None or base.id in walked:  # only a hand-edited database can do either
        raise StoredFormError(
            f"call {call_id} is stored against {form.base_call_id}, which is missing or loops"
        )
    walked.add(base.id)
    return base


def _prompt_of(
    call_id: str, by_id: dict[str, StoredCall], generated: dict[tuple[str, int], list[int]]
) -> list[int] | None:
    call = by_id[call_id]
    if not call.form.prompt_shared_tokens:
        return call.form.prompt_rest_ids
    pieces: list[list[int]] = []
    walked = {call_id}
    link, choice, cut = call, None, None  # cut: how much of this link's sequence the later calls use
    while True:
        form = link.form
        own = list(form.prompt_rest_ids or [])
        if choice is not None:
            own += generated.get((link.id, choice), [])
        start = form.prompt_shared_tokens
        pieces.append(own if cut is None else own[: max(0, cut - start)])
        if not start:
            break
        cut = start if cut is None else min(cut, start)
        link, choice = _base(form, by_id, link.id, walked), form.base_choice_index or 0
    return [token for piece in reversed(pieces) for token in piece]


def _request_of(call_id: str, by_id: dict[str, StoredCall]) -> dict[str, Any] | None:
    call = by_id[call_id]
    request = call.form.request_rest
    if not call.form.request_shared_messages or request is None:
        return request
    pieces: list[list[Any]] = []
    walked = {call_id}
    link, cut = call, None
    while True:
        form = link.form
        own = list((form.request_rest or {}).get("messages") or [])
        start = form.request_shared_messages
        pieces.append(own if cut is None else own[: max(0, cut - start)])
        if not start:
            break
        cut = start if cut is None else min(cut, start)
        link = _base(form, by_id, link.id, walked)
    return dict(request, messages=[message for piece in reversed(pieces) for message in piece])


def stored_call(row: Any) -> StoredCall:
    """A ``StoredCall`` from a row (or mapping) that has ``id``, ``seq`` and the stored-form columns."""
    get = row.get if isinstance(row, dict) else row._mapping.get
    return StoredCall(
        str(get("id")),
        int(get("seq") or 0),
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
    columns = [CALLS.c.id, CALLS.c.seq, *(CALLS.c[name] for name in STORED_FORM_COLUMNS)]
    for start in range(0, len(ids), 500):
        query = select(*columns).where(CALLS.c.trajectory_id.in_(ids[start : start + 500]))
        calls.extend(stored_call(row) for row in connection.execute(query))
    generated = load_generated(connection, base_choices(calls))
    return rebuild(calls, generated) if wanted is None else rebuild_some(calls, generated, wanted)
