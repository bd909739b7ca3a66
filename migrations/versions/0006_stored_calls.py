"""Calls stored in linear space: the table becomes ``llm_calls_stored``, ``llm_calls`` a view.

A call's prompt IDs and request are stored against an earlier call of its trajectory
(``proxy/storage/stored_calls.py``): the count of prompt IDs and of messages it shares with that
call, then the rest. The ``llm_calls`` view has the same columns as the table had, with the full
``request`` and ``prompt_token_ids`` rebuilt in SQL, so queries written for the table still work.
``turns`` and ``trajectory_summary`` read the stored table (``prompt_len`` without rebuilding).

Existing calls are converted trajectory by trajectory with the writer's own rule; ``downgrade``
stores every call whole again. Either way, run ``VACUUM`` afterwards to give the space back to the
file system (SQLite keeps freed pages).

Revision ID: 0006_stored_calls
Revises: 0005_rl_loop
Create Date: 2026-12-03
"""

from __future__ import annotations

import importlib
from collections import deque
from typing import Any

import sqlalchemy as sa
from alembic import op

from tokentrail.proxy import jsonio
from tokentrail.proxy.recording.stored_form import split
from tokentrail.proxy.storage.stored_calls import StoredForm, rebuild, stored_call
from tokentrail.proxy.trajectory.continuation import PastCall, PastChoice
from tokentrail.proxy.trajectory.memory import CALLS_PER_TRAJECTORY

revision = "0006_stored_calls"
down_revision = "0005_rl_loop"
branch_labels = None
depends_on = None

_RL_LOOP = importlib.import_module("tokentrail.migrations.versions.0005_rl_loop")

PROMPT_LEN = (
    "CASE WHEN c.prompt_rest_ids IS NULL THEN NULL "
    "ELSE c.prompt_shared_tokens + json_array_length(c.prompt_rest_ids) END AS prompt_len"
)
TURNS = _RL_LOOP.TURNS.replace(
    "    json_array_length(c.prompt_token_ids) AS prompt_len", f"    {PROMPT_LEN}"
).replace("FROM llm_calls c\n", "FROM llm_calls_stored c\n")
TRAJECTORY_SUMMARY = _RL_LOOP.TRAJECTORY_SUMMARY.replace(
    "    FROM llm_calls\n", "    FROM llm_calls_stored\n"
)
assert "prompt_shared_tokens" in TURNS
assert "llm_calls_stored c" in TURNS
assert "FROM llm_calls_stored\n" in TRAJECTORY_SUMMARY

# The columns of the former table, in its order; the two rebuilt ones are filled in per dialect.
_COLUMNS = (
    "id, trajectory_id, seq, route, model, stream, received_at, upstream_first_byte_at, finished_at, "
    "latency_ms, status_code, outcome, integrity, error, response_id, {request} AS request, "
    "{prompt} AS prompt_token_ids, prompt_tokens, completion_tokens, total_tokens, upstream, drift, "
    "drift_position, token_in_fallback, weight_version, weight_versions"
)

