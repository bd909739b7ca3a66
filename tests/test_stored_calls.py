"""Calls stored against earlier calls of their trajectory (linear space), read back whole.

The stored form must never show: the ``llm_calls`` view (SQLite and PostgreSQL), the read API and the
export give every call's full prompt IDs and request, equal to what the upstream was sent, and the
migration converts a database written stored-whole (and back) without changing what is read.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, text

from tests.conftest import Proxy, running_proxy
from tests.conversations import record_conversation
from tests.fake_upstream import FakeUpstream, render_prompt
from tests.token_in_helpers import converse
from tokentrail.proxy.recording.stored_form import split
from tokentrail.proxy.storage.migrate import alembic_config
from tokentrail.proxy.storage.stored_calls import (
    StoredCall,
    StoredForm,
    StoredFormError,
    rebuild,
)
from tokentrail.proxy.trajectory.continuation import PastCall, PastChoice

CHAT = "/v1/chat/completions"


# ---- the rule itself: whatever the calls, what is rebuilt is what was stored ----

_ids = st.lists(st.integers(0, 40), max_size=30)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "tool"]), "content": st.text("ab", max_size=3)}
)


@st.composite
def _trajectory(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Calls that mostly continue an earlier call (prompt + a choice's IDs, then drift, then more)."""
    calls: list[dict[str, Any]] = []
    for i in range(draw(st.integers(1, 8))):
        prompt: list[int] | None = draw(_ids)
        messages = draw(st.lists(_message, max_size=3))
        if calls and draw(st.booleans()):
            base = draw(st.sampled_from(calls))
            choices = base["choices"] or [[]]
            before = (base["prompt"] or []) + draw(st.sampled_from(choices))
            cut = draw(st.integers(0, len(before)))
            prompt = before[:cut] + draw(_ids)
            kept = draw(st.integers(0, len(base["messages"])))
            messages = base["messages"][:kept] + messages
        if draw(st.integers(0, 9)) == 0:
            prompt = None
        if messages and draw(st.integers(0, 9)) == 0:  # the same value in another key order
            messages[0] = dict(reversed(list(messages[0].items())))
        request: dict[str, Any] | None = {"model": "m", "messages": messages, "n": 2}
        if draw(st.integers(0, 9)) == 0:
            request = None
        choices = draw(st.lists(_ids, max_size=2))
        calls.append(
            {"id": f"c{i}", "prompt": prompt, "messages": messages, "request": request, "choices": choices}
        )
    return calls


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(_trajectory())
def test_what_is_rebuilt_is_what_came_in_whatever_is_shared(calls: list[dict[str, Any]]) -> None:
    candidates: deque[PastCall] = deque(maxlen=4)
    stored, generated = [], {}
    for call in calls:
        form = split(call["prompt"], call["request"], candidates)
        stored.append(StoredCall(call["id"], form))
        if form.base_call_id is not None:
            assert form.base_call_id in {c.call_id for c in candidates}
        for index, ids in enumerate(call["choices"]):
            generated[(call["id"], index)] = ids
        picked = tuple(PastChoice(i, ids, {}) for i, ids in enumerate(call["choices"]) if ids)
        if call["prompt"] is not None and call["request"] is not None and picked:
            candidates.append(PastCall(call["id"], CHAT, call["request"], call["prompt"], picked))
    full = rebuild(stored, generated)
    latest = rebuild(stored, generated, [calls[-1]["id"]])  # only the wanted call is built
    assert list(latest) == [calls[-1]["id"]]
    assert latest[calls[-1]["id"]] == full[calls[-1]["id"]]
    for call in calls:
        assert full[call["id"]].prompt_token_ids == call["prompt"]
        assert json.dumps(full[call["id"]].request) == json.dumps(call["request"])  # key order too


# ---- through the proxy, the view and the API, on SQLite and PostgreSQL ----


@pytest.fixture
def proxy_on_db(fake: tuple[FakeUpstream, str], tmp_path: Path, db_url: str) -> Iterator[Proxy]:
    with running_proxy(fake[1], tmp_path, db_url=db_url) as proxy:
        yield proxy


def _record(
    proxy: Proxy, fake: FakeUpstream, trajectory_id: str, texts: list[str], **options: Any
) -> list[Any]:
    """Record one conversation; returns the bodies the upstream was sent for it, in order."""
    before = len(fake.requests)
    record_conversation(proxy.url, trajectory_id, texts, max_tokens=8, **options)
    return [json.loads(r["body"]) for r in fake.requests[before:] if r["path"] == CHAT]


