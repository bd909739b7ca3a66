"""The RL loop on the real CPU vLLM (started with VLLM_SERVER_DEV_MODE=1): versions learned from the
control calls and from /weight_info, a fleet paused and resumed through TokenTrail with agents
running, an abort pause, and several upstreams paused together.

Every test leaves vLLM resumed. Orderings are made by the test (agents wait for the pause before
their next call), never by timing; where vLLM's own timing decides (whether an abort reaches a call
before it ends) the test checks that the record agrees with what the client saw.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Proxy, running_proxy
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.vllm

CHAT = "/v1/chat/completions"


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}


def _until(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def _version(vllm_url: str) -> str:
    version: str = httpx.get(vllm_url + "/weight_info").json()["weight_version"]
    return version


@pytest.fixture
def resumed(vllm_url: str) -> Iterator[None]:
    try:
        yield
    finally:
        httpx.post(vllm_url + "/resume", timeout=60)


def test_versions_follow_updates_through_the_proxy_and_a_new_proxy_asks_vllm(
    vllm_url: str, tmp_path: Path
) -> None:
    before = _version(vllm_url)
    with running_proxy(vllm_url, tmp_path) as proxy:
        _until(
            lambda: (
                httpx.get(proxy.url + "/tokentrail/v1/pause").json()["weight_versions"][vllm_url] == before
            )
        )
        headers = {"X-Trajectory-Id": "versions"}
        assert httpx.post(proxy.url + CHAT, json=_body(), headers=headers, timeout=60).status_code == 200
        after = f"{before}+1"
        update = httpx.post(proxy.url + "/update_weight_version", json={"new_version": after}, timeout=60)
        assert update.status_code == 200
        assert _version(vllm_url) == after
        assert httpx.post(proxy.url + CHAT, json=_body(), headers=headers, timeout=60).status_code == 200
        proxy.wait_all_records()
        rows = proxy.rows("SELECT weight_version FROM llm_calls ORDER BY seq")
    assert [r["weight_version"] for r in rows] == [before, after]
    with running_proxy(vllm_url, tmp_path / "restarted") as restarted:  # never saw the update
        _until(
            lambda: (
                httpx.get(restarted.url + "/tokentrail/v1/pause").json()["weight_versions"][vllm_url] == after
            )
        )


def test_sixteen_agents_run_through_a_pause_an_update_and_a_resume_and_none_is_lost(
    vllm_url: str, tmp_path: Path, resumed: None
) -> None:
    agents = 16
    with running_proxy(vllm_url, tmp_path, pause_max_wait_s=120) as proxy:
        _until(
            lambda: (
                httpx.get(proxy.url + "/tokentrail/v1/pause").json()["weight_versions"][vllm_url] is not None
            )
        )
        old = _version(vllm_url)
        first_done = threading.Barrier(agents + 1)
        paused = threading.Event()
        statuses: list[int] = []
        lock = threading.Lock()

        def agent(i: int) -> None:
            headers = {"X-Trajectory-Id": f"agent-{i}"}
            for turn in range(3):
                if turn == 1:
                    first_done.wait(120)
                    assert paused.wait(120)
                response = httpx.post(
                    proxy.url + CHAT, json=_body(stream=i % 2 == 0), headers=headers, timeout=120
                )
                with lock:
                    statuses.append(response.status_code)

        threads = [threading.Thread(target=agent, args=(i,)) for i in range(agents)]
        for thread in threads:
            thread.start()
        first_done.wait(120)  # every agent has made its first call
        pause = httpx.post(proxy.url + "/tokentrail/v1/pause?mode=wait", timeout=120).json()
        assert pause["paused"] is True
        assert httpx.get(vllm_url + "/is_paused").json() == {"is_paused": True}
        paused.set()
        _until(lambda: httpx.get(proxy.url + "/tokentrail/v1/pause").json()["held_now"] == agents)
        new = f"{old}+pause"
        httpx.post(
            proxy.url + "/update_weight_version", json={"new_version": new}, timeout=60
        ).raise_for_status()
        state = httpx.post(proxy.url + "/tokentrail/v1/resume", timeout=120).json()
        for thread in threads:
            thread.join(120)
        state = httpx.get(proxy.url + "/tokentrail/v1/pause").json()  # the waits, now that they ended
        proxy.wait_all_records()
        rows = proxy.rows(
            "SELECT trajectory_id, seq, outcome, weight_version FROM llm_calls ORDER BY trajectory_id, seq"
        )
    assert httpx.get(vllm_url + "/is_paused").json() == {"is_paused": False}
    assert statuses == [200] * (3 * agents)
    assert len(rows) == 3 * agents
    assert all(r["outcome"] == "ok" for r in rows)
    assert [r["weight_version"] for r in rows if r["seq"] == 0] == [old] * agents
    assert [r["weight_version"] for r in rows if r["seq"] > 0] == [new] * (2 * agents)
    assert state["held_total"] == agents
    print(
        f"\npause: {state['held_total']} calls held, longest wait {state['longest_wait_s']:.2f} s, none lost"
    )


def test_a_call_an_abort_pause_cuts_is_recorded_as_aborted(
    vllm_url: str, tmp_path: Path, resumed: None
) -> None:
    """The tiny model generates 1,900 tokens faster than a pause can reach it, so the call is sent
    while vLLM is paused with ``keep`` (it queues), and then TokenTrail pauses with ``abort``. Whether
    vLLM had queued the request when the abort came is vLLM's timing: one that was not yet queued
    runs after the resume and must be recorded ``ok``. The test tries up to three calls until one is
    cut, so it always checks an abort, and holds every call to what happened to it."""
    body = _body(max_tokens=1900, ignore_eos=True, stream=True, return_token_ids=True)
    seen: list[tuple[bool, str]] = []
    with running_proxy(vllm_url, tmp_path) as proxy:
        for attempt in range(3):
            lines: list[str] = []
            trajectory = f"aborted-{attempt}"

            def stream(trajectory: str, lines: list[str]) -> None:
                headers = {"X-Trajectory-Id": trajectory}
                with httpx.stream(
                    "POST", proxy.url + CHAT, json=body, headers=headers, timeout=120
                ) as response:
                    lines.extend(response.iter_lines())

            httpx.post(vllm_url + "/pause?mode=keep", timeout=120).raise_for_status()
            reader = threading.Thread(target=stream, args=(trajectory, lines))
            reader.start()
            _until(lambda: _upstream_in_flight(proxy) == 1)  # sent to vLLM
            httpx.post(proxy.url + "/tokentrail/v1/pause?mode=abort", timeout=120).raise_for_status()
            httpx.post(proxy.url + "/tokentrail/v1/resume", timeout=120).raise_for_status()
            reader.join(120)
            proxy.wait_all_records()
            (row,) = proxy.rows("SELECT outcome FROM llm_calls WHERE trajectory_id = :t", t=trajectory)
            finishes = [
                choice.get("finish_reason")
                for line in lines
                if line.startswith("data: {")
                for choice in json.loads(line[6:])["choices"]
            ]
            cut = "length" not in finishes  # vLLM ended it before its 1,900 tokens
            seen.append((cut, row["outcome"]))
            if cut:
                break
    print(f"\nabort pause: (cut, recorded) per call: {seen}")
    assert seen[-1][0], "no call was cut by the abort pause in three tries"
    assert all(outcome == ("aborted" if cut else "ok") for cut, outcome in seen), seen


def _upstream_in_flight(proxy: Proxy) -> int:
    health = httpx.get(proxy.url + "/tokentrail/health", timeout=30).json()
    return sum(u["in_flight"] for u in health["upstreams"])


def test_several_upstreams_are_paused_and_resumed_together(
    vllm_url: str, fake: tuple[FakeUpstream, str], tmp_path: Path, resumed: None
) -> None:
    with running_proxy(f"{vllm_url},{fake[1]}", tmp_path) as proxy:
        paused = httpx.post(proxy.url + "/tokentrail/v1/pause?mode=keep", timeout=120).json()
        assert sorted((a["upstream"], a["status"]) for a in paused["upstreams"]) == sorted(
            [(vllm_url, 200), (fake[1], 200)]
        )
        assert httpx.get(vllm_url + "/is_paused").json() == {"is_paused": True}
        resumed_state = httpx.post(proxy.url + "/tokentrail/v1/resume", timeout=120).json()
    assert resumed_state["paused"] is False
    assert httpx.get(vllm_url + "/is_paused").json() == {"is_paused": False}
    assert fake[0].control[-3:] == ["/pause?mode=keep", "/resume", "/weight_info"]


def test_two_replicas_on_postgresql_pause_and_resume_the_real_vllm_as_one_fleet(
    vllm_url: str, postgres_url: str, resumed: None
) -> None:
    """Two ``serve`` replicas on one PostgreSQL in front of the real vLLM: a pause through A holds the
    calls sent to both, a version set and a resume through B let them all go, every one recorded
    with the new version (``proxy/fleet/replicas.py``; the fake-vLLM variants and the failure paths
    are in ``tests/test_replica_control.py``)."""
    from tests.postgres import create_database
    from tests.test_fleet import PAUSE, RESUME, _in_background, _in_flight, _versions
    from tests.test_serve import serve_process
    from tests.test_workers import FRESH
    from tests.test_workers import _wait_rows as wait_rows

    db_url = create_database(postgres_url)
    after = f"{_version(vllm_url)}+replicas"
    held = 4
    patient = {"TOKENTRAIL_PAUSE_MAX_WAIT_S": "120"}
    with (
        serve_process(vllm_url, db_url, **patient) as (_a, a, _la),
        serve_process(vllm_url, db_url, **patient) as (_b, b, _lb),
        httpx.Client(limits=FRESH, timeout=60) as control,
    ):
        assert control.post(a + PAUSE + "?mode=keep").status_code == 200
        assert control.get(b + PAUSE).json()["paused"]
        at_a, statuses_a = _in_background(a, held, "real-a")
        at_b, statuses_b = _in_background(b, held, "real-b")
        _until(lambda: _in_flight(a) == held and _in_flight(b) == held)
        assert control.post(b + "/update_weight_version", json={"new_version": after}).status_code == 200
        assert control.post(b + RESUME).status_code == 200
        at_a.join(120)
        at_b.join(120)
        assert statuses_a == statuses_b == [200] * held
        wait_rows(db_url, 2 * held)
    assert _versions(db_url, "real-a") == _versions(db_url, "real-b") == [after] * held
    assert _version(vllm_url) == after
