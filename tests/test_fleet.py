"""Pause, resume and policy versions across ``serve --workers``: real supervisor and worker processes,
a fresh connection per call (so the kernel spreads calls, pauses and resumes over the workers).

Each test fails on a proxy whose workers each keep their own gate and versions: a resume that reaches
another worker than the pause leaves the pausing worker's calls held, and a version set through one
worker is unknown to the others.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

import httpx
import pytest

from tests.fake_upstream import FakeUpstream
from tests.test_metrics import db_rows
from tests.test_serve import BODY, CHAT, serve_process
from tests.test_workers import FRESH, _children, _workers_seen
from tests.test_workers import _wait_rows as wait_rows
from tokentrail.proxy.fleet.hub import ControlHub
from tokentrail.proxy.fleet.link import FleetLink
from tokentrail.proxy.recording.records import CallRecord
from tokentrail.proxy.rl.control import SupersededError
from tokentrail.proxy.rl.loop import RlLoop
from tokentrail.proxy.rl.pause import PauseMode
from tokentrail.proxy.settings import Settings
from tokentrail.proxy.upstream.balancer import UpstreamBalancer
from tokentrail.proxy.upstream.configured import upstream_client

WORKERS = "3"
HELD = 12
PAUSE = "/tokentrail/v1/pause"
RESUME = "/tokentrail/v1/resume"


def _in_flight(proxy: str) -> int:
    """Calls open at the proxy, over every worker (each publishes every second)."""
    with httpx.Client(limits=FRESH, timeout=30) as client:
        return int(client.get(proxy + "/tokentrail/health").json()["in_flight"])


def _until(condition: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


async def _calls(proxy: str, count: int, prefix: str) -> list[int]:
    async with httpx.AsyncClient(limits=FRESH, timeout=60) as client:

        async def one(i: int) -> int:
            headers = {"X-Trajectory-Id": f"{prefix}-{i}"}
            return (await client.post(proxy + CHAT, json=BODY, headers=headers)).status_code

        return list(await asyncio.gather(*(one(i) for i in range(count))))


def _versions(db_url: str, prefix: str) -> list[str]:
    return [
        r[0]
        for r in db_rows(
            db_url, f"SELECT weight_version FROM llm_calls WHERE trajectory_id LIKE '{prefix}-%'"
        )
    ]


def _in_background(proxy: str, count: int, prefix: str) -> tuple[threading.Thread, list[int]]:
    """``count`` calls sent at once from a thread; their statuses land in the list."""
    statuses: list[int] = []
    thread = threading.Thread(target=lambda: statuses.extend(asyncio.run(_calls(proxy, count, prefix))))
    thread.start()
    return thread, statuses


def _all_workers_say(client: httpx.Client, proxy: str, field: str, value: Any) -> bool:
    """Every worker (fresh connections until each of them answered) agrees on the pause state's
    ``field``."""
    agreed: set[int] = set()
    deadline = time.monotonic() + 60
    while agreed != {0, 1, 2}:
        state = client.get(proxy + PAUSE).json()
        if state[field] != value:
            return False
        agreed.add(state["worker"])
        assert time.monotonic() < deadline, f"only workers {agreed} answered"
    return True


def _held_then_resumed(
    upstream: FakeUpstream,
    control: httpx.Client,
    proxy: str,
    prefix: str,
    while_held: Any = None,
) -> None:
    """``HELD`` calls sent while the fleet is paused: all held (none reached vLLM), then ``while_held``,
    then a resume, after which every one is answered (a worker nobody resumed would hold its calls
    for the two minutes of ``TOKENTRAIL_PAUSE_MAX_WAIT_S``)."""
    caller, statuses = _in_background(proxy, HELD, prefix)
    _until(lambda: _in_flight(proxy) == HELD, "calls not all held")
    assert "/v1/chat/completions" not in [r["path"] for r in upstream.requests]
    if while_held is not None:
        while_held()
    assert control.post(proxy + RESUME).status_code == 200
    caller.join(30)
    assert statuses == [200] * HELD


def test_calls_held_by_a_pause_on_any_worker_go_when_any_worker_resumes_with_the_new_version(
    fake: tuple[FakeUpstream, str], tmp_path: Any
) -> None:
    upstream, url = fake
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    # held calls would wait two minutes at a worker nobody resumed: longer than the test allows them
    with serve_process(url, db_url, TOKENTRAIL_WORKERS=WORKERS, TOKENTRAIL_PAUSE_MAX_WAIT_S="120") as (
        process,
        proxy,
        _log,
    ):
        assert _workers_seen(proxy, {0, 1, 2}) == {0, 1, 2}
        with httpx.Client(limits=FRESH, timeout=30) as control:
            assert control.post(proxy + PAUSE + "?mode=keep").status_code == 200

            def set_version() -> None:
                version = control.post(proxy + "/update_weight_version", json={"new_version": "v2"})
                assert version.status_code == 200
                assert _all_workers_say(control, proxy, "paused", True)

            _held_then_resumed(upstream, control, proxy, "held", while_held=set_version)
            assert _all_workers_say(control, proxy, "paused", False)
        wait_rows(db_url, HELD)
        assert process.poll() is None
    assert _versions(db_url, "held") == ["v2"] * HELD
    assert upstream.control.count("/pause?mode=keep") == 1
    assert upstream.control.count("/resume") == 1


def test_a_version_set_through_one_worker_is_known_to_every_worker_before_its_answer(
    fake: tuple[FakeUpstream, str], tmp_path: Any
) -> None:
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with serve_process(fake[1], db_url, TOKENTRAIL_WORKERS=WORKERS) as (_process, proxy, _log):
        assert _workers_seen(proxy, {0, 1, 2}) == {0, 1, 2}
        with httpx.Client(limits=FRESH, timeout=30) as client:
            learned = {fake[1]: "default"}
            _until(lambda: _all_workers_say(client, proxy, "weight_versions", learned), "no version at start")
            answer = client.post(proxy + "/update_weight_version", json={"new_version": "step-7"})
            assert answer.status_code == 200
        assert asyncio.run(_calls(proxy, HELD, "after")) == [200] * HELD
        wait_rows(db_url, HELD)
    assert _versions(db_url, "after") == ["step-7"] * HELD


def test_a_worker_restarted_during_a_pause_holds_its_calls_too(
    fake: tuple[FakeUpstream, str], tmp_path: Any
) -> None:
    upstream, url = fake
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with serve_process(url, db_url, TOKENTRAIL_WORKERS=WORKERS, TOKENTRAIL_PAUSE_MAX_WAIT_S="120") as (
        process,
        proxy,
        _log,
    ):
        assert _workers_seen(proxy, {0, 1, 2}) == {0, 1, 2}
        with httpx.Client(limits=FRESH, timeout=30) as control:
            assert control.post(proxy + PAUSE + "?mode=keep").status_code == 200
            victim = min(_children(process.pid))
            os.kill(victim, signal.SIGKILL)
            _until(lambda: len(_children(process.pid) - {victim}) == 3, "the worker was not replaced")
            assert _workers_seen(proxy, {0, 1, 2}) == {0, 1, 2}
            _held_then_resumed(upstream, control, proxy, "late")
        wait_rows(db_url, HELD)


def test_two_requests_of_one_worker_in_flight_at_once_are_both_answered(
    fake: tuple[FakeUpstream, str], tmp_path: Any
) -> None:
    """A worker's wait pause still drains when its resume comes; the pause ends first (409), and the
    resume must still get its own answer (the supervisor's real control plane, over its socket)."""
    settings = Settings(upstream=fake[1], db=f"sqlite:///{tmp_path / 'db.sqlite'}")
    hub = ControlHub(settings)
    hub.start()

    async def pause_then_resume() -> None:
        client = upstream_client(settings)
        loop = RlLoop(UpstreamBalancer(settings.upstreams), client, pause_max_wait_s=30)
        link = FleetLink(hub.path, loop)
        await link.start()
        running = loop.begin(CallRecord("c", "t", CHAT, time.time()), fake[1], None, lambda: 0)
        pausing = asyncio.ensure_future(loop.pause(PauseMode.WAIT))

        async def paused() -> None:
            while not loop.gate.paused:  # noqa: ASYNC110 - closed by the control plane's command
                await asyncio.sleep(0.01)

        await asyncio.wait_for(paused(), 30)  # (a gate that never closes fails, not hangs)
        await asyncio.wait_for(loop.resume(), 10)
        with pytest.raises(SupersededError):
            await asyncio.wait_for(pausing, 10)
        assert not loop.gate.paused
        loop.end(running, 0)
        await link.aclose()
        await client.aclose()

    try:
        asyncio.run(pause_then_resume())
    finally:
        hub.stop()
    assert "/pause?mode=wait" not in fake[0].control
