"""One trajectory, two processes on one database (two replicas, or two ``--workers``): what each knows
of the trajectory is never guessed, and no call is recorded as token-in unless its prompt is exact.

Two proxies (A and B) share a SQLite file and a fake vLLM with ``/tokenize`` (``TokenInFake``). The
test holds the database's write lock to keep B's record from being committed, as a lagging writer
would (lock contention between workers, a retry's backoff).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine

from tests.conftest import Proxy, running_proxy
from tests.servers import serve_in_thread
from tests.test_token_in import USER, TokenInFake
from tokentrail.proxy.storage.migrate import upgrade_database

CHAT = "/v1/chat/completions"
REPLY = {"role": "assistant", "content": "ok"}  # what TokenInFake answers, sent back by the client
GENERATED = [300, 301]  # the IDs TokenInFake "samples"
TAIL = [2]  # its template's end of turn
NEW_TURN = [50, 7]  # one user message and the generation prompt, as it renders them


@contextmanager
def _two_proxies(tmp_path: Path, **a_settings: Any) -> Iterator[tuple[TokenInFake, Proxy, Proxy, str]]:
    fake = TokenInFake()
    db_url = f"sqlite:///{tmp_path / 'shared.db'}"
    upgrade_database(db_url)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        serve_in_thread(fake) as url,
        running_proxy(url, tmp_path / "a", db_url=db_url, token_in=True, **a_settings) as a,
        running_proxy(url, tmp_path / "b", db_url=db_url, token_in=True, db_busy_timeout_ms=60_000) as b,
    ):
        yield fake, a, b, db_url


def _post(
    proxy: Proxy,
    messages: list[Any],
    statuses: list[int] | None = None,
    headers: dict[str, str] | None = None,
) -> int:
    response = httpx.post(
        proxy.url + CHAT,
        json={"model": "m", "messages": messages},
        headers={"X-Trajectory-Id": "shared", **(headers or {})},
        timeout=60,
    )
    if statuses is not None:
        statuses.append(response.status_code)
    return response.status_code


@contextmanager
def _write_lock(db_url: str) -> Iterator[Any]:
    """Hold SQLite's write lock (readers go on): a writer that commits nothing until released."""
    engine = create_engine(db_url)
    connection = engine.connect()
    connection.exec_driver_sql("BEGIN IMMEDIATE")
    try:
        yield connection
    finally:
        connection.rollback()
        connection.close()
        engine.dispose()


