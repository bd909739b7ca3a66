"""``/tokentrail/metrics``: parsed with prometheus_client's own parser and held against the database."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from tests.conftest import Proxy, running_proxy
from tests.fake_upstream import FakeUpstream
from tests.test_relay_fake import _open_request
from tests.test_workers import FRESH, _children, _load, _two_workers, _wait_rows, _workers_seen
from tokentrail.proxy.metrics import catalog, persisted, snapshot
from tokentrail.proxy.metrics.calls import label_key
from tokentrail.proxy.server.worker_state import state_path
from tokentrail.proxy.server.workers import worker_spool_path

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "secret prompt text"}], "max_tokens": 3}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, client: httpx.Client | None = None) -> tuple[Samples, dict[str, str]]:
    """Every sample of a scrape, keyed by (sample name, labels); and each family's type."""
    response = (client or httpx).get(url + "/tokentrail/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    kinds: dict[str, str] = {}
    for family in text_string_to_metric_families(response.text):
        kinds[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, kinds


def by_label(samples: Samples, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """The samples called ``name``, keyed by the values of ``labels`` (summed over the others)."""
    found: Counter[tuple[str, ...]] = Counter()
    for (sample, sample_labels), value in samples.items():
        if sample == name:
            as_dict = dict(sample_labels)
            found[tuple(as_dict[label] for label in labels)] += value  # type: ignore[assignment]
    return dict(found)


def db_rows(db_url: str, sql: str) -> list[tuple[Any, ...]]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql))]
    finally:
        engine.dispose()


def _mixed_load(upstream: FakeUpstream, proxy: Proxy) -> None:
    """Calls that end every common way: ok (streamed or not, both routes), upstream errors, a stream
    the upstream cuts, a client that hangs up."""
    with httpx.Client(timeout=30) as client:
        for i in range(4):
            headers = {"X-Trajectory-Id": "metrics-a"}
            assert client.post(proxy.url + CHAT, json=BODY, headers=headers).status_code == 200, i
        streamed = dict(BODY, stream=True, stream_options={"include_usage": True})
        for _ in range(3):
            assert client.post(proxy.url + CHAT, json=streamed).status_code == 200
        completion = {"model": "tiny", "prompt": "secret", "max_tokens": 5}
        assert client.post(proxy.url + COMPLETIONS, json=completion).status_code == 200
        for _ in range(2):
            response = client.post(proxy.url + CHAT, json=BODY, headers={"x-fake": "status:500"})
            assert response.status_code == 500
        try:
            with client.stream(
                "POST", proxy.url + CHAT, json=dict(BODY, stream=True), headers={"x-fake": "die-mid-stream"}
            ) as response:
                for _ in response.iter_raw():
                    pass
        except httpx.RemoteProtocolError:
            pass
    sock = _open_request(proxy.url, BODY, {"x-fake": "hang", "X-Trajectory-Id": "metrics-gone"})
    assert upstream.hanging.acquire(timeout=10), "the call never reached the upstream"
    sock.close()
    assert upstream.cancelled.acquire(timeout=10)
    proxy.wait_all_records()


def test_metrics_agree_with_the_database_after_a_mixed_load(
    fake: tuple[FakeUpstream, str], tmp_path: Path, db_url: str
) -> None:
    upstream, url = fake
    with running_proxy(url, tmp_path, db_url=db_url) as proxy:
        _mixed_load(upstream, proxy)
        samples, kinds = scrape(proxy.url)

    calls = {
        (route, outcome, integrity): float(n)
        for route, outcome, integrity, n in db_rows(
            db_url, "SELECT route, outcome, integrity, count(*) FROM llm_calls GROUP BY 1, 2, 3"
        )
    }
    assert {o for _r, o, _i in calls} == {"ok", "upstream_error", "upstream_died", "client_disconnected"}
    assert by_label(samples, "tokentrail_calls_total", "route", "outcome", "integrity") == calls
    tokens = db_rows(
        db_url,
        "SELECT route, sum(coalesce(prompt_tokens, 0)), sum(coalesce(completion_tokens, 0)), "
        "count(upstream_first_byte_at), count(finished_at) FROM llm_calls GROUP BY route",
    )
    assert by_label(samples, "tokentrail_prompt_tokens_total", "route") == {
        (r,): float(p) for r, p, *_ in tokens
    }
    assert by_label(samples, "tokentrail_generated_tokens_total", "route") == {
        (r,): float(g) for r, _p, g, *_ in tokens
    }
    first_token = by_label(samples, "tokentrail_upstream_first_token_seconds_count", "route")
    assert first_token == {(r,): float(f) for r, _p, _g, f, _d in tokens if f}
    duration = by_label(samples, "tokentrail_call_duration_seconds_count", "route")
    assert duration == {(r,): float(d) for r, *_, d in tokens}
    # the proxy's own time is known for every call whose answer came to its end (ok and vLLM errors)
    added = by_label(samples, "tokentrail_added_latency_seconds_count", "route")
    ended = db_rows(
        db_url,
        "SELECT route, count(*) FROM llm_calls WHERE outcome IN ('ok', 'upstream_error') GROUP BY route",
    )
    assert added == {(r,): float(n) for r, n in ended}
    # a histogram's +Inf bucket holds every observation
    inf = by_label(samples, "tokentrail_call_duration_seconds_bucket", "route", "le")
    assert {(r,): v for (r, le), v in inf.items() if le == "+Inf"} == duration

    (count,) = db_rows(db_url, "SELECT count(*) FROM llm_calls")[0]
    assert samples[("tokentrail_records_written_total", frozenset())] == count == 12
    for name in ("spooled", "replayed", "lost", "refused"):
        assert samples[(f"tokentrail_records_{name}_total", frozenset())] == 0
    assert samples[("tokentrail_writer_queue_depth", frozenset())] == 0
    assert samples[("tokentrail_in_flight_calls", frozenset())] == 0
    assert samples[("tokentrail_spool_bytes", frozenset())] == 0
    assert samples[("tokentrail_upstream_up", frozenset({("upstream", url)}))] == 1
    assert samples[("tokentrail_upstream_in_flight", frozenset({("upstream", url)}))] == 0
    # every catalogued metric is there with its declared type, even the ones without samples yet
    assert kinds == {m.name: str(m.kind) for m in catalog.ALL}
    # nothing unbounded or private in a label: no trajectory ids, no prompt or response text
    values = {value for _name, labels in samples for _key, value in labels}
    assert not values & {"metrics-a", "metrics-gone"}
    assert not any("secret" in value or "t10" in value for value in values)


