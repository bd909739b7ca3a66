"""The trajectory API under /tokentrail/v1 with a real proxy and SQLite file (fake upstream)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.conftest import Proxy, ProxyFactory, running_proxy
from tests.fake_upstream import PROMPT_IDS, FakeUpstream

CHAT = "/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
API = "/tokentrail/v1/trajectories"


@pytest.fixture
def fake_proxy(fake: tuple[FakeUpstream, str], tmp_path: Path, db_url: str) -> Iterator[Proxy]:
    """The proxy on SQLite and on PostgreSQL: the API's queries must work on both."""
    with running_proxy(fake[1], tmp_path, db_url=db_url) as proxy:
        yield proxy


def _call(proxy: Proxy, trajectory_id: str, tags: str | None = None, **extra: object) -> None:
    headers = {"X-Trajectory-Id": trajectory_id}
    if tags is not None:
        headers["X-Trajectory-Tags"] = tags
    response = httpx.post(proxy.url + CHAT, json={**BODY, **extra}, headers=headers)
    assert response.status_code == 200, response.text


def test_tags_from_the_header_reward_finish_and_filters(fake_proxy: Proxy) -> None:
    _call(fake_proxy, "a", "env=test,task=math-1")
    _call(fake_proxy, "a", "task=math-2")
    _call(fake_proxy, "b", "env=prod")
    fake_proxy.wait_all_records()
    rewarded = httpx.post(
        fake_proxy.url + API + "/a/reward", json={"reward": 0.5, "metadata": {"judge": "x"}}
    )
    assert rewarded.status_code == 200
    assert rewarded.json()["reward"] == 0.5
    assert rewarded.json()["metadata"] == {"judge": "x"}
    assert rewarded.json()["tags"] == {"env": "test", "task": "math-2"}
    assert httpx.post(fake_proxy.url + API + "/a/finish").json()["finished"] is True

    def ids(**params: object) -> list[str]:
        response = httpx.get(fake_proxy.url + API, params=params)  # type: ignore[arg-type]
        assert response.status_code == 200, response.text
        return [t["id"] for t in response.json()["data"]]

    assert ids() == ["a", "b"]
    assert ids(tag="env=prod") == ["b"]
    assert ids(tag=["env=test", "task=math-2"]) == ["a"]
    assert ids(finished="true") == ["a"]
    assert ids(finished="false") == ["b"]
    assert ids(has_reward="true") == ["a"]
    assert ids(since="2999-01-01T00:00:00Z") == []
    detail = httpx.get(fake_proxy.url + API + "/a").json()
    assert [c["seq"] for c in detail["calls"]] == [0, 1]
    assert detail["calls"][0]["completions"][0]["token_ids"] == [100, 107, 114]


