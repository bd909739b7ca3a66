"""``tokentrail serve --workers N``: real supervisor and worker processes on one port and one SQLite file."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.fake_upstream import FakeUpstream
from tests.servers import free_socket
from tests.test_serve import BODY, CHAT, _run, serve_process
from tokentrail.proxy.recording.records import CallRecord
from tokentrail.proxy.recording.spool import record_to_line

FRESH = httpx.Limits(max_keepalive_connections=0)  # a new connection per call: the kernel spreads them


def _children(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def _workers_seen(proxy: str, want: set[int]) -> set[int]:
    """Which workers answer /tokentrail/health over fresh connections, until all of ``want`` did (a
    worker just started answers once it has bound the port) or a minute passed."""
    seen: set[int] = set()
    deadline = time.monotonic() + 60
    with httpx.Client(limits=FRESH, timeout=30) as client:
        while not seen >= want and time.monotonic() < deadline:
            try:
                seen.add(client.get(proxy + "/tokentrail/health").json()["worker"])
            except httpx.TransportError:  # a connection queued at a worker just killed is reset
                continue
    return seen


@contextmanager
def _two_workers(upstream: str, db_url: str, **env: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``serve --workers 2`` (the supervisor and its URL), once both workers answer."""
    with serve_process(upstream, db_url, TOKENTRAIL_WORKERS="2", **env) as (process, proxy, _log):
        assert _workers_seen(proxy, {0, 1}) == {0, 1}
        yield process, proxy


def _rows(db_url: str) -> list[tuple[str, int, str]]:
    engine = create_engine(db_url)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT trajectory_id, seq, outcome FROM llm_calls")).all()
    engine.dispose()
    return [(r[0], r[1], r[2]) for r in rows]


def _wait_rows(db_url: str, count: int) -> list[tuple[str, int, str]]:
    deadline = time.monotonic() + 60
    while True:
        rows = _rows(db_url)
        if len(rows) >= count:
            return rows
        assert time.monotonic() < deadline, f"only {len(rows)} of {count} records written"
        time.sleep(0.05)


async def _load(proxy: str, calls: int, trajectories: int) -> None:
    async with httpx.AsyncClient(limits=FRESH, timeout=60) as client:

        async def one(i: int) -> None:
            body = {**BODY, "stream": i % 2 == 0}
            headers = {"X-Trajectory-Id": f"w-{i % trajectories}"}
            response = await client.post(proxy + CHAT, json=body, headers=headers)
            assert response.status_code == 200, response.text

        await asyncio.gather(*(one(i) for i in range(calls)))


