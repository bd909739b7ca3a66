"""Several upstreams: a trajectory sticks to one; when one dies its trajectories move to another."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.conftest import running_proxy
from tests.fake_upstream import FakeUpstream
from tests.servers import serve_in_thread
from tokentrail.proxy.upstream.balancer import UpstreamBalancer, rendezvous_score

CHAT = "/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def test_rendezvous_moves_only_the_trajectories_of_the_upstream_that_left() -> None:
    pool = UpstreamBalancer(["http://a", "http://b", "http://c"])
    before = {f"t{i}": pool.pick(f"t{i}").url for i in range(300)}
    assert set(Counter(before.values())) == {"http://a", "http://b", "http://c"}
    pool.mark_down(pool.upstreams[1], "test")
    after = {t: pool.pick(t).url for t in before}
    moved = {t for t in before if before[t] != after[t]}
    assert moved == {t for t, url in before.items() if url == "http://b"}
    assert "http://b" not in after.values()
    assert rendezvous_score("t1", "http://a") == rendezvous_score("t1", "http://a")


def test_calls_without_a_trajectory_go_to_the_least_busy_upstream() -> None:
    pool = UpstreamBalancer(["http://a", "http://b"])
    pool.upstreams[0].in_flight = 3
    assert pool.pick(None).url == "http://b"


async def _calls(url: str, trajectories: list[str], rounds: int) -> list[int]:
    async with httpx.AsyncClient(timeout=30) as client:

        async def one(trajectory: str, i: int) -> int:
            body = {**BODY, "stream": i % 2 == 0}
            response = await client.post(url + CHAT, json=body, headers={"X-Trajectory-Id": trajectory})
            return response.status_code

        statuses: list[int] = []
        for i in range(rounds):
            statuses += await asyncio.gather(*(one(t, i) for t in trajectories))
        return statuses


def test_a_trajectory_sticks_to_one_upstream_and_moves_when_it_dies(tmp_path: Path) -> None:
    trajectories = [f"traj-{i}" for i in range(12)]
    with ExitStack() as stack:
        first = stack.enter_context(serve_in_thread(FakeUpstream()))
        second_server = ExitStack()
        second = second_server.enter_context(serve_in_thread(FakeUpstream()))
        proxy = stack.enter_context(
            running_proxy(f"{first},{second}", tmp_path, upstream_health_interval_s=0.2)
        )
        assert asyncio.run(_calls(proxy.url, trajectories, 3)) == [200] * 36
        proxy.wait_all_records()
        rows = proxy.rows("SELECT trajectory_id, upstream FROM llm_calls")
        served_by = {}
        for row in rows:
            served_by.setdefault(row["trajectory_id"], set()).add(row["upstream"])
        assert all(len(urls) == 1 for urls in served_by.values()), "a trajectory changed upstream"
        assert {u for urls in served_by.values() for u in urls} == {first, second}
        on_second = {t for t, urls in served_by.items() if urls == {second}}

        statuses: list[int] = []
        runner = threading.Thread(
            target=lambda: statuses.extend(asyncio.run(_calls(proxy.url, trajectories, 6)))
        )
        runner.start()
        assert proxy.runtime.writer.wait_settled(36 + 24, 30), "the calls did not start"
        second_server.close()  # the second vLLM goes away while calls run
        runner.join(60)
        assert len(statuses) == 72
        assert set(statuses) <= {200, 502}, "a call cut by the upstream's death may fail, cleanly"
        proxy.wait_all_records()
        rows = proxy.rows("SELECT trajectory_id, upstream, outcome, seq FROM llm_calls ORDER BY seq")
        assert len(rows) == 36 + 72, "every call is recorded"
        assert all(r["upstream"] in (first, second) for r in rows)
        outcomes = Counter(r["outcome"] for r in rows)
        assert outcomes["ok"] == 36 + statuses.count(200)
        assert set(outcomes) <= {"ok", "upstream_died", "upstream_unreachable"}
        last_round = [r for r in rows if r["seq"] == 8]
        assert len(last_round) == 12
        assert {r["upstream"] for r in last_round} == {first}, "the second upstream's trajectories moved"
        assert {r["trajectory_id"] for r in last_round} >= on_second
        health = httpx.get(proxy.url + "/tokentrail/health").json()
        assert {u["url"]: u["healthy"] for u in health["upstreams"]} == {first: True, second: False}


def test_with_every_upstream_down_the_call_gets_502_and_is_recorded(tmp_path: Path) -> None:
    with ExitStack() as stack:
        dead = [stack.enter_context(serve_in_thread(FakeUpstream())) for _ in range(2)]
    with running_proxy(",".join(dead), tmp_path) as proxy:
        response = httpx.post(proxy.url + CHAT, json=BODY, headers={"X-Trajectory-Id": "t"})
        assert response.status_code == 502
        proxy.wait_all_records()
        (row,) = proxy.rows("SELECT outcome, upstream FROM llm_calls")
        assert row["outcome"] == "upstream_unreachable"
        assert row["upstream"] in dead


@pytest.mark.parametrize("value", ["http://a,http://a", "http://a,ftp://b"])
def test_bad_upstream_lists_are_refused(value: str, tmp_path: Path) -> None:
    from pydantic import ValidationError

    from tokentrail.proxy.settings import Settings

    with pytest.raises(ValidationError):
        Settings(upstream=value)


def test_a_refused_call_moves_to_the_live_upstream_and_the_record_names_it(tmp_path: Path) -> None:
    with ExitStack() as stack:
        dead = stack.enter_context(serve_in_thread(FakeUpstream()))
    with serve_in_thread(FakeUpstream()) as live:
        pool = UpstreamBalancer([dead, live])
        trajectory = next(f"t{i}" for i in range(100) if pool.pick(f"t{i}").url == dead)
        with running_proxy(f"{dead},{live}", tmp_path, upstream_health_interval_s=60) as proxy:
            response = httpx.post(proxy.url + CHAT, json=BODY, headers={"X-Trajectory-Id": trajectory})
            assert response.status_code == 200
            proxy.wait_all_records()
            (row,) = proxy.rows("SELECT upstream, outcome FROM llm_calls")
            assert row == {"upstream": live, "outcome": "ok"}
            health = httpx.get(proxy.url + "/tokentrail/health").json()
            assert {u["url"]: (u["healthy"], u["in_flight"]) for u in health["upstreams"]} == {
                dead: (False, 0),
                live: (True, 0),
            }


def test_a_probe_begun_before_a_call_found_the_upstream_down_does_not_mark_it_healthy() -> None:
    class SlowHealthyClient:
        """Answers every probe 200, once the test lets it."""

        def __init__(self) -> None:
            self.answer = asyncio.Event()
            self.asked = asyncio.Event()

        async def send(self, *args: object, **kwargs: object) -> SlowHealthyClient:
            self.asked.set()
            await self.answer.wait()
            return self

        status_code = 200

        async def aclose(self) -> None:
            pass

    async def test() -> None:
        balancer = UpstreamBalancer(["http://a", "http://b"])
        client = SlowHealthyClient()
        probing = asyncio.create_task(balancer.probe(client))  # type: ignore[arg-type]
        await client.asked.wait()
        balancer.mark_down(balancer.upstreams[1], "UpstreamConnectError")  # a call meanwhile
        client.answer.set()
        await probing
        assert [u.healthy for u in balancer.upstreams] == [True, False]
        await balancer.probe(client)  # type: ignore[arg-type]  # a probe begun after: it counts
        assert [u.healthy for u in balancer.upstreams] == [True, True]

    asyncio.run(test())