# Each rebuild walks the chain of bases back while something is shared: ``shared`` is how much of
# the call's own value comes from its base, ``cut`` how much of this link's value the calls after it
# use. A link gives the positions [shared, cut) from its own stored rest (and, for prompts, from the
# generated IDs of the choice the next call continued).
_SQLITE_MESSAGES = """(
    WITH RECURSIVE chain(id, base, shared, cut) AS (
        SELECT x.id, x.base_call_id, x.request_shared_messages, 2147483647
        FROM llm_calls_stored x WHERE x.id = c.id
        UNION  -- not ALL: a cycle of bases (a hand-edited database) ends instead of recursing forever
        SELECT p.id, p.base_call_id, p.request_shared_messages, min(chain.cut, chain.shared)
        FROM llm_calls_stored p JOIN chain ON p.id = chain.base WHERE chain.shared > 0
    )
    SELECT json_group_array(json(value)) FROM (
        SELECT chain.shared + m.key AS position, {message} AS value
        FROM chain JOIN llm_calls_stored r ON r.id = chain.id, json_each(r.request_rest, '$.messages') m
        WHERE chain.shared + m.key < chain.cut
        ORDER BY position
    )
)"""
_SQLITE_PROMPT = """(
    WITH RECURSIVE chain(id, base, choice, shared, cut, generated, rest) AS (
        SELECT x.id, x.base_call_id, x.base_choice_index, x.prompt_shared_tokens, 2147483647, NULL,
            json_array_length(x.prompt_rest_ids)
        FROM llm_calls_stored x WHERE x.id = c.id
        UNION  -- not ALL: a cycle of bases (a hand-edited database) ends instead of recursing forever
        SELECT p.id, p.base_call_id, p.base_choice_index, p.prompt_shared_tokens,
            min(chain.cut, chain.shared), chain.choice, json_array_length(p.prompt_rest_ids)
        FROM llm_calls_stored p JOIN chain ON p.id = chain.base WHERE chain.shared > 0
    )
    SELECT json_group_array(value) FROM (
        SELECT position, value FROM (
            SELECT chain.shared + t.key AS position, t.value AS value, chain.cut AS cut
            FROM chain JOIN llm_calls_stored r ON r.id = chain.id, json_each(r.prompt_rest_ids) t
            UNION ALL
            SELECT chain.shared + chain.rest + t.key, t.value, chain.cut
            FROM chain JOIN completions d ON d.call_id = chain.id AND d.choice_index = chain.generated,
            json_each(d.token_ids) t
        ) WHERE position < cut ORDER BY position
    )
)"""
# Each message as JSON: json_each's ``value`` is an SQL value (a string unquoted, true as 1), so it is
# quoted back by its type. (SQLite 3.38's ``->`` would give the stored text, but a file whose view uses
# it cannot be opened at all by an older SQLite, and Ubuntu 22.04's Python has 3.37.) The same JSON,
# except the spelling of a message that is a bare number (1e+20 for 100000000000000000000).
MESSAGE_BY_TYPE = (
    "CASE m.type WHEN 'text' THEN json_quote(m.value) WHEN 'true' THEN 'true' WHEN 'false' THEN 'false' "
    "WHEN 'null' THEN 'null' ELSE m.value END"
)


def sqlite_view(message: str) -> str:
    """The SQLite ``llm_calls`` view, taking each message with ``message``."""
    messages = _SQLITE_MESSAGES.replace("{message}", message)
    return (
        "CREATE VIEW llm_calls AS SELECT "
        + _COLUMNS.format(
            request="CASE WHEN c.request_shared_messages = 0 THEN c.request_rest "
            f"ELSE json_set(c.request_rest, '$.messages', json({messages})) END",
            prompt=f"CASE WHEN c.prompt_shared_tokens = 0 THEN c.prompt_rest_ids ELSE {_SQLITE_PROMPT} END",
        ).replace("id, trajectory_id,", "c.id, trajectory_id,", 1)
        + " FROM llm_calls_stored c"
    )


_POSTGRES_MESSAGES = """(
    WITH RECURSIVE chain(id, base, shared, cut) AS (
        SELECT x.id, x.base_call_id, x.request_shared_messages, 2147483647
        FROM llm_calls_stored x WHERE x.id = c.id
        UNION  -- not ALL: a cycle of bases (a hand-edited database) ends instead of recursing forever
        SELECT p.id, p.base_call_id, p.request_shared_messages, least(chain.cut, chain.shared)
        FROM llm_calls_stored p JOIN chain ON p.id = chain.base WHERE chain.shared > 0
    )
    SELECT json_agg(m.value ORDER BY chain.shared + m.n)
    FROM chain JOIN llm_calls_stored r ON r.id = chain.id,
        json_array_elements(r.request_rest -> 'messages') WITH ORDINALITY m(value, n)
    WHERE chain.shared + m.n - 1 < chain.cut
)"""
# The request keeps its keys in their order (json, not jsonb): only ``messages`` is replaced.
_POSTGRES_REQUEST = f"""(
    SELECT json_object_agg(e.key, CASE WHEN e.key = 'messages' THEN {_POSTGRES_MESSAGES} ELSE e.value END
        ORDER BY e.n)
    FROM json_each(c.request_rest) WITH ORDINALITY e(key, value, n)
)"""
_POSTGRES_PROMPT = """(
    WITH RECURSIVE chain(id, base, choice, shared, cut, generated, rest) AS (
        SELECT x.id, x.base_call_id, x.base_choice_index, x.prompt_shared_tokens, 2147483647, NULL::integer,
            json_array_length(x.prompt_rest_ids)
        FROM llm_calls_stored x WHERE x.id = c.id
        UNION  -- not ALL: a cycle of bases (a hand-edited database) ends instead of recursing forever
        SELECT p.id, p.base_call_id, p.base_choice_index, p.prompt_shared_tokens,
            least(chain.cut, chain.shared), chain.choice, json_array_length(p.prompt_rest_ids)
        FROM llm_calls_stored p JOIN chain ON p.id = chain.base WHERE chain.shared > 0
    )
    SELECT json_agg(value ORDER BY position) FROM (
        SELECT chain.shared + t.n - 1 AS position, t.value AS value, chain.cut AS cut
        FROM chain JOIN llm_calls_stored r ON r.id = chain.id,
            json_array_elements(r.prompt_rest_ids) WITH ORDINALITY t(value, n)
        UNION ALL
        SELECT chain.shared + chain.rest + t.n - 1, t.value, chain.cut
        FROM chain JOIN completions d ON d.call_id = chain.id AND d.choice_index = chain.generated,
            json_array_elements(d.token_ids) WITH ORDINALITY t(value, n)
    ) pieces WHERE position < cut
)"""
POSTGRES_VIEW = (
    "CREATE VIEW llm_calls AS SELECT "
    + _COLUMNS.format(
        request="CASE WHEN c.request_shared_messages = 0 THEN c.request_rest "
        "ELSE tokentrail_request(c.id) END",
        prompt=f"CASE WHEN c.prompt_shared_tokens = 0 THEN c.prompt_rest_ids ELSE {_POSTGRES_PROMPT} END",
    ).replace("id, trajectory_id,", "c.id, trajectory_id,", 1)
    + " FROM llm_calls_stored c"
)


