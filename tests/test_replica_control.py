"""Pause, resume and policy versions across replicas on one database: real ``serve`` processes (one of
them with ``--workers 2``), on PostgreSQL (``TOKENTRAIL_FLEET_CONTROL=auto``) and on one SQLite file
(``database``, replicas on one host).

Each test fails on a proxy whose replicas each decide alone: a pause through one replica lets the
other's calls reach a paused vLLM, a resume through the other leaves the first one's calls held, a
version set through one is unknown to the other, and a wait pause does not wait for the other's calls.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.fake_upstream import FakeUpstream
from tests.postgres import create_database
from tests.test_fleet import PAUSE, RESUME, _in_background, _in_flight, _until, _versions
from tests.test_serve import BODY, CHAT, serve_process
from tests.test_workers import FRESH
from tests.test_workers import _wait_rows as wait_rows
from tokentrail.proxy.fleet.replicas import ControlStore, ReplicaFleet
from tokentrail.proxy.rl.loop import RlLoop
from tokentrail.proxy.rl.pause import PauseMode
from tokentrail.proxy.settings import Settings
from tokentrail.proxy.storage.engine import make_engine
from tokentrail.proxy.storage.migrate import upgrade_database
from tokentrail.proxy.upstream.balancer import UpstreamBalancer
from tokentrail.proxy.upstream.configured import upstream_client

HELD = 6
PATIENT = {"TOKENTRAIL_PAUSE_MAX_WAIT_S": "120"}  # a held call nobody resumes outlasts the test


@pytest.fixture(params=["postgresql", "sqlite"])
def shared_db(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """The database two replicas share, and the settings that make them share control over it."""
    if request.param == "postgresql":
        return create_database(request.getfixturevalue("postgres_url")), {}  # auto: on PostgreSQL
    return f"sqlite:///{tmp_path / 'shared.sqlite'}", {"TOKENTRAIL_FLEET_CONTROL": "database"}


@contextmanager
def _replica(upstream: str, shared: tuple[str, dict[str, str]], **env: str) -> Iterator[str]:
    db_url, settings = shared
    with serve_process(upstream, db_url, **PATIENT, **settings, **env) as (process, url, _log):
        yield url
        assert process.poll() is None


@contextmanager
def _two_replicas(upstream: str, shared: tuple[str, dict[str, str]]) -> Iterator[tuple[str, str]]:
    """Replica A with two workers, replica B alone."""
    with _replica(upstream, shared, TOKENTRAIL_WORKERS="2") as a, _replica(upstream, shared) as b:
        yield a, b


def _paused(client: httpx.Client, proxy: str) -> bool:
    return bool(client.get(proxy + PAUSE).json()["paused"])


def _post_in_background(url: str, **kwargs: Any) -> tuple[threading.Thread, list[int]]:
    statuses: list[int] = []

    def post() -> None:
        with httpx.Client(limits=FRESH, timeout=120) as client:
            statuses.append(client.post(url, **kwargs).status_code)

    thread = threading.Thread(target=post)
    thread.start()
    return thread, statuses


def test_calls_held_by_a_pause_through_one_replica_go_when_the_other_resumes_with_the_new_version(
    fake: tuple[FakeUpstream, str], shared_db: tuple[str, dict[str, str]]
) -> None:
    upstream, url = fake
    with _two_replicas(url, shared_db) as (a, b), httpx.Client(limits=FRESH, timeout=30) as control:
        assert control.post(a + PAUSE + "?mode=keep").status_code == 200
        assert _paused(control, b)  # before the pause's answer
        at_a, statuses_a = _in_background(a, HELD, "at-a")
        at_b, statuses_b = _in_background(b, HELD, "at-b")
        _until(lambda: _in_flight(a) == HELD and _in_flight(b) == HELD, "calls not all held")
        assert CHAT not in [r["path"] for r in upstream.requests]
        assert control.post(b + "/update_weight_version", json={"new_version": "v2"}).status_code == 200
        assert control.post(b + RESUME).status_code == 200
        at_a.join(60)
        at_b.join(60)
        assert statuses_a == statuses_b == [200] * HELD
        assert not _paused(control, a)
        wait_rows(shared_db[0], 2 * HELD)
    assert _versions(shared_db[0], "at-a") == _versions(shared_db[0], "at-b") == ["v2"] * HELD
    assert upstream.control.count("/pause?mode=keep") == 1
    assert upstream.control.count("/resume") == 1


def test_a_version_set_through_one_replica_is_known_to_the_other_before_its_answer(
    fake: tuple[FakeUpstream, str], shared_db: tuple[str, dict[str, str]]
) -> None:
    url = fake[1]
    with _replica(url, shared_db) as a, _replica(url, shared_db) as b, httpx.Client(timeout=30) as client:
        learned = {url: "default"}
        _until(lambda: client.get(b + PAUSE).json()["weight_versions"] == learned, "no version at start")
        answer = client.post(a + "/update_weight_version", json={"new_version": "step-7"})
        assert answer.status_code == 200
        for i in range(HELD):  # at once, on the other replica
            sent = client.post(b + CHAT, json=BODY, headers={"X-Trajectory-Id": f"after-{i}"})
            assert sent.status_code == 200
        wait_rows(shared_db[0], HELD)
    assert _versions(shared_db[0], "after") == ["step-7"] * HELD


def test_a_replica_started_during_a_pause_holds_its_calls(
    fake: tuple[FakeUpstream, str], shared_db: tuple[str, dict[str, str]]
) -> None:
    upstream, url = fake
    with _replica(url, shared_db) as a, httpx.Client(limits=FRESH, timeout=30) as control:
        assert control.post(a + PAUSE + "?mode=keep").status_code == 200
        with _replica(url, shared_db, TOKENTRAIL_WORKERS="2") as late:
            assert _paused(control, late)
            caller, statuses = _in_background(late, HELD, "late")
            _until(lambda: _in_flight(late) == HELD, "calls not all held")
            assert CHAT not in [r["path"] for r in upstream.requests]
            assert control.post(a + RESUME).status_code == 200
            caller.join(60)
            assert statuses == [200] * HELD


@pytest.mark.parametrize("then", ["finish", "resume"])
def test_a_wait_pause_waits_for_the_other_replicas_calls_and_a_resume_there_supersedes_it(
    fake: tuple[FakeUpstream, str], shared_db: tuple[str, dict[str, str]], then: str
) -> None:
    """A wait pause through A pauses vLLM only once B's running call finished; a resume through B
    while A waits ends A's pause (409) and the whole fleet runs, vLLM never paused."""
    upstream, url = fake
    with (
        _replica(url, shared_db) as a,
        _replica(url, shared_db) as b,
        httpx.Client(limits=FRESH, timeout=30) as control,
    ):
        running, ran = _post_in_background(
            b + CHAT, json=BODY, headers={"X-Trajectory-Id": "long", "x-fake": "gate"}
        )
        _until(lambda: _in_flight(b) == 1, "the call did not start")
        pausing, paused = _post_in_background(a + PAUSE + "?mode=wait")
        _until(lambda: _paused(control, b), "B's gate did not close")
        assert "/pause?mode=wait" not in upstream.control  # B's call still runs
        if then == "finish":
            upstream.gate.set()
            pausing.join(60)
            assert paused == [200]
            assert upstream.control.count("/pause?mode=wait") == 1
            assert control.post(b + RESUME).status_code == 200
        else:
            assert control.post(b + RESUME).status_code == 200
            pausing.join(60)
            assert paused == [409]
            assert "/pause?mode=wait" not in upstream.control
            upstream.gate.set()
        running.join(60)
        assert ran == [200]
        assert not _paused(control, a)
        assert not _paused(control, b)


