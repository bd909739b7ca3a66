"""The writer on a real SQLite file: batches, seq across restarts, and nothing dropped silently."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, text

from tests.conftest import Proxy, running_proxy
from tests.fake_upstream import FakeUpstream
from tokentrail.proxy.metrics.calls import label_key
from tokentrail.proxy.metrics.persisted import add_counts, batch_counts, read_counts
from tokentrail.proxy.recording.records import CallRecord, ChoiceRecord, Integrity
from tokentrail.proxy.recording.spool import record_to_line
from tokentrail.proxy.recording.writer import RecordWriter
from tokentrail.proxy.storage.bulk import RowEncoder
from tokentrail.proxy.storage.engine import make_engine
from tokentrail.proxy.storage.migrate import upgrade_database
from tokentrail.proxy.trajectory.drift import DriftJudge

CHAT = "/v1/chat/completions"


def _writer(db_url: str, fallback: Path, queue_size: int = 100) -> RecordWriter:
    return RecordWriter(
        make_engine(db_url),
        queue_size=queue_size,
        batch_size=50,
        retries=1,
        fallback_path=fallback,
        judge=DriftJudge(),
    )


def _record(writer: RecordWriter, trajectory: str) -> CallRecord:
    record = CallRecord(
        call_id=f"{trajectory}-{time.monotonic_ns()}",
        trajectory_id=trajectory,
        route=CHAT,
        received_at=time.time(),
        seq=writer.next_ordinal(trajectory),
        integrity=Integrity.OK,
        prompt_token_ids=[1, 2, 3],
        prompt_tokens=3,
        completion_tokens=2,
    )
    record.choices = [ChoiceRecord(index=0, token_ids=[7, 8], finish_reason="stop")]
    return record


def test_seq_continues_where_the_database_left_off_after_a_restart(tmp_path: Path, db_url: str) -> None:
    upgrade_database(db_url)
    for _run in range(2):
        writer = _writer(db_url, tmp_path / "fallback.jsonl")
        writer.start()
        for _ in range(3):
            writer.submit(_record(writer, "traj"))
        writer.close()
        writer._engine.dispose()
        assert writer.written == 3
    engine = create_engine(db_url)
    with engine.connect() as connection:
        seqs = connection.execute(text("SELECT seq FROM llm_calls ORDER BY seq")).scalars().all()
        counts = connection.execute(text("SELECT call_count, completion_tokens FROM trajectories")).one()
    engine.dispose()
    assert seqs == [0, 1, 2, 3, 4, 5]
    assert tuple(counts) == (6, 12)


def test_a_trajectory_is_forgotten_once_written_and_numbered_on_when_it_comes_back(
    tmp_path: Path, db_url: str
) -> None:
    """Memory must not grow with the number of trajectories a long-running proxy has seen."""
    upgrade_database(db_url)
    writer = _writer(db_url, tmp_path / "fallback.jsonl")
    writer.start()
    for name in ("a", "b", "c"):
        for _ in range(2):
            writer.submit(_record(writer, name))
    assert writer.wait_settled(6, timeout=30)
    assert writer.known_trajectories == 0
    late = [_record(writer, "a"), _record(writer, "a")]  # ordinals start again at 0
    assert [r.seq for r in late] == [0, 1]
    writer.submit(late[1])  # arrives out of order: held until the first is in
    writer.submit(late[0])
    writer.close()
    writer._engine.dispose()
    engine = create_engine(db_url)
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT id, seq FROM llm_calls WHERE trajectory_id = 'a' ORDER BY seq")
        ).all()
    engine.dispose()
    assert [seq for _id, seq in rows] == [0, 1, 2, 3]
    assert [call_id for call_id, _seq in rows[2:]] == [late[0].call_id, late[1].call_id]


def test_a_full_queue_spills_to_the_fallback_file_instead_of_blocking(tmp_path: Path, db_url: str) -> None:
    upgrade_database(db_url)
    fallback = tmp_path / "fallback.jsonl"
    writer = _writer(db_url, fallback, queue_size=1)
    first, second = _record(writer, "a"), _record(writer, "a")
    writer.submit(first)
    writer.submit(second)  # the thread is not started yet, so the queue is full
    assert writer.failed == 1
    assert dict(writer.failure_reasons) == {"queue_full": 1}
    (line,) = fallback.read_text().splitlines()
    spilled = json.loads(line)
    assert spilled["call_id"] == second.call_id
    assert spilled["choices"][0]["token_ids"] == [7, 8]
    assert fallback.stat().st_mode & 0o777 == 0o600
    writer.start()
    writer.close()
    writer._engine.dispose()
    assert writer.written == 1


@pytest.fixture
def proxy_on_db(fake: tuple[FakeUpstream, str], tmp_path: Path, db_url: str) -> Iterator[Proxy]:
    with running_proxy(fake[1], tmp_path, db_url=db_url) as proxy:
        yield proxy


def test_records_the_database_refuses_go_to_the_fallback_file_and_health_says_so(
    proxy_on_db: Proxy, tmp_path: Path
) -> None:
    fake_proxy = proxy_on_db
    engine = create_engine(fake_proxy.db_url)
    with engine.begin() as connection:
        cascade = " CASCADE" if connection.dialect.name == "postgresql" else ""
        connection.execute(text("DROP TABLE completions" + cascade))
    engine.dispose()
    response = httpx.post(
        fake_proxy.url + CHAT,
        json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
        headers={"X-Trajectory-Id": "lost?"},
    )
    assert response.status_code == 200
    fake_proxy.wait_records(1)
    health = httpx.get(fake_proxy.url + "/tokentrail/health").json()
    assert health["status"] == "degraded"
    assert health["writer"]["records_failed"] == 1
    (reason,) = health["writer"]["failure_reasons"]
    assert reason in ("db_error:OperationalError", "db_error:ProgrammingError")
    # in the spool, or already taken for a replay (which the missing table postpones)
    spooled = [tmp_path / "fallback.jsonl", tmp_path / "fallback.jsonl.replaying"]
    (line,) = [line for path in spooled if path.exists() for line in path.read_text().splitlines()]
    assert json.loads(line)["trajectory_id"] == "lost?"
    assert fake_proxy.rows("SELECT count(*) AS n FROM llm_calls_stored") == [{"n": 0}]


def test_a_record_the_database_refuses_is_set_aside_and_does_not_block_the_replay(
    tmp_path: Path, db_url: str
) -> None:
    """One bad record among good ones: the good ones are written, the bad one is spooled as refused,
    and the replay that follows keeps it aside instead of failing on it forever."""
    upgrade_database(db_url)
    fallback = tmp_path / "fallback.jsonl"
    writer = RecordWriter(
        make_engine(db_url),
        queue_size=100,
        batch_size=50,
        retries=0,
        fallback_path=fallback,
        judge=DriftJudge(),
    )
    bad = _record(writer, "poison")
    bad.choices = [ChoiceRecord(index=0, token_ids=[1]), ChoiceRecord(index=0, token_ids=[2])]  # same key
    for record in (_record(writer, "good"), bad, _record(writer, "good")):
        writer.submit(record)
    writer.start()  # all three in the first batch, which fails
    assert writer.wait_settled(3, timeout=30)
    assert writer.spool.pending  # the bad record (and, if it came first in the batch, the others)
    writer.submit(_record(writer, "good"))  # a write that works, after which the spool is replayed
    writer.close()
    writer._engine.dispose()
    assert not writer.spool.pending
    assert (writer.refused, writer.lost) == (1, 0)
    (kept,) = (tmp_path / "fallback.jsonl.refused").read_text().splitlines()
    assert json.loads(kept)["call_id"] == bad.call_id
    assert (tmp_path / "fallback.jsonl.refused").stat().st_mode & 0o777 == 0o600
    engine = create_engine(db_url)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT trajectory_id, seq FROM llm_calls ORDER BY seq")).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [("good", 0), ("good", 1), ("good", 2)]


def _wait_until(condition: Any, timeout: float) -> bool:
    """Poll ``condition`` (state another thread changes, with no event to wait on) until true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_refused_record_is_set_aside_by_the_idle_replay_too(tmp_path: Path, db_url: str) -> None:
    """With no new call coming, the replay the writer makes while idle must not fail on a record the
    database refused on its own (and so postpone every other spooled record forever)."""
    upgrade_database(db_url)
    fallback = tmp_path / "fallback.jsonl"
    writer = RecordWriter(
        make_engine(db_url),
        queue_size=100,
        batch_size=50,
        retries=0,
        fallback_path=fallback,
        judge=DriftJudge(),
    )
    good = _record(writer, "t")  # one trajectory: the batch holds them in arrival order, good first
    bad = _record(writer, "t")
    bad.choices = [ChoiceRecord(index=0, token_ids=[1]), ChoiceRecord(index=0, token_ids=[2])]  # same key
    writer.submit(good)  # written alone after the batch fails, so bad is then refused alone
    writer.submit(bad)
    writer.start()
    assert writer.wait_settled(2, timeout=30)
    assert writer.spool.pending
    assert writer.written == 1
    try:
        assert _wait_until(lambda: not writer.spool.pending, timeout=15), "the idle replay never drained"
    finally:
        writer.close()
        writer._engine.dispose()
    assert (writer.refused, writer.lost) == (1, 0)
    (kept,) = (tmp_path / "fallback.jsonl.refused").read_text().splitlines()
    assert json.loads(kept)["call_id"] == bad.call_id


