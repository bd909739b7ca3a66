"""The reads and small writes that the API, the export and the CLI share (SQLite and PostgreSQL alike)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Select, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import ColumnElement

from tokentrail.proxy.storage.call_tokens import CallTokens, ChoiceTokens, logprob_values
from tokentrail.proxy.storage.models import Certificate, Completion, LlmCall, Trajectory
from tokentrail.proxy.storage.stored_calls import STORED_FORM_COLUMNS, full_calls, rebuild, stored_call

TRAJECTORIES = Trajectory.__table__  # type: ignore[attr-defined]
CALLS = LlmCall.__table__  # type: ignore[attr-defined]
COMPLETIONS = Completion.__table__  # type: ignore[attr-defined]
CERTIFICATES = Certificate.__table__  # type: ignore[attr-defined]


class BadCursorError(ValueError):
    """A pagination cursor this server did not make."""


@dataclass(frozen=True)
class TrajectoryFilter:
    since: datetime | None = None
    until: datetime | None = None
    finished: bool | None = None
    tags: dict[str, str] | None = None
    has_reward: bool | None = None


def encode_cursor(created_at: datetime, trajectory_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), trajectory_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, trajectory_id = json.loads(raw)
        return datetime.fromisoformat(created), str(trajectory_id)
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise BadCursorError("the cursor is not one this server gave out") from exc


def _utc(value: datetime) -> datetime:
    """An aware UTC time (stored times are UTC; a time without a zone is taken as UTC)."""
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def trajectory_conditions(filters: TrajectoryFilter) -> list[ColumnElement[bool]]:
    """The conditions on ``trajectories`` that ``filters`` stands for (all must hold)."""
    conditions: list[ColumnElement[bool]] = []
    if filters.since is not None:
        conditions.append(TRAJECTORIES.c.created_at >= _utc(filters.since))
    if filters.until is not None:
        conditions.append(TRAJECTORIES.c.created_at < _utc(filters.until))
    if filters.finished is not None:
        conditions.append(TRAJECTORIES.c.finished == filters.finished)
    if filters.has_reward is not None:
        column = TRAJECTORIES.c.reward
        conditions.append(column.is_not(None) if filters.has_reward else column.is_(None))
    for key, value in (filters.tags or {}).items():
        conditions.append(TRAJECTORIES.c.tags[key].as_string() == value)
    return conditions


def filtered_trajectories(filters: TrajectoryFilter) -> Select[Any]:
    """The trajectories matching ``filters``, unordered."""
    return select(TRAJECTORIES).where(*trajectory_conditions(filters))


def trajectories_query(
    filters: TrajectoryFilter, after: tuple[datetime, str] | None, limit: int
) -> Select[Any]:
    """Trajectories oldest first, keyset-paginated on (created_at, id)."""
    query = filtered_trajectories(filters)
    if after is not None:
        created, trajectory_id = after
        created = _utc(created)
        query = query.where(
            (TRAJECTORIES.c.created_at > created)
            | ((TRAJECTORIES.c.created_at == created) & (TRAJECTORIES.c.id > trajectory_id))
        )
    return query.order_by(TRAJECTORIES.c.created_at, TRAJECTORIES.c.id).limit(limit)


def list_trajectories(
    connection: Connection, filters: TrajectoryFilter, after: tuple[datetime, str] | None, limit: int
) -> list[dict[str, Any]]:
    return [dict(row._mapping) for row in connection.execute(trajectories_query(filters, after, limit))]


def get_trajectory(connection: Connection, trajectory_id: str) -> dict[str, Any] | None:
    row = connection.execute(select(TRAJECTORIES).where(TRAJECTORIES.c.id == trajectory_id)).first()
    return None if row is None else dict(row._mapping)


def get_calls(connection: Connection, trajectory_id: str, *, prompt_ids: bool = True) -> list[dict[str, Any]]:
    """Every call of a trajectory in seq order, each with its completions and its full ``request``
    and ``prompt_token_ids`` (the columns of the ``llm_calls`` view; ``prompt_ids`` false: None,
    and the prompts are not rebuilt)."""
    stored = [
        dict(row._mapping)
        for row in connection.execute(
            select(CALLS).where(CALLS.c.trajectory_id == trajectory_id).order_by(CALLS.c.seq)
        )
    ]
    generated: dict[tuple[str, int], list[int]] = {}
    by_id: dict[str, dict[str, Any]] = {}
    for call in stored:
        by_id[call["id"]] = {k: v for k, v in call.items() if k not in STORED_FORM_COLUMNS}
        by_id[call["id"]]["completions"] = []
    if by_id:
        rows = connection.execute(
            select(COMPLETIONS)
            .where(COMPLETIONS.c.call_id.in_(list(by_id)))
            .order_by(COMPLETIONS.c.call_id, COMPLETIONS.c.choice_index)
        )
        for row in rows:
            by_id[row.call_id]["completions"].append(dict(row._mapping))
            generated[(row.call_id, row.choice_index)] = list(row.token_ids or [])
    if not prompt_ids:  # requests only: no prompt shares anything, so none is rebuilt
        stored = [dict(call, prompt_shared_tokens=0, prompt_rest_ids=None) for call in stored]
    full = rebuild([stored_call(call) for call in stored], generated)
    for call_id, call in by_id.items():
        call["request"] = full[call_id].request
        call["prompt_token_ids"] = full[call_id].prompt_token_ids
    wanted = {c["certificate_id"] for c in by_id.values() if c.get("certificate_id")}
    certificates = {}
    if wanted:
        certificates = {
            row.id: dict(row._mapping)
            for row in connection.execute(select(CERTIFICATES).where(CERTIFICATES.c.id.in_(sorted(wanted))))
        }
    for call in by_id.values():
        call["certificate"] = certificates.get(call.get("certificate_id") or "")
    return list(by_id.values())


def load_call_tokens(connection: Connection, trajectory_ids: Iterable[str]) -> dict[str, list[CallTokens]]:
    """The ``ok`` calls of these trajectories as token sequences, in seq order."""
    ids = list(trajectory_ids)
    result: dict[str, list[CallTokens]] = {t: [] for t in ids}
    if not ids:
        return result
    prompts = full_calls(connection, ids)
    rows = connection.execute(
        select(
            CALLS.c.id,
            CALLS.c.trajectory_id,
            CALLS.c.seq,
            COMPLETIONS.c.choice_index,
            COMPLETIONS.c.token_ids,
            COMPLETIONS.c.logprobs,
        )
        .join(COMPLETIONS, COMPLETIONS.c.call_id == CALLS.c.id)
        .where(CALLS.c.trajectory_id.in_(ids), CALLS.c.outcome == "ok")
        .order_by(CALLS.c.trajectory_id, CALLS.c.seq, COMPLETIONS.c.choice_index)
    )
    current: CallTokens | None = None
    for call_id, trajectory_id, seq, choice_index, token_ids, logprobs in rows:
        if current is None or current.call_id != call_id:
            current = CallTokens(call_id, seq, prompts[call_id].prompt_token_ids or [], [])
            result[trajectory_id].append(current)
        current.choices.append(ChoiceTokens(choice_index, list(token_ids or []), logprob_values(logprobs)))
    return result


def drift_of_calls(connection: Connection, call_ids: list[str]) -> list[str]:
    """The drift of each of these calls ("unknown" where it was not judged)."""
    drifts: list[str] = []
    for start in range(0, len(call_ids), 500):
        rows = connection.execute(select(CALLS.c.drift).where(CALLS.c.id.in_(call_ids[start : start + 500])))
        drifts.extend(drift or "unknown" for (drift,) in rows)
    return drifts


def outcome_problems(connection: Connection, trajectory_ids: list[str]) -> dict[str, int]:
    """For each trajectory, how many of its calls did not end ``ok``."""
    found = dict.fromkeys(trajectory_ids, 0)
    if trajectory_ids:
        rows = connection.execute(
            select(CALLS.c.trajectory_id, func.count())
            .where(CALLS.c.trajectory_id.in_(trajectory_ids), CALLS.c.outcome != "ok")
            .group_by(CALLS.c.trajectory_id)
        )
        found.update({trajectory_id: count for trajectory_id, count in rows})
    return found


def _ensure_trajectory(connection: Connection, trajectory_id: str, now: datetime) -> None:
    """Create the trajectory row if it is not there yet (a reward may come before the writer's batch)."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(TRAJECTORIES).values(id=trajectory_id, created_at=now, updated_at=now)
    connection.execute(statement.on_conflict_do_nothing(index_elements=[TRAJECTORIES.c.id]))


def set_reward(
    connection: Connection, trajectory_id: str, reward: float, metadata: dict[str, Any] | None
) -> None:
    now = datetime.now(UTC)
    _ensure_trajectory(connection, trajectory_id, now)
    values: dict[str, Any] = {"reward": reward, "rewarded_at": now, "updated_at": now}
    if metadata:
        current = connection.execute(
            select(TRAJECTORIES.c.metadata).where(TRAJECTORIES.c.id == trajectory_id)
        ).scalar_one()
        values["metadata"] = {**(current or {}), **metadata}
    connection.execute(TRAJECTORIES.update().where(TRAJECTORIES.c.id == trajectory_id).values(**values))


def add_tags(connection: Connection, trajectory_id: str, tags: dict[str, str]) -> None:
    now = datetime.now(UTC)
    _ensure_trajectory(connection, trajectory_id, now)
    current = connection.execute(
        select(TRAJECTORIES.c.tags).where(TRAJECTORIES.c.id == trajectory_id)
    ).scalar_one()
    connection.execute(
        TRAJECTORIES.update()
        .where(TRAJECTORIES.c.id == trajectory_id)
        .values(tags={**(current or {}), **tags}, updated_at=now)
    )


def finish(connection: Connection, trajectory_id: str) -> None:
    now = datetime.now(UTC)
    _ensure_trajectory(connection, trajectory_id, now)
    connection.execute(
        TRAJECTORIES.update()
        .where(TRAJECTORIES.c.id == trajectory_id)
        .values(finished=True, finished_at=now, updated_at=now)
    )


def group_trajectories(
    connection: Connection, group_id: str, filters: TrajectoryFilter | None = None
) -> list[dict[str, Any]]:
    """The trajectories of a GRPO group (those matching ``filters``), oldest first."""
    query = (
        filtered_trajectories(filters or TrajectoryFilter())
        .where(TRAJECTORIES.c.group_id == group_id)
        .order_by(TRAJECTORIES.c.created_at, TRAJECTORIES.c.id)
    )
    return [dict(row._mapping) for row in connection.execute(query)]


def group_ids(connection: Connection, filters: TrajectoryFilter) -> list[str]:
    """The groups of the trajectories matching ``filters``, in order."""
    matching = filtered_trajectories(filters).where(TRAJECTORIES.c.group_id.is_not(None)).subquery()
    query = select(matching.c.group_id).distinct().order_by(matching.c.group_id)
    return [group_id for (group_id,) in connection.execute(query)]


def set_group(connection: Connection, trajectory_id: str, group_id: str) -> None:
    now = datetime.now(UTC)
    _ensure_trajectory(connection, trajectory_id, now)
    connection.execute(
        TRAJECTORIES.update()
        .where(TRAJECTORIES.c.id == trajectory_id)
        .values(group_id=group_id, updated_at=now)
    )