def test_a_pause_while_the_replicas_database_is_away_is_a_503_not_a_hang(
    fake: tuple[FakeUpstream, str], postgres_url: str
) -> None:
    """The shared state cannot be read or written (here: its tables are gone): a pause or resume
    through a replica, alone or through a worker, is refused with a 503 in the OpenAI error shape,
    and calls go on as the fleet last decided."""
    upstream, url = fake
    shared = (create_database(postgres_url), {})
    with _two_replicas(url, shared) as (a, b), httpx.Client(limits=FRESH, timeout=30) as control:
        engine = create_engine(shared[0])
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE fleet_control"))
        engine.dispose()
        for replica in (a, b):
            for route in (PAUSE + "?mode=keep", RESUME):
                answer = control.post(replica + route)
                assert answer.status_code == 503
                assert answer.json()["error"]["type"] == "ServiceUnavailableError"
                assert "Traceback" not in answer.text
        assert "/pause?mode=keep" not in upstream.control
        assert control.post(b + CHAT, json=BODY, headers={"X-Trajectory-Id": "on"}).status_code == 200


def test_a_replica_killed_during_a_pause_holds_no_one_up(
    fake: tuple[FakeUpstream, str], postgres_url: str, tmp_path: Path
) -> None:
    """B dies (SIGKILL) while the fleet is paused: once its heartbeat is older than the lease, a resume
    through A no longer waits for it, and A's held calls go."""
    upstream, url = fake
    shared = (create_database(postgres_url), {})
    with _replica(url, shared) as a, httpx.Client(limits=FRESH, timeout=60) as control:
        with serve_process(url, shared[0], **PATIENT) as (doomed, b, _log):
            assert control.post(b + PAUSE + "?mode=keep").status_code == 200
            assert _paused(control, a)
            caller, statuses = _in_background(a, HELD, "held")
            _until(lambda: _in_flight(a) == HELD, "calls not all held")
            doomed.kill()
            doomed.wait(30)
        assert control.post(a + RESUME).status_code == 200
        caller.join(60)
        assert statuses == [200] * HELD
        assert upstream.control.count("/resume") == 1