def test_a_call_after_one_that_spilled_is_written_without_waiting_for_it(tmp_path: Path, db_url: str) -> None:
    """A record that went to the spool (queue full) is one its trajectory's later records must not
    wait for: they are written while the proxy runs, not only when it stops."""
    upgrade_database(db_url)
    writer = _writer(db_url, tmp_path / "fallback.jsonl", queue_size=1)
    writer.submit(_record(writer, "other"))  # fills the queue: the thread is not started yet
    spilled = _record(writer, "a")
    writer.submit(spilled)
    assert writer.failed == 1
    writer.start()
    try:
        assert writer.wait_settled(2, timeout=30)
        later = _record(writer, "a")
        writer.submit(later)
        assert writer.wait_settled(3, timeout=15), "the later call waited for the one that spilled"
        assert writer.written == 2
    finally:
        writer.close()
        writer._engine.dispose()


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False, allow_infinity=False))
@settings(max_examples=3000, deadline=None)
def test_sqlite_timestamps_are_the_text_sqlalchemy_would_store(epoch: float) -> None:
    expected = datetime.fromtimestamp(epoch, tz=UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
    encoder = RowEncoder("sqlite", "qmark")
    assert encoder.time(epoch) == expected
    assert encoder.time(epoch) == expected  # the cached second gives the same text
    assert RowEncoder("postgresql", "format").time(epoch) == datetime.fromtimestamp(epoch, tz=UTC)


def test_a_replay_cut_by_a_crash_is_finished_by_the_next_writer_exactly_once(
    tmp_path: Path, db_url: str
) -> None:
    """A ``.replaying`` file left by a crash after part of it reached the database: the next writer
    replays it, skips the calls the database already holds, and writes the rest once."""
    upgrade_database(db_url)
    fallback = tmp_path / "fallback.jsonl"
    first = _writer(db_url, fallback)
    records = [_record(first, "crashed") for _ in range(3)]
    first.start()
    first.submit(records[0])  # the part of the replay that was written before the crash
    first.close()
    first._engine.dispose()
    lines = [record_to_line(record, "database_unavailable") for record in records]
    fallback.with_name(fallback.name + ".replaying").write_text("".join(line + "\n" for line in lines))

    second = _writer(db_url, fallback)
    assert second.spool.pending
    second.start()
    second.submit(_record(second, "fresh"))  # a write that works, after which the spool is replayed
    second.close()
    second._engine.dispose()
    assert not second.spool.pending
    assert not fallback.with_name(fallback.name + ".replaying").exists()
    assert (second.replayed, second.refused, second.lost) == (2, 0, 0)
    engine = create_engine(db_url)
    with engine.connect() as connection:
        ids = connection.execute(
            text("SELECT id FROM llm_calls WHERE trajectory_id = 'crashed' ORDER BY seq")
        ).scalars()
        assert sorted(ids) == sorted(record.call_id for record in records)
    engine.dispose()


def test_a_failing_metric_count_never_costs_a_record(tmp_path: Path, db_url: str) -> None:
    """The metrics are counted in the batch's transaction; a bug there must not cost a record."""
    seen: list[int] = []

    def count(connection: Any, encoder: Any, batch: list[CallRecord]) -> None:
        seen.append(len(batch))
        connection.exec_driver_sql("INSERT INTO no_such_table VALUES (1)")  # fails in the database

    upgrade_database(db_url)
    engine = make_engine(db_url, 5000)
    writer = RecordWriter(
        engine,
        queue_size=10,
        batch_size=5,
        retries=0,
        fallback_path=tmp_path / "spool.jsonl",
        count=count,
        judge=DriftJudge(),
    )
    writer.start()
    try:
        for i in range(3):
            writer.submit(CallRecord(f"c{i}", f"t{i}", "/v1/chat/completions", time.time()))
        assert writer.wait_settled(3, 10)
    finally:
        writer.close()
        engine.dispose()
    assert writer.written == 3
    assert writer.failed == 0
    assert sum(seen) >= 3


def test_metric_counts_are_committed_with_their_records_and_survive_a_restart(
    tmp_path: Path, db_url: str
) -> None:
    upgrade_database(db_url)
    for _run in range(2):
        engine = make_engine(db_url, 5000)
        writer = RecordWriter(
            engine,
            queue_size=100,
            batch_size=50,
            retries=1,
            fallback_path=tmp_path / "spool.jsonl",
            count=lambda c, e, batch: add_counts(c, e, "me", batch_counts(batch)),
            judge=DriftJudge(),
        )
        writer.start()
        for _ in range(3):
            writer.submit(_record(writer, "counted"))
        writer.close()
        engine.dispose()
    engine = make_engine(db_url, 5000)
    try:
        counts = read_counts(engine, "me")
        assert read_counts(engine, "someone-else")["tokentrail_calls"] == {}
    finally:
        engine.dispose()
    assert counts["tokentrail_calls"] == {label_key(CHAT, "ok", "ok"): 6.0}
    assert counts["tokentrail_prompt_tokens"] == {CHAT: 18.0}
    assert counts["tokentrail_generated_tokens"] == {CHAT: 12.0}


@pytest.mark.skipif(not Path("/proc/thread-self/comm").exists(), reason="Linux names threads in /proc")
def test_the_writer_thread_carries_its_name_where_top_and_the_benchmarks_see_it(tmp_path: Path) -> None:
    """bench/agents.py tells the writer's CPU time from the event loop's by this name."""
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade_database(db_url)
    writer = _writer(db_url, tmp_path / "fallback.jsonl")
    writer.start()
    try:
        writer.submit(_record(writer, "named"))
        assert writer.wait_settled(1, timeout=30)
        comm = Path(f"/proc/self/task/{writer._thread.native_id}/comm").read_text().strip()
    finally:
        writer.close()
        writer._engine.dispose()
    assert comm == "tokentrail-writer"[:15]


def test_a_record_held_for_its_predecessor_is_written_when_the_writer_stops(
    tmp_path: Path, db_url: str
) -> None:
    """A call whose earlier sibling never ended (its record never came) is still written at stop."""
    upgrade_database(db_url)
    writer = _writer(db_url, tmp_path / "fallback.jsonl")
    writer.start()
    _never_ended = writer.next_ordinal("held")  # ordinal 0: a call that never hands its record in
    writer.submit(_record(writer, "held"))  # ordinal 1: held until 0 comes, or the writer stops
    writer.submit(_record(writer, "other"))
    assert writer.wait_settled(1, timeout=30)
    writer.close()
    writer._engine.dispose()
    engine = create_engine(db_url)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT trajectory_id, seq FROM llm_calls ORDER BY 1")).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [("held", 0), ("other", 0)]
    assert writer.written == 2