def _view(proxy: Proxy, trajectory_id: str) -> list[dict[str, Any]]:
    rows = proxy.rows(
        "SELECT id, seq, outcome, request, prompt_token_ids, prompt_tokens FROM llm_calls "
        "WHERE trajectory_id = :t ORDER BY seq",
        t=trajectory_id,
    )
    for row in rows:
        for name in ("request", "prompt_token_ids"):
            if isinstance(row[name], str):
                row[name] = json.loads(row[name])
    return rows


def test_a_long_conversation_is_stored_once_and_read_back_whole(
    proxy_on_db: Proxy, fake: tuple[FakeUpstream, str]
) -> None:
    proxy = proxy_on_db
    texts = [f"turn {i}: " + "what next? " * 20 for i in range(24)]
    sent = {
        "long": _record(proxy, fake[0], "long", texts),
        "edited": _record(proxy, fake[0], "edited", texts[:6], break_at=3),
        "failing": _record(proxy, fake[0], "failing", texts[:6], fail_at=2),
    }
    proxy.wait_all_records()
    for trajectory_id, bodies in sent.items():
        view = _view(proxy, trajectory_id)
        api = httpx.get(f"{proxy.url}/tokentrail/v1/trajectories/{trajectory_id}").json()["calls"]
        assert len(view) == len(api) == len(bodies)
        for row, call, body in zip(view, api, bodies, strict=True):
            assert row["prompt_token_ids"] == call["prompt_token_ids"]
            assert row["request"] == call["request"]
            assert row["request"]["messages"] == body["messages"]
            if row["outcome"] == "ok":
                assert row["prompt_token_ids"] == render_prompt(body)  # what the upstream reported
            else:
                assert row["prompt_token_ids"] is None

    # Linear: the long conversation stores each prompt token once (what a call adds), not per turn.
    stored = proxy.rows(
        "SELECT s.seq, s.prompt_shared_tokens, json_array_length(s.prompt_rest_ids) AS rest, "
        "json_array_length(d.token_ids) AS generated FROM llm_calls_stored s "
        "JOIN completions d ON d.call_id = s.id WHERE s.trajectory_id = 'long' ORDER BY s.seq"
    )
    last_prompt = stored[-1]["prompt_shared_tokens"] + stored[-1]["rest"]
    assert sum(r["rest"] for r in stored) + sum(r["generated"] for r in stored[:-1]) == last_prompt
    assert all(r["prompt_shared_tokens"] > 0 for r in stored[1:])
    messages = proxy.rows(
        "SELECT request_shared_messages AS shared FROM llm_calls_stored "
        "WHERE trajectory_id = 'long' ORDER BY seq"
    )
    assert [m["shared"] for m in messages] == [0] + [2 * i for i in range(1, len(messages))]
    # The edited conversation breaks where the history changed, and is still read back whole above.
    edited = proxy.rows(
        "SELECT seq, prompt_shared_tokens, drift FROM llm_calls_stored "
        "WHERE trajectory_id = 'edited' ORDER BY seq"
    )
    assert edited[3]["drift"] == "edited"
    assert 0 < edited[3]["prompt_shared_tokens"] < edited[2]["prompt_shared_tokens"]


def test_the_export_and_turns_read_the_full_prompts(proxy_on_db: Proxy, tmp_path: Path) -> None:
    proxy = proxy_on_db
    record_conversation(proxy.url, "exported", [f"question {i}" for i in range(6)], max_tokens=5)
    proxy.wait_all_records()
    turns = proxy.rows("SELECT seq, prompt_len FROM turns WHERE trajectory_id = 'exported' ORDER BY seq")
    view = _view(proxy, "exported")
    assert [t["prompt_len"] for t in turns] == [len(v["prompt_token_ids"]) for v in view]
    sequences = httpx.get(f"{proxy.url}/tokentrail/v1/trajectories/exported/sequences").json()["sequences"]
    (sequence,) = sequences
    last = view[-1]["prompt_token_ids"]
    assert sequence["input_ids"][: len(last)] == last


# ---- the migration, on a database written stored-whole ----


def _snapshot(db_url: str) -> list[tuple[Any, ...]]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT trajectory_id, id, request, prompt_token_ids FROM llm_calls "
                    "ORDER BY trajectory_id, seq"
                )
            ).all()
    finally:
        engine.dispose()
    return [(t, i, _parsed(r), _parsed(p)) for t, i, r, p in rows]


