"""Database outages: SQLite whose write lock another process holds, and PostgreSQL stopped and started
again. Calls keep flowing, their records go to the spool, and once the database is back they are
replayed into it exactly once.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Proxy, ProxyFactory
from tests.fake_upstream import FakeUpstream
from tests.postgres import create_database, postgres_cluster

CHAT = "/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}


def _health(proxy: Proxy) -> dict[str, Any]:
    health: dict[str, Any] = httpx.get(proxy.url + "/tokentrail/health", timeout=10).json()
    return health


def _wait_for(condition: Callable[[], bool], limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _call(proxy: Proxy, trajectory: str) -> httpx.Response:
    return httpx.post(proxy.url + CHAT, json=BODY, headers={"X-Trajectory-Id": trajectory}, timeout=30)


def test_a_locked_database_spools_the_records_and_replays_them_exactly_once(
    fake: tuple[FakeUpstream, str], proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    with proxy_factory(fake[1], writer_retries=0, db_busy_timeout_ms=200) as proxy:
        _call(proxy, "warm").raise_for_status()
        proxy.wait_records(1)
        with contextlib.closing(sqlite3.connect(tmp_path / "tokentrail.db", isolation_level=None)) as lock:
            lock.execute("BEGIN IMMEDIATE")  # holds the write lock, as a long migration or backup would
            answers = [_call(proxy, f"t{i % 4}") for i in range(20)]
            assert all(a.status_code == 200 for a in answers)  # the calls kept flowing
            _wait_for(lambda: _health(proxy)["writer"]["records_failed"] >= 20)
            during = _health(proxy)
            lock.execute("ROLLBACK")
        assert during["status"] == "degraded"
        assert during["writer"]["spool_bytes"] > 0
        assert during["writer"]["records_written"] == 1
        _call(proxy, "t0").raise_for_status()  # the database works again: this write triggers the replay
        _wait_for(lambda: _health(proxy)["writer"]["records_replayed"] == 20)
        after = _health(proxy)
        assert after["status"] == "ok"
        assert after["writer"]["spool_bytes"] == 0
        rows = proxy.rows("SELECT trajectory_id, seq, response_id FROM llm_calls ORDER BY trajectory_id, seq")
        assert len(rows) == 22  # warm-up, 20 spooled, 1 after: each exactly once
        for trajectory in ("t0", "t1", "t2", "t3"):
            seqs = [r["seq"] for r in rows if r["trajectory_id"] == trajectory]
            assert seqs == list(range(len(seqs)))  # gapless
        assert not (tmp_path / "fallback.jsonl.replaying").exists()


def test_with_a_full_spool_and_reject_the_proxy_answers_503_until_the_spool_drains(
    fake: tuple[FakeUpstream, str], proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    limits = {"writer_retries": 0, "db_busy_timeout_ms": 200, "spool_max_bytes": 4000, "spool_full": "reject"}
    with proxy_factory(fake[1], **limits) as proxy:
        with contextlib.closing(sqlite3.connect(tmp_path / "tokentrail.db", isolation_level=None)) as lock:
            lock.execute("BEGIN IMMEDIATE")
            answered = 0  # calls answered 200 while the database was locked
            while True:  # each record makes the spool fuller, until one does not fit and is lost
                response = _call(proxy, "r")
                if response.status_code == 503:
                    break
                assert response.status_code == 200
                answered += 1
                assert answered < 50
                _wait_for(lambda n=answered: _health(proxy)["writer"]["records_failed"] >= n)
            assert "spool is full" in response.json()["error"]["message"]
            health = _health(proxy)
            assert health["writer"]["spool_full"] is True
            assert health["writer"]["records_lost"] == 1  # counted and logged, not hidden
            assert health["writer"]["failure_reasons"]["spool_full"] == 1
            lock.execute("ROLLBACK")
        _wait_for(lambda: not _health(proxy)["writer"]["spool_full"])  # replayed while idle
        assert _call(proxy, "r").status_code == 200
        proxy.wait_all_records()  # (the call's own record, written after its answer)
        assert _health(proxy)["writer"]["records_replayed"] == answered - 1  # all but the lost one
        assert proxy.rows("SELECT count(*) AS n FROM llm_calls") == [{"n": answered}]


def test_postgres_stopped_and_started_again_loses_nothing(
    fake: tuple[FakeUpstream, str], proxy_factory: ProxyFactory
) -> None:
    with postgres_cluster() as cluster:
        db_url = create_database(cluster.url)
        with proxy_factory(fake[1], db_url=db_url, writer_retries=0) as proxy:
            _call(proxy, "warm").raise_for_status()
            proxy.wait_records(1)
            cluster.stop()
            answers = [_call(proxy, f"p{i % 3}") for i in range(15)]
            assert all(a.status_code == 200 for a in answers)
            _wait_for(lambda: _health(proxy)["writer"]["records_failed"] >= 15)
            assert _health(proxy)["status"] == "degraded"
            cluster.start()
            _call(proxy, "p0").raise_for_status()
            _wait_for(lambda: _health(proxy)["writer"]["records_replayed"] == 15)
            assert _health(proxy)["status"] == "ok"
            rows = proxy.rows("SELECT trajectory_id, seq FROM llm_calls ORDER BY trajectory_id, seq")
            assert len(rows) == 17
            for trajectory in ("p0", "p1", "p2"):
                seqs = [r["seq"] for r in rows if r["trajectory_id"] == trajectory]
                assert seqs == list(range(len(seqs)))