def _until(condition: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _recorded(proxy: Proxy, calls: int) -> list[dict[str, Any]]:
    _until(
        lambda: len(proxy.rows("SELECT id FROM llm_calls")) >= calls, f"{calls} calls were not all recorded"
    )
    return proxy.rows("SELECT seq, drift, token_in_fallback, request FROM llm_calls ORDER BY seq")


def test_a_call_whose_previous_turn_another_process_has_not_yet_written_waits_for_it(
    tmp_path: Path,
) -> None:
    """Turn 3 reaches A, which relayed turn 1; B relayed turn 2 and its writer lags. Built on turn 1,
    turn 2's reply would be re-rendered from text and still called exact: A waits for turn 2."""
    with _two_proxies(tmp_path) as (fake, a, b, db_url):
        assert _post(a, [USER]) == 200
        _recorded(a, 1)
        second = [USER, REPLY, USER]
        third = [*second, REPLY, USER]
        statuses: list[int] = []
        with _write_lock(db_url):
            assert _post(b, second) == 200  # answered; its record waits for the lock
            caller = threading.Thread(target=_post, args=(a, third, statuses))
            caller.start()
            _until(lambda: a.runtime.relay.in_flight.count == 1, "turn 3 never reached A")
            assert len(fake.chats) == 2, "turn 3 went out before turn 2 was recorded"
        caller.join(30)
        assert statuses == [200]
        second_prompt = fake.chats[1]["kv_transfer_params"]["prompt_token_ids"]
        assert fake.chats[2]["kv_transfer_params"]["prompt_token_ids"] == [
            *second_prompt,
            *GENERATED,
            *TAIL,
            *NEW_TURN,
        ]
        rows = _recorded(a, 3)
    assert [(r["drift"], r["token_in_fallback"]) for r in rows] == [
        ("first", "first_call"),
        ("token_in", None),
        ("token_in", None),
    ]


def test_a_call_whose_previous_turn_is_never_written_in_time_falls_back_with_a_reason(
    tmp_path: Path,
) -> None:
    with _two_proxies(tmp_path, token_in_wait_s=0.3) as (fake, a, b, db_url):
        assert _post(a, [USER]) == 200
        _recorded(a, 1)
        second = [USER, REPLY, USER]
        with _write_lock(db_url):
            assert _post(b, second) == 200
            assert _post(a, [*second, REPLY, USER]) == 200  # waited 0.3 s for turn 2, in vain
        assert "kv_transfer_params" not in fake.chats[2]  # sent as the client wrote it
        rows = _recorded(a, 3)
    by_turn = sorted(rows, key=lambda r: len(json.loads(r["request"])["messages"]))
    # (across processes seq is write order: B's turn 2, held back, is written after A's turn 3)
    assert [r["token_in_fallback"] for r in by_turn] == ["first_call", None, "reply_not_recorded"]


def test_a_turn_another_process_relayed_with_a_new_history_is_continued_from_the_database(
    tmp_path: Path,
) -> None:
    """B relayed a turn with a compacted history (another system prompt); A knows only the turn
    before it, which the next call no longer continues: A reads the trajectory again."""
    with _two_proxies(tmp_path) as (fake, a, b, _db_url):
        assert _post(a, [USER]) == 200
        _recorded(a, 1)
        compacted = [{"role": "system", "content": "Summary so far."}, USER]
        assert _post(b, compacted) == 200
        _recorded(a, 2)
        assert _post(a, [*compacted, REPLY, USER]) == 200
        second_prompt = fake.chats[1].get("kv_transfer_params", {}).get("prompt_token_ids") or [50, 50, 7]
        assert fake.chats[2]["kv_transfer_params"]["prompt_token_ids"] == [
            *second_prompt,
            *GENERATED,
            *TAIL,
            *NEW_TURN,
        ]
        rows = _recorded(a, 3)
    assert [(r["drift"], r["token_in_fallback"]) for r in rows] == [
        ("first", "first_call"),
        ("edited", "system_changed"),
        ("token_in", None),
    ]


@pytest.mark.parametrize("writer", ["A", "B"])
def test_the_writer_judges_a_call_against_what_the_database_holds_not_its_cache(
    tmp_path: Path, writer: str
) -> None:
    """A's writer remembers turn 1; B wrote turn 2, with a compacted history. Turn 3 (token-in off, so
    the writer alone judges it) continues turn 2: judged against A's cache alone it looked edited."""
    plain = {"X-TokenTrail-Token-In": "false"}
    with _two_proxies(tmp_path) as (_fake, a, b, _db_url):
        assert _post(a, [USER]) == 200
        _recorded(a, 1)
        compacted = [{"role": "system", "content": "Summary so far."}, USER]
        assert _post(b, compacted) == 200
        _recorded(a, 2)
        third_by = a if writer == "A" else b
        assert _post(third_by, [*compacted, REPLY, USER], headers=plain) == 200
        rows = _recorded(a, 3)
        judged = a.rows("SELECT drift, drift_position FROM llm_calls WHERE seq = 2")
    assert [r["drift"] for r in rows] == ["first", "edited", "template"]
    assert judged == [{"drift": "template", "drift_position": 2}]  # the fake re-renders turn 2's IDs


def test_an_edited_reply_of_a_call_this_process_relayed_falls_back_at_once(tmp_path: Path) -> None:
    """The client edited the last reply (reasoning stripped, text normalised): that reply is a known
    call's, so nothing is on its way and the call falls back at once, not after the wait bound."""
    with _two_proxies(tmp_path, token_in_wait_s=60) as (fake, a, _b, _db_url):
        second = [USER, REPLY, USER]
        assert _post(a, [USER]) == 200
        assert _post(a, second) == 200
        _recorded(a, 2)
        edited = {"role": "assistant", "content": "ok, edited"}
        assert _post(a, [*second, edited, USER]) == 200  # would wait a minute for an unknown reply
        assert "kv_transfer_params" not in fake.chats[2]
        rows = _recorded(a, 3)
    assert [r["token_in_fallback"] for r in rows] == ["first_call", None, "reply_edited"]
