"""Where token-in finds the previous calls of a trajectory: a bounded map in memory, else the database.

The memory holds, per trajectory, its few most recent finished calls (``PastCall``) and the calls
still open. It is filled by the calls this process relays; a trajectory it does not hold (a restarted
proxy, another ``--workers`` process or replica served its earlier calls) is read from the database,
off the event loop, and kept.

Open calls matter for two things. A client may send its next call the moment it has read an answer,
before the relay has finished its record: a new call whose messages extend an open call's messages
by an assistant reply waits (bounded) for that call to end. And two open calls must never be built
on the same base (parallel sub-agents that share a history): the second falls back.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, select

from tokentrail.proxy.storage.queries import CALLS, COMPLETIONS
from tokentrail.proxy.storage.stored_calls import full_calls
from tokentrail.proxy.trajectory.continuation import PastCall, PastChoice, repeats_then_replies

# Recent finished calls kept per trajectory: a call is compared with the latest one it continues
# (parallel sub-agents of one trajectory each continue their own).
CALLS_PER_TRAJECTORY = 4


def load_recent_calls(connection: Connection, trajectory_id: str, limit: int) -> list[PastCall]:
    """The trajectory's latest ``limit`` finished calls, oldest first (with full prompts and
    requests: the whole trajectory is read, as its calls are stored against earlier ones)."""
    rows = connection.execute(
        select(CALLS.c.id, CALLS.c.route)
        .where(
            CALLS.c.trajectory_id == trajectory_id,
            CALLS.c.outcome == "ok",
            CALLS.c.prompt_rest_ids.is_not(None),
        )
        .order_by(CALLS.c.seq.desc())
        .limit(limit)
    ).all()
    if not rows:
        return []
    full = full_calls(connection, [trajectory_id], [row.id for row in rows])
    choices: dict[str, list[PastChoice]] = {row.id: [] for row in rows}
    for choice in connection.execute(
        select(
            COMPLETIONS.c.call_id,
            COMPLETIONS.c.choice_index,
            COMPLETIONS.c.token_ids,
            COMPLETIONS.c.message,
            COMPLETIONS.c.finish_reason,
        )
        .where(COMPLETIONS.c.call_id.in_(list(choices)))
        .order_by(COMPLETIONS.c.call_id, COMPLETIONS.c.choice_index)
    ):
        if choice.token_ids:
            choices[choice.call_id].append(
                PastChoice(choice.choice_index, choice.token_ids, choice.message or {}, choice.finish_reason)
            )
    return [
        PastCall(
            row.id,
            row.route,
            full[row.id].request or {},
            full[row.id].prompt_token_ids or [],
            tuple(choices[row.id]),
        )
        for row in reversed(rows)
        if choices[row.id] and isinstance(full[row.id].prompt_token_ids, list)
    ]


def load_answered_histories(connection: Connection, trajectory_id: str) -> list[list[Any]]:
    """The messages of every recorded call of the trajectory that was answered with a reply (whatever
    its outcome: a stream cut after its reply counts; a failed attempt that gave none does not)."""
    answered = select(COMPLETIONS.c.call_id).where(COMPLETIONS.c.message.is_not(None))
    ids = list(
        connection.execute(
            select(CALLS.c.id).where(CALLS.c.trajectory_id == trajectory_id, CALLS.c.id.in_(answered))
        ).scalars()
    )
    if not ids:
        return []
    full = full_calls(connection, [trajectory_id], ids)
    return [messages for i in ids if isinstance(messages := (full[i].request or {}).get("messages"), list)]


@dataclass(eq=False)
class OpenCall:
    """A call of the trajectory that has not ended yet."""

    messages: list[Any] | None
    base: str | None = None  # the call id it is built on (token-in), once known
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Trajectory:
    calls: deque[PastCall] = field(default_factory=lambda: deque(maxlen=CALLS_PER_TRAJECTORY))
    loaded: bool = False  # the database was read for it (or its first call was relayed here)
    open: list[OpenCall] = field(default_factory=list)


class TrajectoryMemory:
    """Recent calls of the ``max_trajectories`` most recently used trajectories (event loop only)."""

    def __init__(self, max_trajectories: int) -> None:
        self._max = max_trajectories
        self._trajectories: OrderedDict[str, _Trajectory] = OrderedDict()

    def __len__(self) -> int:
        return len(self._trajectories)

    def _get(self, trajectory_id: str) -> _Trajectory:
        found = self._trajectories.get(trajectory_id)
        if found is None:
            found = self._trajectories[trajectory_id] = _Trajectory()
            self._evict()
        else:
            self._trajectories.move_to_end(trajectory_id)
        return found

    def _evict(self) -> None:
        while len(self._trajectories) > self._max:
            for trajectory_id, held in self._trajectories.items():
                if not held.open:  # never forget a trajectory with open calls
                    del self._trajectories[trajectory_id]
                    break
            else:
                return

    def holds(self, trajectory_id: str) -> bool:
        found = self._trajectories.get(trajectory_id)
        return found is not None and found.loaded

    def calls(self, trajectory_id: str) -> list[PastCall]:
        found = self._trajectories.get(trajectory_id)
        return [] if found is None else list(found.calls)

    def merge_loaded(self, trajectory_id: str, loaded: list[PastCall]) -> None:
        """Calls read from the database; those relayed here meanwhile stay, newest last."""
        held = self._get(trajectory_id)
        known = {c.call_id for c in loaded}
        mine = [c for c in held.calls if c.call_id not in known]
        held.calls.clear()
        held.calls.extend([*loaded, *mine])
        held.loaded = True

    def open_call(self, trajectory_id: str, messages: list[Any] | None) -> OpenCall:
        opened = OpenCall(messages)
        self._get(trajectory_id).open.append(opened)
        return opened

    def predecessors(self, trajectory_id: str, opened: OpenCall) -> list[OpenCall]:
        """Open calls whose messages, plus one assistant reply, begin ``opened``'s messages."""
        found = self._trajectories.get(trajectory_id)
        if found is None or opened.messages is None:
            return []
        mine = opened.messages
        return [
            other
            for other in found.open
            if other is not opened
            and other.messages is not None
            and repeats_then_replies(other.messages, mine)
        ]

    def claim_base(self, trajectory_id: str, opened: OpenCall, base: str) -> bool:
        """Build ``opened`` on call ``base`` unless another open call already is."""
        found = self._get(trajectory_id)
        if any(o.base == base for o in found.open if o is not opened):
            return False
        opened.base = base
        return True

    def add(self, trajectory_id: str, finished: PastCall) -> None:
        """A call of a held trajectory that was relayed without token-in."""
        found = self._trajectories.get(trajectory_id)
        if found is not None:
            found.calls.append(finished)

    def close_call(self, trajectory_id: str, opened: OpenCall, finished: PastCall | None) -> None:
        found = self._trajectories.get(trajectory_id)
        opened.done.set()
        if found is None:
            return
        if opened in found.open:
            found.open.remove(opened)
        if finished is not None:
            found.calls.append(finished)
            found.loaded = True
        self._evict()