def _parsed(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _insert_old_call(
    connection: Any, call_id: str, seq: int, outcome: str, request: Any, prompt: str
) -> None:
    connection.execute(
        text(
            "INSERT INTO llm_calls (id, trajectory_id, seq, route, stream, received_at, outcome, integrity, "
            "request, prompt_token_ids) VALUES (:id, 'old', :seq, :route, false, '2026-12-01 00:00:00', "
            ":outcome, 'ok', :request, :prompt)"
        ),
        {
            "id": call_id,
            "seq": seq,
            "route": CHAT,
            "outcome": outcome,
            "request": json.dumps(request),
            "prompt": prompt,
        },
    )


def test_the_migration_converts_a_database_stored_whole_and_back(
    fake: tuple[FakeUpstream, str], tmp_path: Path, db_url: str
) -> None:
    with running_proxy(fake[1], tmp_path, db_url=db_url) as proxy:
        record_conversation(proxy.url, "recorded", [f"step {i} " * 8 for i in range(10)], max_tokens=6)
        record_conversation(proxy.url, "branchy", [f"step {i}" for i in range(5)], max_tokens=6, break_at=2)
        proxy.wait_all_records()
    recorded = _snapshot(db_url)
    config = alembic_config(db_url)
    command.downgrade(config, "0005_rl_loop")
    assert _snapshot(db_url) == recorded  # the table again, every call whole

    # Rows as the 0005 writer wrote them: JSON null for a missing prompt, two choices, the second continued.
    engine = create_engine(db_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO trajectories (id, created_at, updated_at) "
                "VALUES ('old', '2026-12-01', '2026-12-01')"
            )
        )
        first = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2}
        _insert_old_call(connection, "o1", 0, "ok", first, "[1,2,3]")
        for index, ids in ((0, "[7,8]"), (1, "[9,10,11]")):
            connection.execute(
                text("INSERT INTO completions (call_id, choice_index, token_ids) VALUES ('o1', :i, :t)"),
                {"i": index, "t": ids},
            )
        second = {"model": "m", "messages": [*first["messages"], {"role": "assistant", "content": "b"}]}
        _insert_old_call(connection, "o2", 1, "upstream_error", second, "null")
        _insert_old_call(connection, "o3", 2, "ok", second, "[1,2,3,9,10,12]")
    engine.dispose()
    whole = _snapshot(db_url)
    command.upgrade(config, "head")
    assert _snapshot(db_url) == whole
    with running_proxy(fake[1], tmp_path, db_url=db_url) as proxy:
        old = proxy.rows(
            "SELECT id, base_call_id, base_choice_index, prompt_shared_tokens, request_shared_messages "
            "FROM llm_calls_stored WHERE trajectory_id = 'old' ORDER BY seq"
        )
        assert old[2] == {
            "id": "o3",
            "base_call_id": "o1",
            "base_choice_index": 1,
            "prompt_shared_tokens": 5,
            "request_shared_messages": 1,
        }
        api = httpx.get(f"{proxy.url}/tokentrail/v1/trajectories/old").json()["calls"]
        assert [c["prompt_token_ids"] for c in api] == [[1, 2, 3], None, [1, 2, 3, 9, 10, 12]]
        assert api[2]["request"] == second
        stored = proxy.rows(
            "SELECT sum(json_array_length(prompt_rest_ids)) AS n FROM llm_calls_stored "
            "WHERE trajectory_id = 'recorded'"
        )
        last_prompt = [p for t, _, _, p in recorded if t == "recorded"][-1]
        assert stored[0]["n"] < len(last_prompt)  # each token once (whole, they were 10 prompts)


# ---- on the real vLLM: default mode re-encodes the history, and the stored form is still exact ----