def test_metrics_of_two_workers_add_up_whichever_answers(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with _two_workers(fake[1], db_url, TOKENTRAIL_FALLBACK_PATH=str(tmp_path / "spool.jsonl")) as (_p, proxy):

        async def load() -> None:
            async with httpx.AsyncClient(limits=FRESH, timeout=60) as client:

                async def one(i: int) -> None:
                    headers = {"X-Trajectory-Id": f"w-{i % 5}"}
                    if i % 10 == 9:
                        headers["x-fake"] = "status:503"
                    await client.post(proxy + CHAT, json=dict(BODY, stream=i % 2 == 0), headers=headers)

                await asyncio.gather(*(one(i) for i in range(60)))

        asyncio.run(load())
        _wait_rows(db_url, 60)
        calls = {
            (outcome, integrity): float(n)
            for outcome, integrity, n in db_rows(
                db_url, "SELECT outcome, integrity, count(*) FROM llm_calls GROUP BY 1, 2"
            )
        }
        (prompt_tokens,) = db_rows(db_url, "SELECT sum(prompt_tokens) FROM llm_calls")[0]
        with httpx.Client(limits=FRESH, timeout=30) as client:
            # each worker publishes every second: wait until both answers include the other's last calls
            deadline = time.monotonic() + 30
            agreed = 0
            while agreed < 6:  # six fresh connections in a row, so both workers answered
                samples, _kinds = scrape(proxy, client)
                health = client.get(proxy + "/tokentrail/health").json()
                written = [w["records_written"] for w in health["workers"]]
                if _calls_by_outcome(samples) == calls and sum(written) == 60:
                    agreed += 1
                else:
                    agreed = 0
                assert time.monotonic() < deadline, "the workers' figures never added up to the database's"
    assert all(written), f"one worker recorded nothing ({written}); the test proves nothing"
    assert samples[("tokentrail_records_written_total", frozenset())] == 60
    assert samples[("tokentrail_prompt_tokens_total", frozenset({("route", CHAT)}))] == prompt_tokens
    assert samples[("tokentrail_workers_reporting", frozenset())] == 2


def _calls_by_outcome(samples: Samples) -> dict[tuple[str, ...], float]:
    return by_label(samples, "tokentrail_calls_total", "outcome", "integrity")


def test_counts_never_go_down_when_a_worker_is_killed_and_equal_the_database(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    """A replaced worker starts from nothing: counts held in its memory would fall with it."""
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with _two_workers(fake[1], db_url, TOKENTRAIL_FALLBACK_PATH=str(tmp_path / "spool.jsonl")) as (
        process,
        proxy,
    ):
        asyncio.run(_load(proxy, 40, 4))
        _wait_rows(db_url, 40)
        with httpx.Client(limits=FRESH, timeout=30) as client:
            before = _calls_by_outcome(scrape(proxy, client)[0])
            assert sum(before.values()) == 40
            victim = min(_children(process.pid))
            os.kill(victim, signal.SIGKILL)
            assert _workers_seen(proxy, {0, 1}) == {0, 1}  # the replacement answers too
            for _ in range(6):  # fresh connections: both workers answer
                assert _calls_by_outcome(scrape(proxy, client)[0]) == before
            asyncio.run(_load(proxy, 20, 4))
            _wait_rows(db_url, 60)
            samples = scrape(proxy, client)[0]
    calls = {
        (outcome, integrity): float(n)
        for outcome, integrity, n in db_rows(
            db_url, "SELECT outcome, integrity, count(*) FROM llm_calls GROUP BY 1, 2"
        )
    }
    assert _calls_by_outcome(samples) == calls
    assert samples[("tokentrail_records_written_total", frozenset())] == 60


def _as_worker_0_of_2_beside(
    fake_url: str, tmp_path: Path, sibling: dict[str, dict[str, float]], age_s: float
) -> Samples:
    """A scrape of worker 0 of ``serve --workers 2`` whose sibling last published ``sibling``,
    ``age_s`` seconds ago (worker 1 itself is not running: only its published file is read)."""
    spool = tmp_path / "fallback.jsonl"  # running_proxy's
    with running_proxy(fake_url, tmp_path, worker=0, workers=2) as proxy:
        published = state_path(worker_spool_path(spool, 1), snapshot.KIND)
        published.write_text(json.dumps(sibling))
        then = time.time() - age_s
        os.utime(published, (then, then))
        assert httpx.post(proxy.url + CHAT, json=BODY).status_code == 200
        proxy.wait_all_records()
        samples, _kinds = scrape(proxy.url)
    return samples


def test_a_stopped_workers_counters_still_count_but_its_gauges_do_not(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    sibling = {
        catalog.RECORDS_SPOOLED.name: {label_key(): 40.0},
        catalog.CALLS.name: {label_key(CHAT, "ok", "ok"): 99.0},  # (an old worker's own count)
        catalog.IN_FLIGHT.name: {label_key(): 7.0},
        catalog.QUEUE_DEPTH.name: {label_key(): 5.0},
        catalog.UPSTREAM_UP.name: {fake[1]: 0.0},
    }
    samples = _as_worker_0_of_2_beside(fake[1], tmp_path, sibling, age_s=60)
    assert samples[("tokentrail_records_spooled_total", frozenset())] == 40  # a counter never goes back
    assert sum(_calls_by_outcome(samples).values()) == 1  # calls are the database's count, not a file's
    assert samples[("tokentrail_in_flight_calls", frozenset())] == 0  # a stopped worker relays nothing
    assert samples[("tokentrail_writer_queue_depth", frozenset())] == 0
    assert samples[("tokentrail_upstream_up", frozenset({("upstream", fake[1])}))] == 1


def test_an_upstream_any_worker_sees_down_is_down(fake: tuple[FakeUpstream, str], tmp_path: Path) -> None:
    sibling = {
        catalog.UPSTREAM_UP.name: {fake[1]: 0.0},
        catalog.IN_FLIGHT.name: {label_key(): 2.0},
    }
    samples = _as_worker_0_of_2_beside(fake[1], tmp_path, sibling, age_s=0)
    assert samples[("tokentrail_upstream_up", frozenset({("upstream", fake[1])}))] == 0
    assert samples[("tokentrail_in_flight_calls", frozenset())] == 2  # a live sibling's gauges add up


def test_metrics_are_open_unless_told_to_require_the_key(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    with running_proxy(fake[1], tmp_path, api_key="k") as proxy:
        assert httpx.get(proxy.url + "/tokentrail/metrics").status_code == 200
    with running_proxy(fake[1], tmp_path, api_key="k", metrics_require_key=True) as proxy:
        assert httpx.get(proxy.url + "/tokentrail/metrics").status_code == 401
        response = httpx.get(proxy.url + "/tokentrail/metrics", headers={"Authorization": "Bearer k"})
        assert response.status_code == 200
        assert "# TYPE tokentrail_calls_total counter" in response.text


def test_a_scrape_while_the_database_cannot_be_read_serves_the_last_counts_and_says_so(
    fake: tuple[FakeUpstream, str], tmp_path: Path, monkeypatch: Any
) -> None:
    """The spool, queue and upstream figures are the alerts for a database outage: they must come."""
    with running_proxy(fake[1], tmp_path) as proxy:
        assert httpx.post(proxy.url + CHAT, json=BODY).status_code == 200
        proxy.wait_all_records()
        before, _ = scrape(proxy.url)
        assert before[("tokentrail_metric_counts_stale", frozenset())] == 0

        def unreadable(*args: Any) -> Any:
            raise OperationalError("SELECT", {}, Exception("database is locked"))

        monkeypatch.setattr(persisted, "read_counts", unreadable)
        during, _ = scrape(proxy.url)
    assert during[("tokentrail_metric_counts_stale", frozenset())] == 1
    assert _calls_by_outcome(during) == _calls_by_outcome(before) == {("ok", "ok"): 1.0}
    assert ("tokentrail_spool_bytes", frozenset()) in during