def test_two_workers_share_the_port_and_the_database_and_hold_their_own_spools(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    spool = tmp_path / "spool.jsonl"
    with _two_workers(fake[1], db_url, TOKENTRAIL_FALLBACK_PATH=str(spool)) as (process, proxy):
        asyncio.run(_load(proxy, 200, 10))
        rows = _wait_rows(db_url, 200)
        for lock in (tmp_path / "spool.jsonl.lock", tmp_path / "spool.1.jsonl.lock"):
            fd = os.open(lock, os.O_RDWR)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
        assert len(_children(process.pid)) == 2
    assert len(rows) == 200
    assert {outcome for _t, _s, outcome in rows} == {"ok"}
    by_trajectory: dict[str, list[int]] = {}
    for trajectory_id, seq, _outcome in rows:
        by_trajectory.setdefault(trajectory_id, []).append(seq)
    assert sorted(by_trajectory) == sorted(f"w-{i}" for i in range(10))
    for seqs in by_trajectory.values():
        assert sorted(seqs) == list(range(20)), "seq must be gapless and unique across workers"


def test_sigterm_to_the_supervisor_drains_every_worker(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    upstream, url = fake
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with _two_workers(url, db_url, TOKENTRAIL_GRACEFUL_SHUTDOWN_S="30") as (process, proxy):
        statuses: list[int] = []

        def call() -> None:
            with httpx.Client(limits=FRESH, timeout=60) as client:
                response = client.post(proxy + CHAT, json=BODY, headers={"x-fake": "gate"})
                statuses.append(response.status_code)

        threads = [threading.Thread(target=call) for _ in range(12)]
        for thread in threads:
            thread.start()
        for _ in threads:
            assert upstream.hanging.acquire(timeout=30), "a call did not reach the upstream"
        process.send_signal(signal.SIGTERM)
        upstream.gate.set()
        for thread in threads:
            thread.join(60)
        assert process.wait(60) == 0
    assert statuses == [200] * 12
    assert len(_rows(db_url)) == 12


def test_a_worker_that_dies_is_replaced_and_the_port_keeps_serving(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with _two_workers(fake[1], db_url) as (process, proxy):
        before = _children(process.pid)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(after := _children(process.pid) - {victim}) < 2:
            assert time.monotonic() < deadline, "the dead worker was not replaced"
            time.sleep(0.05)
        assert len(after - before) == 1
        assert _workers_seen(proxy, {0, 1}) == {0, 1}
        asyncio.run(_load(proxy, 40, 4))
        _wait_rows(db_url, 40)


def test_workers_need_a_fixed_free_port(tmp_path: Path) -> None:
    env = {**os.environ, "TOKENTRAIL_WORKERS": "2", "TOKENTRAIL_FALLBACK_PATH": str(tmp_path / "s.jsonl")}
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    zero = _run("serve", "--db", db, "--port", "0", env=env)
    assert zero.returncode == 2
    assert "fixed port" in zero.stderr
    taken = free_socket()
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        busy = _run("serve", "--db", db, "--port", str(port), env=env)
    finally:
        taken.close()
    assert busy.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    assert "Traceback" not in zero.stderr + busy.stderr


def test_a_worker_that_cannot_start_stops_the_supervisor(tmp_path: Path) -> None:
    """Another proxy holds worker 1's spool: worker 1 fails each time, and the supervisor gives up
    instead of restarting it forever."""
    spool = tmp_path / "s.jsonl"
    other = os.open(tmp_path / "s.1.jsonl.lock", os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(other, fcntl.LOCK_EX)
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "TOKENTRAIL_WORKERS": "2", "TOKENTRAIL_FALLBACK_PATH": str(spool)}
    try:
        result = _run("serve", "--db", f"sqlite:///{tmp_path / 'db.sqlite'}", "--port", str(port), env=env)
    finally:
        os.close(other)
    assert result.returncode == 1
    assert "s.1.jsonl is in use by another TokenTrail process" in result.stderr
    assert "worker cannot start; stopping all" in result.stderr


def test_workers_end_when_their_supervisor_is_killed(fake: tuple[FakeUpstream, str], tmp_path: Path) -> None:
    """SIGKILL gives the supervisor no chance to pass anything on: the kernel tells the workers."""
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with _two_workers(fake[1], db_url) as (process, _proxy):
        workers = _children(process.pid)
        process.kill()
        process.wait(30)
        deadline = time.monotonic() + 60
        while alive := {pid for pid in workers if Path(f"/proc/{pid}").exists()}:
            assert time.monotonic() < deadline, f"workers {alive} outlived their supervisor"
            time.sleep(0.05)


def test_a_spool_of_a_worker_this_run_does_not_start_is_pointed_out_then_replayed(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    """A run with fewer workers than the last one leaves worker 2's spool to nobody: say so; a run
    that starts worker 2 again replays it."""
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    spool = tmp_path / "spool.jsonl"
    record = CallRecord("stranded-call", "stranded-trajectory", CHAT, time.time(), seq=0)
    (tmp_path / "spool.2.jsonl").write_text(record_to_line(record, "database_error") + "\n")
    env = {"TOKENTRAIL_FALLBACK_PATH": str(spool)}
    taken = free_socket()  # a single serve on a taken port: it warns first, then stops
    taken.listen(1)
    try:
        port = str(taken.getsockname()[1])
        single = _run("serve", "--db", db_url, "--port", port, env={**os.environ, **env})
    finally:
        taken.close()
    assert f"path=<{tmp_path / 'spool.2.jsonl'}>" in single.stderr
    assert "records wait in the spool of a worker this run does not start" in single.stderr
    with serve_process(fake[1], db_url, TOKENTRAIL_WORKERS="3", **env) as (_process, _proxy, _log):
        deadline = time.monotonic() + 60
        while ("stranded-trajectory", 0, "ok") not in _rows(db_url):
            assert time.monotonic() < deadline, "worker 2 did not replay its spool"
            time.sleep(0.05)


def test_health_under_workers_sums_every_worker(fake: tuple[FakeUpstream, str], tmp_path: Path) -> None:
    """Whichever worker answers, the figures cover all of them (each publishes its own every second).
    The spool's name has no suffix here: the workers' paths must still follow from it."""
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with _two_workers(fake[1], db_url, TOKENTRAIL_FALLBACK_PATH=str(tmp_path / "spool")) as (_process, proxy):
        asyncio.run(_load(proxy, 60, 6))
        _wait_rows(db_url, 60)
        answered: set[int] = set()
        deadline = time.monotonic() + 60
        with httpx.Client(limits=FRESH, timeout=30) as client:
            while answered != {0, 1}:  # a total of 60 from each worker's point of view
                assert time.monotonic() < deadline, f"health never summed to 60 from {answered}"
                health = client.get(proxy + "/tokentrail/health").json()
                if health["writer"]["records_written"] == 60:
                    answered.add(health["worker"])
                    workers = health["workers"]
                    assert [w["worker"] for w in workers] == [0, 1]
                    assert sum(w["records_written"] for w in workers) == 60
                    assert all(w["records_written"] > 0 for w in workers), "both workers took calls"
                    assert health["status"] == "ok"
                    assert health["writer"]["fallback_path"] == str(
                        tmp_path / ("spool" if health["worker"] == 0 else "spool.1")
                    )


def test_health_says_degraded_when_a_worker_stops_reporting(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    """A hung worker (SIGSTOP) publishes nothing: after STALE_S its siblings report it."""
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with _two_workers(fake[1], db_url) as (process, proxy):
        hung = min(_children(process.pid))
        os.kill(hung, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 60
            with httpx.Client(limits=FRESH, timeout=1) as client:
                while True:
                    assert time.monotonic() < deadline, "a hung worker never showed in health"
                    try:  # a connection the kernel gives the hung worker waits: try another
                        health = client.get(proxy + "/tokentrail/health").json()
                    except httpx.TimeoutException:
                        continue
                    states = {w["worker"]: w["status"] for w in health["workers"]}
                    if "not_reporting" in states.values():
                        break
            assert health["status"] == "degraded"
            assert sorted(states.values()) == ["not_reporting", "ok"]
        finally:
            os.kill(hung, signal.SIGCONT)