@pytest.mark.vllm
@pytest.mark.parametrize("stream", [False, True])
def test_on_vllm_every_prompt_reads_back_as_vllm_reported_it_and_is_stored_once(
    vllm_proxy: Proxy, stream: bool
) -> None:
    proxy = vllm_proxy
    with httpx.Client(timeout=120) as client:
        conversation = converse(
            client,
            proxy.url,
            "vllm-linear",
            turns=8,
            stream=stream,
            max_tokens=24,
            extra_body={"ignore_eos": True},
        )
    proxy.wait_all_records()
    view = _view(proxy, "vllm-linear")
    assert [row["prompt_token_ids"] for row in view] == [turn.prompt_ids for turn in conversation.turns]
    stored = proxy.rows(
        "SELECT prompt_shared_tokens AS shared, json_array_length(prompt_rest_ids) AS rest, drift, "
        "drift_position FROM llm_calls_stored WHERE trajectory_id = 'vllm-linear' ORDER BY seq"
    )
    for row, previous, turn in zip(stored[1:], conversation.turns, conversation.turns[1:], strict=False):
        # shared up to where the re-encoded history first differs (or all of it), then only the rest
        assert row["shared"] == (
            row["drift_position"] or len(previous.prompt_ids) + len(previous.generated_ids[0])
        )
        assert row["shared"] + row["rest"] == len(turn.prompt_ids)
        assert row["shared"] > len(previous.prompt_ids)


def test_db_vacuum_gives_the_converted_rows_space_back(
    fake: tuple[FakeUpstream, str], tmp_path: Path, db_url: str
) -> None:
    with running_proxy(fake[1], tmp_path, db_url=db_url) as proxy:
        _record(proxy, fake[0], "vacuumed", [f"step {i} " * 60 for i in range(24)])
        proxy.wait_all_records()
    config = alembic_config(db_url)
    command.downgrade(config, "0005_rl_loop")  # stored whole, as an older TokenTrail did
    upgraded = subprocess.run(
        [sys.executable, "-m", "tokentrail.proxy.cli", "db", "upgrade", "--db", db_url],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "tokentrail db vacuum" in upgraded.stdout
    vacuumed = subprocess.run(
        [sys.executable, "-m", "tokentrail.proxy.cli", "db", "vacuum", "--db", db_url],
        capture_output=True,
        text=True,
        check=True,
    )
    before, after = (float(n) for n in re.findall(r"([0-9.]+) MB", vacuumed.stdout))
    assert after < before, vacuumed.stdout


def test_odd_messages_read_back_through_the_view(proxy_on_db: Proxy) -> None:
    """Messages that are not objects, and a NUL character (a tool that printed a binary file)."""
    proxy = proxy_on_db
    headers = {"X-Trajectory-Id": "odd", "x-fake": "render"}
    first = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    answer = httpx.post(proxy.url + CHAT, json=first, headers=headers, timeout=30)
    reply = {"role": "assistant", "content": answer.json()["choices"][0]["message"]["content"]}
    plain = {**first, "messages": [*first["messages"], reply, {"role": "user", "content": 'say "é"\n'}]}
    odd = {**first, "messages": [*plain["messages"], "oops", True, None, 1.5, -2, [1, {"a": "b"}]]}
    nul = {**first, "messages": [*plain["messages"], {"role": "tool", "content": "ELF\u0000\u0001"}]}
    for body in (plain, odd, nul):
        httpx.post(proxy.url + CHAT, json=body, headers=headers, timeout=30)  # odd: the fake fails it
    proxy.wait_all_records()
    view = _view(proxy, "odd")
    assert [row["request"]["messages"] if row["request"] else None for row in view[:3]] == [
        first["messages"],
        plain["messages"],
        odd["messages"],
    ]
    shared = proxy.rows(
        "SELECT request_shared_messages AS n FROM llm_calls_stored WHERE trajectory_id = 'odd'"
    )
    assert [row["n"] for row in shared] == [0, 1, 3, 3]
    postgres = proxy.db_url.startswith("postgresql")
    # PostgreSQL's JSON functions refuse \u0000: that row reads NULL there (the API has it whole)
    assert view[3]["request"] == (None if postgres else nul)
    api = httpx.get(f"{proxy.url}/tokentrail/v1/trajectories/odd").json()["calls"]
    assert [call["request"]["messages"] for call in api] == [b["messages"] for b in (first, plain, odd, nul)]
    assert proxy.rows("SELECT count(*) AS n FROM llm_calls WHERE request IS NOT NULL") == [
        {"n": 4 - postgres}
    ]


def test_a_broken_chain_of_bases_raises_rather_than_loops() -> None:
    """Only a hand-edited database can hold these; reading them must end with a clear error."""
    looped = StoredCall("a", StoredForm("a", 0, 2, [1], 0, None))
    missing = StoredCall("b", StoredForm("gone", 0, 2, [1], 0, None))
    for call in (looped, missing):
        with pytest.raises(StoredFormError):
            rebuild([call], {("a", 0): [5, 6]})
