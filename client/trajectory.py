"""Which trajectory a request belongs to: ``X-Trajectory-Id`` from a context, a call or a model.

Precedence, most specific first: ``invocation_state["trajectory_id"]`` of one agent call, the
``trajectory(...)`` context around the code that runs the agent, then the model's own
``trajectory_id`` (a fresh id per ``VLLMModel`` unless one is given). A ``ContextVar`` keeps
concurrent agents apart: each asyncio task and each thread started by Strands sees its own value.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

TRAJECTORY_HEADER = "X-Trajectory-Id"

_current: ContextVar[str | None] = ContextVar("tokentrail_trajectory_id", default=None)


def new_trajectory_id() -> str:
    """A fresh, unique trajectory id."""
    return uuid.uuid4().hex


def current_trajectory_id() -> str | None:
    """The id set by the innermost ``trajectory(...)`` context, if any."""
    return _current.get()


@dataclass(frozen=True)
class Trajectory:
    """A handle on the id of one agent run, to attach a reward to it afterwards."""

    id: str


@contextmanager
def trajectory(trajectory_id: str | None = None) -> Iterator[Trajectory]:
    """Tag every model request made inside the block with one trajectory id (new unless given).

    >>> with trajectory() as run:
    ...     agent("Solve the task")
    >>> reward_store[run.id] = 1.0
    """
    value = trajectory_id or new_trajectory_id()
    token = _current.set(value)
    try:
        yield Trajectory(value)
    finally:
        _current.reset(token)