# PostgreSQL's JSON functions refuse a request holding a NUL character (\u0000, in a tool result
# that printed a binary file): the function gives NULL for that row rather than failing the query.
POSTGRES_REQUEST_FUNCTION = f"""
CREATE FUNCTION tokentrail_request(call_id varchar) RETURNS json LANGUAGE plpgsql STABLE AS $fn$
BEGIN
    RETURN (SELECT {_POSTGRES_REQUEST} FROM llm_calls_stored c WHERE c.id = call_id);
EXCEPTION WHEN untranslatable_character THEN
    RETURN NULL;
END
$fn$"""


def _view() -> str:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(POSTGRES_REQUEST_FUNCTION)
        return POSTGRES_VIEW
    return sqlite_view(MESSAGE_BY_TYPE)


def _json(value: Any) -> Any:
    """A JSON column's value as read with plain SQL (SQLite gives text, psycopg parsed values)."""
    return jsonio.loads(value) if isinstance(value, str | bytes) else value


def _trajectories(connection: sa.Connection, *, several_calls: bool = False) -> list[str]:
    having = " GROUP BY trajectory_id HAVING count(*) > 1" if several_calls else ""
    query = f"SELECT {'' if several_calls else 'DISTINCT '}trajectory_id FROM llm_calls_stored{having}"
    return [t for (t,) in connection.execute(sa.text(query))]


def _calls(connection: sa.Connection, trajectory_id: str) -> list[dict[str, Any]]:
    rows = connection.execute(
        sa.text(
            "SELECT id, seq, outcome, base_call_id, base_choice_index, prompt_shared_tokens, "
            "prompt_rest_ids, request_shared_messages, request_rest FROM llm_calls_stored "
            "WHERE trajectory_id = :t ORDER BY seq"
        ),
        {"t": trajectory_id},
    ).mappings()
    calls = [dict(row) for row in rows]
    for call in calls:
        call["prompt_rest_ids"] = _json(call["prompt_rest_ids"])
        call["request_rest"] = _json(call["request_rest"])
        call["choices"] = []
    by_id = {call["id"]: call for call in calls}
    if by_id:
        choices = connection.execute(
            sa.text(
                "SELECT d.call_id, d.choice_index, d.token_ids FROM completions d "
                "JOIN llm_calls_stored c ON c.id = d.call_id WHERE c.trajectory_id = :t "
                "ORDER BY d.call_id, d.choice_index"
            ),
            {"t": trajectory_id},
        )
        for call_id, choice_index, token_ids in choices:
            by_id[call_id]["choices"].append((choice_index, _json(token_ids) or []))
    return calls


_UPDATE = sa.text(
    "UPDATE llm_calls_stored SET base_call_id = :base_call_id, base_choice_index = :base_choice_index, "
    "prompt_shared_tokens = :prompt_shared_tokens, prompt_rest_ids = :prompt_rest_ids, "
    "request_shared_messages = :request_shared_messages, request_rest = :request_rest WHERE id = :id"
)


def _update(connection: sa.Connection, rows: list[dict[str, Any]]) -> None:
    for row in rows:  # NULL for a missing value, as the writer stores it
        for name in ("prompt_rest_ids", "request_rest"):
            row[name] = None if row[name] is None else jsonio.dumps_text(row[name])
    if rows:
        connection.execute(_UPDATE, rows)


