"""What the viewer reads: list filters for time and sequence shape, failed-call counts, and decoded tokens."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Proxy, running_proxy
from tests.conversations import record_conversation
from tests.fake_upstream import FakeUpstream, token_piece

API = "/tokentrail/v1/trajectories"


@pytest.fixture
def recorded(fake: tuple[FakeUpstream, str], tmp_path: Path, db_url: str) -> Iterator[Proxy]:
    """Three trajectories: 'one' merges into one sequence; 'broken' has a prefix break at its third
    call; 'failed' has one call that got an upstream 500 between two that extend each other."""
    with running_proxy(fake[1], tmp_path, db_url=db_url) as proxy:
        record_conversation(proxy.url, "one", ["a", "b", "c"])
        record_conversation(proxy.url, "broken", ["a", "b", "c", "d"], break_at=2)
        record_conversation(proxy.url, "failed", ["a", "b", "c"], fail_at=1)
        proxy.wait_all_records()
        yield proxy


def _page(proxy: Proxy, **params: Any) -> dict[str, Any]:
    response = httpx.get(proxy.url + API, params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _ids(proxy: Proxy, **params: Any) -> list[str]:
    return [t["id"] for t in _page(proxy, **params)["data"]]


def test_list_counts_failed_calls_and_with_shape_the_sequences_and_breaks(recorded: Proxy) -> None:
    rows = {t["id"]: t for t in _page(recorded, shape="true")["data"]}
    shapes = {k: (t["outcome_problems"], t["sequence_count"], t["prefix_breaks"]) for k, t in rows.items()}
    assert shapes == {"one": (0, 1, 0), "broken": (0, 2, 1), "failed": (1, 1, 0)}
    plain = _page(recorded)["data"]
    assert [t["sequence_count"] for t in plain] == [None, None, None], "tokens are read only when asked"


def test_single_sequence_filter_pages_on_the_cursor(recorded: Proxy) -> None:
    assert _ids(recorded, single_sequence="false") == ["broken"]
    first = _page(recorded, single_sequence="true", limit=1)
    assert [t["id"] for t in first["data"]] == ["one"]
    second = _page(recorded, single_sequence="true", limit=1, cursor=first["next_cursor"])
    assert [t["id"] for t in second["data"]] == ["failed"]
    assert second["next_cursor"] is None


def test_time_range_filters(recorded: Proxy) -> None:
    rows = _page(recorded)["data"]
    broken_at = next(t["created_at"] for t in rows if t["id"] == "broken")
    assert _ids(recorded, since=broken_at) == ["broken", "failed"]
    assert _ids(recorded, until=broken_at) == ["one"]
    assert _ids(recorded, since=broken_at, until=datetime.now(UTC).isoformat()) == ["broken", "failed"]


def test_detokenize_asks_the_upstream_once_per_token(fake: tuple[FakeUpstream, str], recorded: Proxy) -> None:
    upstream, _ = fake
    sequence = httpx.get(recorded.url + API + "/one/sequences").json()["sequences"][0]
    ids = sequence["input_ids"]

    def detokenize() -> dict[str, str | None]:
        response = httpx.post(
            recorded.url + "/tokentrail/v1/detokenize", json={"token_ids": ids, "model": "tiny"}
        )
        assert response.status_code == 200, response.text
        pieces: dict[str, str | None] = response.json()["pieces"]
        return pieces

    before = sum(r["path"] == "/detokenize" for r in upstream.requests)
    pieces = detokenize()
    assert pieces == {str(t): token_piece(t) for t in ids}
    asked = sum(r["path"] == "/detokenize" for r in upstream.requests) - before
    assert asked == len(set(ids)) < len(ids)
    assert detokenize() == pieces
    assert sum(r["path"] == "/detokenize" for r in upstream.requests) - before == asked, "not cached"


def test_detokenize_needs_the_api_key_and_says_null_for_what_the_upstream_cannot_decode(
    tmp_path: Path,
) -> None:
    with running_proxy("http://127.0.0.1:9", tmp_path, api_key="k") as proxy:
        url = proxy.url + "/tokentrail/v1/detokenize"
        assert httpx.post(url, json={"token_ids": [1]}).status_code == 401
        response = httpx.post(url, json={"token_ids": [1, 1]}, headers={"Authorization": "Bearer k"})
        assert response.status_code == 200
        assert response.json() == {"pieces": {"1": None}}


def test_detail_without_token_ids_leaves_out_only_the_token_arrays(recorded: Proxy) -> None:
    full = httpx.get(recorded.url + API + "/one").json()
    light = httpx.get(recorded.url + API + "/one", params={"token_ids": "false"}).json()
    assert all(call["prompt_token_ids"] for call in full["calls"])
    assert [c["prompt_token_ids"] for c in light["calls"]] == [None, None, None]
    assert [c["completions"][0]["token_ids"] for c in light["calls"]] == [[], [], []]
    for call in full["calls"]:
        call["prompt_token_ids"] = None
        for completion in call["completions"]:
            completion.update(token_ids=[], logprobs=None)
    assert light == full


def test_the_viewer_can_be_turned_off(tmp_path: Path) -> None:
    with running_proxy("http://127.0.0.1:9", tmp_path, viewer=False) as proxy:
        assert httpx.get(proxy.url + "/tokentrail/ui/").status_code == 404
    with running_proxy("http://127.0.0.1:9", tmp_path) as proxy:
        page = httpx.get(proxy.url + "/tokentrail/ui/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        for name in ("viewer.js", "viewer.css"):
            assert httpx.get(proxy.url + "/tokentrail/ui/" + name).status_code == 200
