"""Durable mode: the end of a recorded response waits until its record is stored.

The checks read the database the moment the client has the whole answer, without waiting for the
writer: without durable mode the record is usually still in the writer's 20 ms gather window.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

from tests.conftest import ProxyFactory
from tests.fake_upstream import FakeUpstream

CHAT = "/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}


def _stored_response_ids(db_url: str) -> list[str]:
    engine = create_engine(db_url)
    with engine.connect() as connection:
        ids = connection.execute(text("SELECT response_id FROM llm_calls")).scalars().all()
    engine.dispose()
    return list(ids)


def test_a_finished_answer_is_already_in_the_database(
    fake: tuple[FakeUpstream, str], proxy_factory: ProxyFactory
) -> None:
    with proxy_factory(fake[1], durable=True, writer_batch_size=50) as proxy:
        whole = httpx.post(proxy.url + CHAT, json=BODY, headers={"X-Trajectory-Id": "d"})
        assert _stored_response_ids(proxy.db_url) == [whole.json()["id"]]
        with httpx.stream(
            "POST", proxy.url + CHAT, json={**BODY, "stream": True}, headers={"X-Trajectory-Id": "d"}
        ) as streamed:
            lines = list(streamed.iter_lines())
            first = json.loads(lines[0].removeprefix("data: "))
        assert first["id"] in _stored_response_ids(proxy.db_url)
        seqs = proxy.rows("SELECT seq FROM llm_calls ORDER BY seq")
        assert seqs == [{"seq": 0}, {"seq": 1}]


def test_when_the_database_refuses_the_answer_still_ends_and_the_record_is_in_the_fallback_file(
    fake: tuple[FakeUpstream, str], proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    with proxy_factory(fake[1], durable=True, writer_retries=0) as proxy:
        engine = create_engine(proxy.db_url)
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE completions"))
        engine.dispose()
        response = httpx.post(proxy.url + CHAT, json=BODY, headers={"X-Trajectory-Id": "d"}, timeout=30)
        assert response.status_code == 200
        (line,) = (tmp_path / "fallback.jsonl").read_text().splitlines()  # there already, no waiting
        assert json.loads(line)["response_id"] == response.json()["id"]