def _store_against_bases(connection: sa.Connection) -> None:
    """Every call (stored whole) in the stored form, with the writer's rule and candidates; only the
    calls stored against a base are rewritten. JSON ``null`` becomes SQL NULL, as the writer stores it."""
    for column in ("prompt_rest_ids", "request_rest"):
        is_null = (
            f"json_typeof({column}) = 'null'"
            if connection.dialect.name == "postgresql"
            else f"{column} = 'null'"
        )
        connection.execute(sa.text(f"UPDATE llm_calls_stored SET {column} = NULL WHERE {is_null}"))
    for trajectory_id in _trajectories(connection, several_calls=True):
        candidates: deque[PastCall] = deque(maxlen=CALLS_PER_TRAJECTORY)
        rows = []
        for call in _calls(connection, trajectory_id):
            prompt, request = call["prompt_rest_ids"], call["request_rest"]
            form = split(prompt, request, candidates)
            if form.base_call_id is not None:
                rows.append({"id": call["id"], **_form_row(form)})
            picked = [PastChoice(i, ids, {}) for i, ids in call["choices"] if ids]
            if call["outcome"] == "ok" and isinstance(prompt, list) and isinstance(request, dict) and picked:
                candidates.append(PastCall(call["id"], "", request, prompt, tuple(picked)))
        _update(connection, rows)


def _form_row(form: StoredForm) -> dict[str, Any]:
    return {
        "base_call_id": form.base_call_id,
        "base_choice_index": form.base_choice_index,
        "prompt_shared_tokens": form.prompt_shared_tokens,
        "prompt_rest_ids": form.prompt_rest_ids,
        "request_shared_messages": form.request_shared_messages,
        "request_rest": form.request_rest,
    }


def _store_whole(connection: sa.Connection) -> None:
    for trajectory_id in _trajectories(connection):
        calls = _calls(connection, trajectory_id)
        generated = {(c["id"], i): ids for c in calls for i, ids in c["choices"]}
        full = rebuild([stored_call(c) for c in calls], generated)
        rows = [
            {"id": i, **_form_row(StoredForm(None, None, 0, f.prompt_token_ids, 0, f.request))}
            for i, f in full.items()
        ]
        _update(connection, rows)


def upgrade() -> None:
    connection = op.get_bind()
    op.execute("DROP VIEW trajectory_summary")
    op.execute("DROP VIEW turns")
    op.rename_table("llm_calls", "llm_calls_stored")
    op.execute("ALTER TABLE llm_calls_stored RENAME COLUMN request TO request_rest")
    op.execute("ALTER TABLE llm_calls_stored RENAME COLUMN prompt_token_ids TO prompt_rest_ids")
    op.add_column("llm_calls_stored", sa.Column("base_call_id", sa.String(length=32), nullable=True))
    op.add_column("llm_calls_stored", sa.Column("base_choice_index", sa.Integer(), nullable=True))
    op.add_column(
        "llm_calls_stored",
        sa.Column("prompt_shared_tokens", sa.Integer(), nullable=False, server_default="0"),
    )
    op.add_column(
        "llm_calls_stored",
        sa.Column("request_shared_messages", sa.Integer(), nullable=False, server_default="0"),
    )
    _store_against_bases(connection)
    op.execute(_view())
    op.execute(TURNS)
    op.execute(TRAJECTORY_SUMMARY)


def downgrade() -> None:
    connection = op.get_bind()
    op.execute("DROP VIEW trajectory_summary")
    op.execute("DROP VIEW turns")
    op.execute("DROP VIEW llm_calls")
    if connection.dialect.name == "postgresql":
        op.execute("DROP FUNCTION tokentrail_request(varchar)")
    _store_whole(connection)
    for column in ("request_shared_messages", "prompt_shared_tokens", "base_choice_index", "base_call_id"):
        op.execute(f"ALTER TABLE llm_calls_stored DROP COLUMN {column}")
    op.execute("ALTER TABLE llm_calls_stored RENAME COLUMN prompt_rest_ids TO prompt_token_ids")
    op.execute("ALTER TABLE llm_calls_stored RENAME COLUMN request_rest TO request")
    op.rename_table("llm_calls_stored", "llm_calls")
    op.execute(_RL_LOOP.TURNS)
    op.execute(_RL_LOOP.TRAJECTORY_SUMMARY)