def test_cursor_pagination_walks_every_trajectory_once(fake_proxy: Proxy) -> None:
    for i in range(7):
        _call(fake_proxy, f"t{i}")
    fake_proxy.wait_all_records()
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = httpx.get(fake_proxy.url + API, params=params).json()
        seen += [t["id"] for t in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == [f"t{i}" for i in range(7)]
    assert len(seen) == 7


def test_pagination_of_trajectories_made_at_the_same_instant_walks_each_once(fake_proxy: Proxy) -> None:
    """Trajectories created in the same instant (a batch of rollouts) are told apart by their id."""
    for i in range(5):
        _call(fake_proxy, f"same-{i}")
    fake_proxy.wait_all_records()
    engine = create_engine(fake_proxy.db_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text("UPDATE trajectories SET created_at = (SELECT min(created_at) FROM trajectories)")
            )
    finally:
        engine.dispose()
    seen: list[str] = []
    cursor = None
    for _page in range(10):
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = httpx.get(fake_proxy.url + API, params=params).json()
        seen += [t["id"] for t in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"same-{i}" for i in range(5)]


def test_an_n2_call_keeps_the_branch_its_next_call_did_not_continue(fake_proxy: Proxy) -> None:
    """Call 1 continues call 0's second choice: the first choice stays a sequence of its own."""
    render = {"X-Trajectory-Id": "fork", "x-fake": "render"}
    first = httpx.post(fake_proxy.url + CHAT, json={**BODY, "n": 2}, headers=render)
    assert first.status_code == 200, first.text
    chosen = first.json()["choices"][1]["message"]
    follow_up = {**BODY, "messages": [*BODY["messages"], chosen, {"role": "user", "content": "more"}]}  # type: ignore[list-item]
    assert httpx.post(fake_proxy.url + CHAT, json=follow_up, headers=render).status_code == 200
    fake_proxy.wait_all_records()
    body = httpx.get(fake_proxy.url + API + "/fork/sequences").json()
    assert body["prefix_mismatches"] == []
    assert sorted(s["choice_indexes"] for s in body["sequences"]) == [[0], [1, 0]]
    other = next(s for s in body["sequences"] if s["choice_indexes"] == [0])
    assert other["input_ids"][-3:] == [100, 107, 114]  # choice 0's own tokens
    assert other["loss_mask"].count(1) == 3
    merged = next(s for s in body["sequences"] if s["choice_indexes"] == [1, 0])
    assert merged["loss_mask"].count(1) == 6


def test_sequences_of_a_trajectory_count_prefix_mismatches(fake_proxy: Proxy) -> None:
    _call(fake_proxy, "s")
    _call(fake_proxy, "s", n=2)  # the fake's prompt never grows: it does not extend the first call
    fake_proxy.wait_all_records()
    body = httpx.get(fake_proxy.url + API + "/s/sequences").json()
    assert [m["seq"] for m in body["prefix_mismatches"]] == [1]
    assert body["prefix_mismatches"][0]["position"] == len(PROMPT_IDS)
    first, *branches = body["sequences"]
    assert first["input_ids"] == [*PROMPT_IDS, 100, 107, 114]
    assert first["loss_mask"] == [0] * len(PROMPT_IDS) + [1, 1, 1]
    assert len(branches) == 2, "n=2 gives one branch per choice"
    assert [b["choice_indexes"] for b in branches] == [[0], [1]]
    per_call = httpx.get(fake_proxy.url + API + "/s/sequences", params={"mode": "per_call"}).json()
    assert len(per_call["sequences"]) == 3
    last = httpx.get(fake_proxy.url + API + "/s/sequences", params={"mode": "last_turn"}).json()
    assert len(last["sequences"]) == 2


def test_a_call_that_did_not_end_ok_is_left_out_of_the_sequences(fake_proxy: Proxy) -> None:
    """A stream vLLM broke off holds tokens a trainer must not learn from (outcome upstream_died)."""
    _call(fake_proxy, "cut")
    body = dict(BODY, stream=True, max_tokens=6)
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream(
            "POST",
            fake_proxy.url + CHAT,
            json=body,
            headers={"X-Trajectory-Id": "cut", "x-fake": "die-mid-stream"},
        ) as response,
    ):
        response.read()
    fake_proxy.wait_all_records()
    outcomes = fake_proxy.rows("SELECT outcome FROM llm_calls WHERE trajectory_id = 'cut' ORDER BY seq")
    assert [r["outcome"] for r in outcomes] == ["ok", "upstream_died"]
    sequences = httpx.get(fake_proxy.url + API + "/cut/sequences").json()
    assert sequences["prefix_mismatches"] == []
    (only,) = sequences["sequences"]
    assert only["input_ids"] == [*PROMPT_IDS, 100, 107, 114]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", API + "/" + "x" * 300, None, 400),
        ("GET", API + "/no-such-run", None, 404),
        ("GET", API + "/no-such-run/sequences", None, 404),
        ("GET", API + "?cursor=not-a-cursor", None, 400),
        ("GET", API + "?limit=0", None, 400),
        ("GET", API + "?tag=novalue", None, 400),
        ("GET", API + "?since=yesterday", None, 400),
        ("GET", API + "/a/sequences?mode=weird", None, 400),
        ("POST", API + "/a/reward", {"reward": "high"}, 400),
        ("POST", API + "/a/reward", b'{"reward": 1e999}', 400),
        ("POST", API + "/a/reward", b'{"reward": NaN}', 400),
        ("POST", API + "/a/reward", b"{not json", 400),
        ("POST", API + "/a/reward", {}, 400),
        ("POST", API + "/a/reward", [1], 400),
        ("POST", API + "/a/tags", {"tags": {"bad key": "v"}}, 400),
    ],
)
def test_bad_requests_get_clear_4xx_in_openai_shape(
    fake_proxy: Proxy, method: str, path: str, body: object, status: int
) -> None:
    _call(fake_proxy, "a")
    fake_proxy.wait_all_records()
    if isinstance(body, bytes):
        headers = {"content-type": "application/json"}
        response = httpx.request(method, fake_proxy.url + path, content=body, headers=headers)
    else:
        response = httpx.request(method, fake_proxy.url + path, json=body)
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text


def test_bad_tags_header_gets_a_400(fake_proxy: Proxy) -> None:
    for tags in ("no-equals", "bad key=v", ",".join(f"k{i}=v" for i in range(40))):
        response = httpx.post(
            fake_proxy.url + CHAT, json=BODY, headers={"X-Trajectory-Id": "x", "X-Trajectory-Tags": tags}
        )
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "X-Trajectory-Tags"


@pytest.fixture
def guarded(fake: tuple[FakeUpstream, str], proxy_factory: ProxyFactory) -> Iterator[Proxy]:
    with proxy_factory(fake[1], api_key="s3cret") as proxy:
        yield proxy


def test_api_key_guards_the_api_but_not_the_pass_through_routes(guarded: Proxy) -> None:
    _call(guarded, "g")
    assert httpx.get(guarded.url + API).status_code == 401
    assert httpx.get(guarded.url + API, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(guarded.url + API, headers={"Authorization": "Basic s3cret"}).status_code == 401
    ok = httpx.get(guarded.url + API, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert httpx.post(guarded.url + API + "/g/reward", json={"reward": 1}).status_code == 401
    assert httpx.get(guarded.url + "/tokentrail/health").status_code == 200
    assert httpx.get(guarded.url + "/v1/models").status_code == 200


def test_reward_before_the_record_is_written_is_kept(fake_proxy: Proxy) -> None:
    response = httpx.post(fake_proxy.url + API + "/early/reward", json={"reward": -1})
    assert response.status_code == 200
    _call(fake_proxy, "early")
    fake_proxy.wait_all_records()
    detail = httpx.get(fake_proxy.url + API + "/early").json()
    assert detail["trajectory"]["reward"] == -1
    assert detail["trajectory"]["call_count"] == 1
    assert len(detail["calls"]) == 1


def test_openapi_documents_the_api(fake_proxy: Proxy) -> None:
    spec = httpx.get(fake_proxy.url + "/tokentrail/openapi.json").json()
    for path in (
        API,
        API + "/{trajectory_id}",
        API + "/{trajectory_id}/sequences",
        API + "/{trajectory_id}/reward",
    ):
        assert path in spec["paths"]
