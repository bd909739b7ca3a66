"""``seq`` in arrival order across replicas without sticky routing (issue 23, finding 3).

Two ``tokentrail serve`` replicas on one PostgreSQL: A records through its recorder process, which the
test stops (SIGSTOP: the writer that is behind), B through its writer thread. A trajectory's first turn
goes to A, its second, sent the moment the first was answered, to B. Token-in is off, so nothing but
the writer orders the two. B's writer holds the second turn's record until the first is written, so
``seq`` follows arrival; one that waits past ``TOKENTRAIL_ORDER_WAIT_S`` is written and says so.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, text

from tests.postgres import create_database
from tests.servers import serve_in_thread
from tests.test_metrics import by_label, db_rows, scrape
from tests.test_serve import serve_process
from tests.test_token_in import USER, TokenInFake
from tests.test_workers import FRESH, _workers_seen
from tokentrail.proxy.fleet.replicas import ControlStore
from tokentrail.proxy.recorder.assembly import other_writers
from tokentrail.proxy.recording.order import ReplyOrder
from tokentrail.proxy.recording.records import CallRecord, ChoiceRecord, Integrity, Outcome
from tokentrail.proxy.recording.writer import RecordWriter
from tokentrail.proxy.settings import Settings
from tokentrail.proxy.storage.engine import make_engine
from tokentrail.proxy.storage.migrate import upgrade_database
from tokentrail.proxy.trajectory.drift import DriftJudge

CHAT = "/v1/chat/completions"
REPLY = {"role": "assistant", "content": "ok"}  # what the fake answers
TRAJECTORY = "order-1"
TURN_1 = [USER, REPLY, USER]
TURN_2 = [*TURN_1, REPLY, USER]


@contextmanager
def _two_replicas(db_url: str, **b_env: str) -> Iterator[tuple[str, str, int]]:
    """(A's url, B's url, the pid of A's recorder process)."""
    with serve_in_thread(TokenInFake()) as upstream, ExitStack() as stack:
        common = {"TOKENTRAIL_TOKEN_IN": "false", "TOKENTRAIL_FLEET_CONTROL": "database"}
        a_process, a_url, _ = stack.enter_context(
            serve_process(upstream, db_url, TOKENTRAIL_RECORDER="process", TOKENTRAIL_INSTANCE="a", **common)
        )
        _b_process, b_url, _ = stack.enter_context(
            serve_process(upstream, db_url, TOKENTRAIL_INSTANCE="b", **common, **b_env)
        )
        found = subprocess.run(
            ["pgrep", "-f", f"tokentrail.proxy.recorder.main.*--parent-pid {a_process.pid}"],
            capture_output=True, text=True, check=False,
        ).stdout.split()  # fmt: skip
        assert len(found) == 1, found
        recorder = int(found[0])
        try:
            yield a_url, b_url, recorder
        finally:
            os.kill(recorder, signal.SIGCONT)


def _turn(url: str, messages: list[dict[str, Any]]) -> None:
    response = httpx.post(
        url + CHAT,
        json={"model": "m", "messages": messages},
        headers={"X-Trajectory-Id": TRAJECTORY},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == REPLY["content"]


def _calls(db_url: str) -> list[tuple[int, int]]:
    """(seq, turn) of the trajectory's recorded calls, the turn read from the request."""
    rows = db_rows(
        db_url, f"SELECT seq, request FROM llm_calls WHERE trajectory_id = '{TRAJECTORY}' ORDER BY seq"
    )
    return [
        (seq, (len((json.loads(r) if isinstance(r, str) else r)["messages"]) - 1) // 2) for seq, r in rows
    ]


def _when_all(rows: list[Any], count: int) -> list[Any] | None:
    return rows if len(rows) == count else None


def _until(what: str, done: Any) -> Any:
    deadline = time.monotonic() + 30
    while not (found := done()):
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)
    return found


def _held(url: str) -> float:
    return sum(by_label(scrape(url)[0], "tokentrail_records_held").values())


def _order_waits(url: str) -> dict[tuple[str, ...], float]:
    return by_label(scrape(url)[0], "tokentrail_record_order_waits_total", "how")


def test_a_turn_written_by_another_replica_first_waits_for_the_turn_before_it(postgres_url: str) -> None:
    db_url = create_database(postgres_url)
    upgrade_database(db_url)
    with _two_replicas(db_url, TOKENTRAIL_ORDER_WAIT_S="25") as (a_url, b_url, recorder):
        _turn(a_url, [USER])
        _until("the first turn recorded", lambda: _calls(db_url))
        os.kill(recorder, signal.SIGSTOP)  # A's writer is behind
        _turn(a_url, TURN_1)
        _turn(b_url, TURN_2)  # sent the moment the turn before was answered
        # B's writer has taken the third turn's record: it holds it (or, without the fix, wrote it)
        _until("B holds or wrote the third turn", lambda: _held(b_url) == 1 or len(_calls(db_url)) > 1)
        os.kill(recorder, signal.SIGCONT)
        calls = _until("every turn recorded", lambda: _when_all(_calls(db_url), 3))
        waits = _order_waits(b_url)
    assert calls == [(0, 0), (1, 1), (2, 2)]  # seq is the order the fleet received them
    assert waits == {("waited",): 1.0}


def test_a_turn_whose_earlier_turn_never_comes_in_time_is_written_and_counted_unproven(
    postgres_url: str,
) -> None:
    db_url = create_database(postgres_url)
    upgrade_database(db_url)
    with _two_replicas(db_url, TOKENTRAIL_ORDER_WAIT_S="0.5") as (a_url, b_url, recorder):
        _turn(a_url, [USER])
        _until("the first turn recorded", lambda: _calls(db_url))
        os.kill(recorder, signal.SIGSTOP)
        _turn(a_url, TURN_1)
        _turn(b_url, TURN_2)
        _until("B wrote the third turn after its wait", lambda: len(_calls(db_url)) > 1)
        os.kill(recorder, signal.SIGCONT)
        calls = _until("every turn recorded", lambda: _when_all(_calls(db_url), 3))
        waits = _order_waits(b_url)
        held = _held(b_url)
    assert calls == [(0, 0), (1, 2), (2, 1)]  # the turn before came too late: after, and the record says so
    assert waits == {("unproven",): 1.0}
    assert held == 0


def test_records_wait_only_where_other_writers_share_the_database(engine: Engine, postgres_url: str) -> None:
    sqlite = engine.url.render_as_string()
    assert other_writers(Settings(db=sqlite), engine) is None  # a lone writer has every earlier turn
    assert other_writers(Settings(db=sqlite, workers=2, recorder="process"), engine) is None  # one a host
    assert other_writers(Settings(db=sqlite, workers=2, durable=True), engine) is None  # written first
    assert other_writers(Settings(db=sqlite, workers=2, order_wait_s=0), engine) is None  # told not to
    workers = other_writers(Settings(db=sqlite, workers=2), engine)  # a writer thread per worker
    assert workers is not None
    assert workers()
    db_url = create_database(postgres_url)
    upgrade_database(db_url)
    shared = create_engine(db_url)
    try:
        replicas = other_writers(Settings(db=db_url), shared)
        assert replicas is not None
        store = ControlStore(shared)
        assert not replicas()
        store.report("a", 0, 0, notify=False)
        assert not replicas()  # only itself
        store.report("b", 0, 0, notify=False)
        assert replicas()
    finally:
        shared.dispose()


def test_turns_two_workers_relay_are_numbered_in_the_order_they_arrived(tmp_path: Path) -> None:
    """``serve --workers 2`` with the writer thread per worker: each turn on a fresh connection (the
    kernel spreads them over the workers), sent the moment the last answer came."""
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    trajectories, turns = 8, 5
    with (
        serve_in_thread(TokenInFake()) as upstream,
        serve_process(upstream, db_url, TOKENTRAIL_WORKERS="2", TOKENTRAIL_TOKEN_IN="false") as (
            _p,
            proxy,
            _l,
        ),
    ):
        assert _workers_seen(proxy, {0, 1}) == {0, 1}

        async def conversations() -> None:
            async with httpx.AsyncClient(limits=FRESH, timeout=60) as client:

                async def one(trajectory: int) -> None:
                    messages: list[dict[str, Any]] = [USER]
                    for _turn in range(turns):
                        response = await client.post(
                            proxy + CHAT,
                            json={"model": "m", "messages": messages},
                            headers={"X-Trajectory-Id": f"w-{trajectory}"},
                        )
                        assert response.status_code == 200, response.text
                        messages = [*messages, REPLY, USER]

                await asyncio.gather(*(one(t) for t in range(trajectories)))

        asyncio.run(conversations())
        sql = "SELECT trajectory_id, seq, request FROM llm_calls ORDER BY 1, 2"
        rows = _until("every turn recorded", lambda: _when_all(db_rows(db_url, sql), trajectories * turns))
    for trajectory in range(trajectories):
        mine = [r for r in rows if r[0] == f"w-{trajectory}"]
        assert [(len(json.loads(r[2])["messages"]) - 1) // 2 for r in mine] == list(range(turns))


# ---- the writer's side, two writers on one SQLite file (as two workers' writer threads) ----


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """A migrated SQLite file's engine, as the writers of two workers share it."""
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade_database(db_url)
    made = make_engine(db_url)
    yield made
    made.dispose()


def _order_on_a_clock(engine: Engine, tmp_path: Path, now: list[float]) -> tuple[RecordWriter, ReplyOrder]:
    """A ``ReplyOrder`` with a 10 s bound that always sees other writers, on the test's clock
    (``now[0]``); and the writer (never started) whose ordinals and seq reads it uses."""
    writer = RecordWriter(engine, queue_size=10, batch_size=10, retries=0, fallback_path=tmp_path / "b.jsonl")
    return writer, ReplyOrder(10.0, lambda: True, writer.largest_seqs, clock=lambda: now[0])


def _writer(engine: Any, spool: Path, **order: Any) -> RecordWriter:
    writer = RecordWriter(
        engine, queue_size=100, batch_size=50, retries=0, fallback_path=spool, judge=DriftJudge(), **order
    )
    writer.start()
    return writer


def _turn_record(writer: RecordWriter, trajectory: str, messages: list[Any], reply: str) -> CallRecord:
    """The record of a chat call answered with ``reply``."""
    record = CallRecord(
        call_id=f"{trajectory}-{len(messages)}-{reply}",
        trajectory_id=trajectory,
        route="/v1/chat/completions",
        received_at=time.time(),
        seq=writer.next_ordinal(trajectory),
        request={"model": "m", "messages": messages},
        integrity=Integrity.OK,
        prompt_token_ids=list(range(1, 2 + len(messages))),
        prompt_tokens=1 + len(messages),
        completion_tokens=2,
    )
    answer = {"role": "assistant", "content": reply}
    record.choices = [ChoiceRecord(index=0, token_ids=[7, 8], finish_reason="stop", message=answer)]
    return record


def _seqs(engine: Any, trajectory: str) -> list[tuple[str, int, str | None]]:
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT id, seq, order_wait FROM llm_calls WHERE trajectory_id = :t ORDER BY seq"),
            {"t": trajectory},
        )
        return [(r[0], r[1], r[2]) for r in rows]


def _until_held(writer: RecordWriter, count: int) -> None:
    _until(f"{count} records held", lambda: writer.held == count)


ZERO = {"role": "user", "content": "zero"}
R0 = {"role": "assistant", "content": "reply zero"}
FIRST = {"role": "user", "content": "first"}
SECOND = {"role": "user", "content": "second"}
R1 = {"role": "assistant", "content": "reply one"}


def _recorded_turn_zero(
    engine: Any, tmp_path: Path, trajectory: str, *, failed_attempt: bool = False
) -> None:
    """The trajectory's first turn, written (so that what follows is a turn of a recorded trajectory);
    with ``failed_attempt``, then an attempt at turn 1 that vLLM answered with an error."""
    writer = _writer(engine, tmp_path / f"zero-{trajectory}.jsonl")
    try:
        writer.submit(_turn_record(writer, trajectory, [ZERO], R0["content"]))
        if failed_attempt:
            failed = _turn_record(writer, trajectory, [ZERO, R0, FIRST], "failed")
            failed.outcome, failed.status_code, failed.choices = Outcome.UPSTREAM_ERROR, 503, []
            writer.submit(failed)
        assert writer.wait_settled(2 if failed_attempt else 1, 30)
    finally:
        writer.close()


def test_records_behind_a_held_one_wait_with_it_and_come_after_the_turn_it_waits_for(
    tmp_path: Path, engine: Engine
) -> None:
    """Writer B holds turn 2 (its history holds turn 1's reply, which writer A has not written) and a
    sub-agent's first call after it (nothing of its own to wait for, but it arrived later); once A
    writes turn 1, both follow it, in arrival order, and say they waited."""
    _recorded_turn_zero(engine, tmp_path, "t")
    a = _writer(engine, tmp_path / "a.jsonl")
    b = _writer(engine, tmp_path / "b.jsonl", order_wait_s=25, peers=lambda: True)
    try:
        turn_1 = _turn_record(a, "t", [ZERO, R0, FIRST], R1["content"])
        b.submit(_turn_record(b, "t", [ZERO, R0, FIRST, R1, SECOND], "reply two"))
        b.submit(_turn_record(b, "t", [{"role": "user", "content": "sub-agent"}], "sub reply"))
        _until_held(b, 2)
        a.submit(turn_1)
        assert a.wait_settled(1, 30)
        assert b.wait_settled(2, 30)
    finally:
        a.close()
        b.close()
    assert _seqs(engine, "t") == [
        ("t-1-reply zero", 0, None),
        ("t-3-reply one", 1, None),
        ("t-5-reply two", 2, "waited"),
        ("t-1-sub reply", 3, "waited"),
    ]


def test_a_held_record_is_written_when_its_writer_stops(tmp_path: Path, engine: Engine) -> None:
    """Shutting down drains: a record still waiting is written (unproven), never dropped."""
    _recorded_turn_zero(engine, tmp_path, "t")
    b = _writer(engine, tmp_path / "b.jsonl", order_wait_s=25, peers=lambda: True)
    b.submit(_turn_record(b, "t", [ZERO, R0, FIRST, R1, SECOND], "reply two"))
    _until_held(b, 1)
    b.close()
    assert _seqs(engine, "t")[1:] == [("t-5-reply two", 1, "unproven")]


def test_every_record_waits_at_most_its_bound_from_when_it_began_to_wait(
    tmp_path: Path, engine: Engine
) -> None:
    """Two turns whose earlier turns never come: the second waited behind the first from the start,
    so both go together once the first's bound is over (not one bound after the other). In a
    trajectory no call of which gave a reply yet (its first call may hold made-up few-shot replies)
    the bound is half a second; a prefill (a trailing assistant message) is no reply."""
    _recorded_turn_zero(engine, tmp_path, "t")
    _recorded_turn_zero(engine, tmp_path, "w", failed_attempt=True)
    now = [0.0]
    b, order = _order_on_a_clock(engine, tmp_path, now)
    judge = DriftJudge()
    other = [{"role": "user", "content": "other"}, {"role": "assistant", "content": "z"}, SECOND]
    first = _turn_record(b, "t", [ZERO, R0, FIRST, R1, SECOND], "two")  # turn 1 never comes
    second = _turn_record(b, "t", other, "three")  # a reply no call of the trajectory gave either
    few_shot = _turn_record(b, "u", [FIRST, R1, SECOND], "few-shot")  # a trajectory with nothing yet
    # turn 1's first attempt failed (no reply) and its retry is not written: the failure is not it
    retried = _turn_record(b, "w", [ZERO, R0, FIRST, R1, SECOND], "after the retry")
    assert order.release(engine, judge, [first, second, few_shot, retried], flush=False) == []
    assert order.held == 4
    now[0] = 0.6
    assert order.release(engine, judge, [], flush=False) == [few_shot]
    now[0] = 10.5
    assert order.release(engine, judge, [], flush=False) == [first, second, retried]
    assert [r.order_wait for r in (first, second, few_shot, retried)] == ["unproven"] * 4
    prefill = _turn_record(b, "v", [FIRST, {"role": "assistant", "content": "Sure,"}], "prefilled")
    assert order.release(engine, judge, [prefill], flush=False) == [prefill]


def test_a_held_record_goes_once_the_turn_it_waits_for_is_written(tmp_path: Path, engine: Engine) -> None:
    """A held trajectory is judged again only when a call of it was written, and then goes at once."""
    _recorded_turn_zero(engine, tmp_path, "t")
    now = [0.0]
    b, order = _order_on_a_clock(engine, tmp_path, now)
    judge = DriftJudge()
    waiting = _turn_record(b, "t", [ZERO, R0, FIRST, R1, SECOND], "two")
    a = _writer(engine, tmp_path / "a.jsonl")
    try:
        for now[0] in (0.0, 1.0, 2.0):  # judged, judged again (remembered), then not judged: unchanged
            assert order.release(engine, judge, [waiting] if now[0] == 0.0 else [], flush=False) == []
        a.submit(_turn_record(a, "t", [ZERO, R0, FIRST], R1["content"]))
        assert a.wait_settled(1, 30)
        now[0] = 3.0
        assert order.release(engine, judge, [], flush=False) == [waiting]
        assert waiting.order_wait == "waited"
    finally:
        a.close()
