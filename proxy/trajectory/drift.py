"""Drift: how a call's prompt IDs relate to the previous call of its trajectory, for every call.

Decided by the writer thread when it writes a record (``llm_calls.drift``, ``drift_position``):

* ``first``: the trajectory has no earlier finished call.
* ``extends``: the messages continue an earlier call and the prompt IDs start with that call's prompt
  + generated IDs: one exact training sequence goes on.
* ``token_in``: the same, with the prompt IDs built by the proxy (token-in mode).
* ``retokenized``: the messages continue, but the prompt differs inside the previous generated
  tokens (the reply re-encoded from text, an end-of-turn token the model never sampled).
* ``template``: the messages continue, but the prompt differs inside the previous prompt (the chat
  template renders earlier turns differently once the conversation goes on).
* ``edited``: the messages do not continue any recent call (history edited or trimmed, system prompt
  or tools changed).

``drift_position`` is the index of the first prompt token that differs from the previous prompt +
generated IDs (NULL for ``first``, ``extends`` and ``token_in``).
"""

from __future__ import annotations

import enum
import logging
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

from tokentrail.proxy.recording.order import Awaits
from tokentrail.proxy.recording.records import CallRecord, Outcome
from tokentrail.proxy.recording.stored_form import PrefixMeter, split
from tokentrail.proxy.storage.stored_calls import StoredForm
from tokentrail.proxy.trajectory.continuation import (
    Continuation,
    PastCall,
    PastChoice,
    Reason,
    best_continuation,
    last_received_reply,
    reply_asked_for,
    suffix_has_reply,
)
from tokentrail.proxy.trajectory.memory import (
    CALLS_PER_TRAJECTORY,
    load_answered_histories,
    load_recent_calls,
)

logger = logging.getLogger(__name__)


class Drift(enum.StrEnum):
    FIRST = "first"
    EXTENDS = "extends"
    TOKEN_IN = "token_in"  # noqa: S105 - a drift value, not a secret
    RETOKENIZED = "retokenized"
    TEMPLATE = "template"
    EDITED = "edited"


BREAKS = (Drift.RETOKENIZED, Drift.TEMPLATE, Drift.EDITED)


def classify(
    prompt_ids: Sequence[int],
    found: Continuation | str,
    latest: PastCall | None,
    built: bool,
    meter: PrefixMeter | None = None,
) -> tuple[Drift, int | None]:
    """The drift of a call whose prompt is ``prompt_ids`` (``found``: what it continues, or why not)."""
    meter = meter or PrefixMeter(list(prompt_ids))
    if not isinstance(found, Continuation):
        if found == Reason.FIRST_CALL or latest is None:
            return Drift.FIRST, None
        choice = latest.choices[0] if latest.choices else PastChoice(-1, (), {})
        before = len(latest.prompt_ids) + len(choice.token_ids)
        position = meter.shared(latest, choice)
        if found == Reason.NOT_CHAT and position == before:  # a prompt of token IDs: they tell
            return Drift.EXTENDS, None
        return Drift.EDITED, position
    previous = len(found.past.prompt_ids) + len(found.choice.token_ids)
    position = meter.shared(found.past, found.choice)
    if position == previous:
        return (Drift.TOKEN_IN if built else Drift.EXTENDS), None
    if position < len(found.past.prompt_ids):
        return Drift.TEMPLATE, position
    return Drift.RETOKENIZED, position


def _answered(record: CallRecord) -> bool:
    return any(choice.message for choice in record.choices)


def past_call(record: CallRecord) -> PastCall | None:
    """The record as a candidate for later calls to continue (only finished calls with IDs)."""
    prompt_ids = record.load_prompt_ids()
    if record.outcome != Outcome.OK or prompt_ids is None or record.request is None:
        return None
    choices = tuple(
        PastChoice(c.index, c.token_ids, c.message, c.finish_reason) for c in record.choices if c.token_ids
    )
    if not choices:
        return None
    return PastCall(record.call_id, record.route, record.request, prompt_ids, choices)