def test_a_resume_never_writes_an_older_version_over_the_fleets(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    """Two replicas' control planes on one SQLite file, in one process: B sets v3; A, whose own state
    still says v1 (it had not applied v3 yet), resumes. The fleet keeps v3, and A stamps v3."""
    upstream, url = fake
    db_url = _fleet_database(tmp_path)

    async def scenario() -> tuple[dict[str, str | None], str | None, str | None]:
        engine = make_engine(db_url)
        client = upstream_client(Settings(upstream=url, db=db_url))
        loops = [RlLoop(UpstreamBalancer([url]), client, 30, learn_versions=False) for _ in "ab"]
        fleets = [ReplicaFleet(loop.local_control, ControlStore(engine)) for loop in loops]
        try:
            for fleet in fleets:
                assert await fleet.start()
            a, b = loops
            await b.local_control.share_versions({url: "v3"})  # A applies it before this returns
            await a.pause(PauseMode.KEEP)
            a.local_control.state.versions[url] = "v1"  # as if A had not applied v3 yet
            await a.resume()
            row = await asyncio.to_thread(fleets[0].store.read)
            return row.versions, a.weights.current(url), b.weights.current(url)
        finally:
            for fleet in fleets:
                await fleet.stop()
            await client.aclose()
            engine.dispose()

    assert asyncio.run(scenario()) == ({url: "v3"}, "v3", "v3")
    assert upstream.control.count("/resume") == 1


def _fleet_database(tmp_path: Path) -> str:
    """A SQLite file for control planes in this process, migrated."""
    db_url = f"sqlite:///{tmp_path / 'fleet.sqlite'}"
    upgrade_database(db_url)
    return db_url


class _GatedStore(ControlStore):
    """The real store, whose next ``try_lock`` waits (in its thread) until the test lets it go on."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.gated = False
        self.entered = threading.Event()
        self.gate = threading.Event()

    def try_lock(self) -> Any:
        if self.gated:
            self.entered.set()
            assert self.gate.wait(60)
        return super().try_lock()


def _in_process_fleet(
    url: str, db_url: str, stores: list[ControlStore], **fleet_args: float
) -> tuple[list[RlLoop], list[ReplicaFleet], Any]:
    client = upstream_client(Settings(upstream=url, db=db_url))
    loops = [RlLoop(UpstreamBalancer([url]), client, 30, learn_versions=False) for _ in stores]
    fleets = [
        ReplicaFleet(loop.local_control, store, **fleet_args)
        for loop, store in zip(loops, stores, strict=True)
    ]
    return loops, fleets, client


def test_a_request_cancelled_while_taking_the_fleet_lock_lets_it_go(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    """B's pause is cancelled (its client left) while its thread is taking the fleet lock, which it
    then gets: B lets it go at once, so A's pause is not held up for the lock's 10-minute limit."""
    _upstream, url = fake
    db_url = _fleet_database(tmp_path)

    async def scenario() -> bool:
        engine = make_engine(db_url)
        gated = _GatedStore(engine)
        (a, b), fleets, client = _in_process_fleet(url, db_url, [ControlStore(engine), gated])
        try:
            for fleet in fleets:
                assert await fleet.start()
            gated.gated = True
            pausing = asyncio.ensure_future(b.pause(PauseMode.KEEP))
            assert await asyncio.to_thread(gated.entered.wait, 60)
            pausing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pausing
            gated.gated = False
            gated.gate.set()  # the thread takes the lock now, for a request nobody waits for
            await asyncio.wait_for(a.pause(PauseMode.KEEP), 60)
            return a.gate.paused
        finally:
            gated.gate.set()
            for fleet in fleets:
                await fleet.stop()
            await client.aclose()
            engine.dispose()

    assert asyncio.run(scenario())


def test_a_replica_silent_past_its_lease_is_not_waited_for_until_the_acknowledgement_limit(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    """A replica that died without leaving (its row stays, its heartbeat stops) holds a pause up only
    until its lease ends (1 s here), not for the acknowledgement limit (10 minutes here)."""
    _upstream, url = fake
    db_url = _fleet_database(tmp_path)

    async def scenario() -> bool:
        engine = make_engine(db_url)
        store = ControlStore(engine)
        (a,), fleets, client = _in_process_fleet(url, db_url, [store], lease_s=1.0, ack_timeout_s=600.0)
        try:
            assert await fleets[0].start()
            await asyncio.to_thread(store.report, "died-without-leaving", -1, 0, notify=False)
            await asyncio.wait_for(a.pause(PauseMode.KEEP), 60)
            return a.gate.paused
        finally:
            await fleets[0].stop()
            await client.aclose()
            engine.dispose()

    assert asyncio.run(scenario())
