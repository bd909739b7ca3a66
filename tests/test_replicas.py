"""Two ``tokentrail serve`` processes on one PostgreSQL: nothing lost or duplicated, seq gapless."""

from __future__ import annotations

import asyncio
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

from tests.fake_upstream import FakeUpstream
from tests.postgres import create_database
from tests.test_serve import serve_process
from tokentrail.proxy.storage.migrate import upgrade_database

CHAT = "/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


async def _load(proxies: list[str], calls: int, trajectories: int, concurrency: int) -> float:
    """Send ``calls`` calls, trajectory i % trajectories through proxy i % len(proxies); calls/s."""
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=60) as client:

        async def one(i: int) -> None:
            body = {**BODY, "stream": i % 3 == 0}
            async with limit:
                response = await client.post(
                    proxies[i % len(proxies)] + CHAT,
                    json=body,
                    headers={"X-Trajectory-Id": f"r-{i % trajectories}"},
                )
            assert response.status_code == 200, response.text

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(calls)))
        return calls / (time.perf_counter() - started)


def _wait_written(proxies: list[str], count: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        written = sum(
            httpx.get(p + "/tokentrail/health").json()["writer"]["records_written"] for p in proxies
        )
        if written >= count:
            return
        assert time.monotonic() < deadline, f"only {written} of {count} records written"
        time.sleep(0.05)


def test_two_replicas_on_one_postgres_keep_seq_gapless_and_unique(
    fake: tuple[FakeUpstream, str], postgres_url: str, tmp_path: Path
) -> None:
    _two_proxies_keep_seq_gapless(fake[1], create_database(postgres_url), "two replicas on PostgreSQL")


def _two_proxies_keep_seq_gapless(upstream: str, db_url: str, label: str) -> None:
    """400 calls in 10 trajectories, spread over two ``serve`` processes on ``db_url``."""
    upgrade_database(db_url)
    with ExitStack() as stack:
        proxies = [stack.enter_context(serve_process(upstream, db_url))[1] for _ in range(2)]
        rate = asyncio.run(_load(proxies, 400, 10, 32))
        _wait_written(proxies, 400)
    print(f"\n{label}: {rate:.0f} calls/s")
    _assert_gapless(db_url, calls=400, trajectories=10)


def _assert_gapless(db_url: str, calls: int, trajectories: int) -> None:
    engine = create_engine(db_url)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT trajectory_id, seq FROM llm_calls")).all()
        counts = connection.execute(text("SELECT sum(call_count) FROM trajectories")).scalar_one()
    engine.dispose()
    assert len(rows) == calls
    assert counts == calls
    by_trajectory: dict[str, list[int]] = {}
    for trajectory_id, seq in rows:
        by_trajectory.setdefault(trajectory_id, []).append(seq)
    assert len(by_trajectory) == trajectories
    for seqs in by_trajectory.values():
        assert sorted(seqs) == list(range(calls // trajectories)), "seq must be gapless and unique"


def test_two_proxy_processes_on_one_sqlite_file_keep_seq_gapless_and_unique(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    """Several processes on one host (one core each) share a SQLite file: each writer numbers its
    records inside its write transaction, which SQLite serialises, so the same guarantees hold."""
    _two_proxies_keep_seq_gapless(
        fake[1], f"sqlite:///{tmp_path / 'shared.db'}", "two processes on one SQLite file"
    )