class DriftJudge:
    """The writer thread's view of each trajectory's recent calls, and the drift of new ones.

    Bounded: the ``max_trajectories`` most recently written trajectories are kept; another one's
    calls are read from the database (in the writer's transaction) when it is written again.
    """

    def __init__(self, max_trajectories: int = 4096) -> None:
        self._max = max_trajectories
        self._recent: OrderedDict[str, deque[PastCall]] = OrderedDict()
        # the seq of the last call this judge saw written per trajectory: a cache is current only when
        # the call being written comes right after it (another process may have written in between)
        self._last_seq: dict[str, int] = {}
        self._pending_seq: dict[str, int] = {}  # the batch being written: kept once it is committed

    def judge(
        self, connection: Any, records: list[tuple[CallRecord, int]], forms: dict[str, StoredForm]
    ) -> dict[str, deque[PastCall]]:
        """Set ``drift``/``drift_position`` on each record (given with its seq, in write order), and
        put in ``forms`` how each record is stored (``recording/stored_form.py``), by call id: both
        compare the call with the same recent calls of its trajectory.

        Returns the trajectories' candidates as they will be once the batch is committed: pass them
        to ``remember`` then (a batch that fails leaves this judge as it was).
        """
        overlay: dict[str, deque[PastCall]] = {}
        self._pending_seq.clear()  # (what a failed attempt at this batch left)
        for record, seq in records:
            try:
                self._judge_one(connection, record, seq, overlay, forms)
                if record.seq is not None:
                    self._pending_seq[record.trajectory_id] = seq
            except Exception as exc:  # never lose a batch over a diagnosis
                logger.warning(
                    "call_id=<%s>, error=<%s> | drift not judged", record.call_id, type(exc).__name__
                )
                record.drift, record.drift_position = None, None
                forms.pop(record.call_id, None)  # stored whole
        return overlay

    def _judge_one(
        self,
        connection: Any,
        record: CallRecord,
        seq: int,
        overlay: dict[str, deque[PastCall]],
        forms: dict[str, StoredForm],
    ) -> None:
        if record.seq is None:  # a call without a trajectory id is a trajectory of its own
            if record.prompt_token_ids is not None:
                record.drift = Drift.FIRST
            return
        trajectory_id = record.trajectory_id
        candidates = overlay.get(trajectory_id)
        if candidates is None:
            cached = self._recent.get(trajectory_id)
            if cached is not None and self._last_seq.get(trajectory_id) != seq - 1:
                cached = None  # another process wrote calls since: read them
            if seq == 0:
                candidates = deque(maxlen=CALLS_PER_TRAJECTORY)
            elif cached is not None:
                candidates = deque(cached, CALLS_PER_TRAJECTORY)
            else:
                candidates = self._load(connection, trajectory_id)
            overlay[trajectory_id] = candidates
        if record.prompt_token_ids is not None and record.request is not None:
            found = best_continuation(list(candidates), record.request)
            if suffix_has_reply(found, record.request) and trajectory_id in self._recent:
                candidates = self._load(connection, trajectory_id)
                overlay[trajectory_id] = candidates
                found = best_continuation(list(candidates), record.request)
            latest = candidates[-1] if candidates else None
            meter = PrefixMeter(record.prompt_token_ids)
            record.drift, record.drift_position = classify(
                record.prompt_token_ids, found, latest, record.token_in, meter
            )
            forms[record.call_id] = split(record.prompt_token_ids, record.request, candidates, meter)
        else:
            forms[record.call_id] = split(record.prompt_token_ids, record.request, candidates)
        past = past_call(record)
        if past is not None:
            candidates.append(past)

    def awaits_reply(self, connection: Any, record: CallRecord, earlier: Sequence[CallRecord]) -> str | None:
        """What ``record`` waits for (``Awaits``, ``None``: nothing): its history holds a reply the
        client received that no recorded call of its trajectory was answered with, nor one of
        ``earlier`` (its trajectory's records about to be written before it): no call that gave a
        reply was asked with the messages before that one.

        Looked for in the calls this judge wrote last, then in the trajectory's recorded calls that
        gave a reply (whatever their outcome): a trajectory one writer records whole costs no read."""
        messages = record.request.get("messages") if record.seq is not None and record.request else None
        if not isinstance(messages, list):
            return None  # (a text completion's prompt names no earlier call)
        index = last_received_reply(messages)
        if index is None:
            return None  # a first turn: the common case costs nothing more
        histories = [r.request.get("messages") or [] for r in earlier if r.request and _answered(r)]
        histories += [c.request.get("messages") or [] for c in self._recent.get(record.trajectory_id, ())]
        if reply_asked_for(histories, messages, index):
            return None
        recorded = load_answered_histories(connection, record.trajectory_id)
        if reply_asked_for(recorded, messages, index):
            return None
        return Awaits.TURN if recorded or histories else Awaits.FIRST_TURN

    def _load(self, connection: Any, trajectory_id: str) -> deque[PastCall]:
        return deque(load_recent_calls(connection, trajectory_id, CALLS_PER_TRAJECTORY), CALLS_PER_TRAJECTORY)

    def remember(self, overlay: dict[str, deque[PastCall]]) -> None:
        """After a commit: keep the written calls as candidates for the next ones."""
        for trajectory_id, candidates in overlay.items():
            self._recent.pop(trajectory_id, None)
            self._recent[trajectory_id] = candidates
        self._last_seq.update(self._pending_seq)
        self._pending_seq.clear()
        while len(self._recent) > self._max:
            forgotten, _ = self._recent.popitem(last=False)
            self._last_seq.pop(forgotten, None)

    def forget(self, trajectory_ids: set[str]) -> None:
        """Records were written outside ``remember`` (spool replay): read these from the database."""
        for trajectory_id in trajectory_ids:
            self._recent.pop(trajectory_id, None)
            self._last_seq.pop(trajectory_id, None)
