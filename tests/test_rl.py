"""The RL loop against the fake vLLM's control plane: policy versions per call (and spans when the
version changes mid-stream), pause and resume through TokenTrail, GRPO groups and their advantages.

The same behaviour against the real vLLM (started with VLLM_SERVER_DEV_MODE=1) is in
``test_rl_vllm.py``; here the fake makes the orderings deterministic (a stream held at token 2).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Proxy, running_proxy
from tests.fake_upstream import FakeUpstream
from tests.servers import serve_in_thread
from tokentrail.proxy.training.policy import annotate
from tokentrail.proxy.training.sequences import TrainingSequence

CHAT = "/v1/chat/completions"
BODY: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}


def _until(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def _versions(proxy: Proxy) -> dict[str, str | None]:
    versions: dict[str, str | None] = httpx.get(proxy.url + "/tokentrail/v1/pause").json()["weight_versions"]
    return versions


@pytest.fixture
def rl_proxy(fake: tuple[FakeUpstream, str], tmp_path: Path) -> Iterator[Proxy]:
    with running_proxy(fake[1], tmp_path, pause_max_wait_s=30) as proxy:
        _until(lambda: _versions(proxy) == {fake[1]: "default"})  # learned from GET /weight_info at start
        yield proxy


def _call(proxy: Proxy, trajectory: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        proxy.url + CHAT, json=BODY, headers={"X-Trajectory-Id": trajectory, **(headers or {})}, timeout=60
    )


def test_each_call_records_the_version_the_upstream_ran_and_versions_keep_their_order(
    rl_proxy: Proxy, fake: tuple[FakeUpstream, str]
) -> None:
    assert _call(rl_proxy, "t").status_code == 200
    update = httpx.post(rl_proxy.url + "/update_weight_version", json={"new_version": "step-7"})
    assert update.status_code == 200
    assert fake[0].weight_version == "step-7"  # passed through unchanged
    assert _call(rl_proxy, "t").status_code == 200
    assert _call(rl_proxy, "t", {"X-Policy-Version": "trainer-says-8"}).status_code == 200  # the header wins
    rl_proxy.wait_all_records()
    rows = rl_proxy.rows("SELECT seq, weight_version, weight_versions FROM llm_calls ORDER BY seq")
    assert [(r["weight_version"], r["weight_versions"]) for r in rows] == [
        ("default", None),
        ("step-7", None),
        ("trainer-says-8", None),
    ]
    order = rl_proxy.rows("SELECT version FROM weight_versions ORDER BY first_seen_at, version")
    assert [r["version"] for r in order] == ["default", "step-7", "trainer-says-8"]
    call = httpx.get(rl_proxy.url + "/tokentrail/v1/trajectories/t").json()["calls"][1]
    assert call["weight_version"] == "step-7"


def test_a_version_change_during_a_stream_splits_its_tokens_into_spans(
    rl_proxy: Proxy, fake: tuple[FakeUpstream, str]
) -> None:
    upstream = fake[0]
    lines: list[str] = []
    two_tokens = threading.Event()

    def stream() -> None:
        body = dict(BODY, stream=True)
        headers = {"X-Trajectory-Id": "s", "x-fake": "gate-stream"}
        with httpx.stream("POST", rl_proxy.url + CHAT, json=body, headers=headers, timeout=60) as response:
            for line in response.iter_lines():
                lines.append(line)
                if sum('"content":"t' in x for x in lines) == 2:
                    two_tokens.set()

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        assert two_tokens.wait(30), "the first two tokens never reached the client"
        assert upstream.hanging.acquire(timeout=30)  # the upstream holds the rest
        assert _call(rl_proxy, "short").status_code == 200  # recorded while the stream is held
        rl_proxy.wait_records(1)
        httpx.post(rl_proxy.url + "/update_weight_version", json={"new_version": "v2"}).raise_for_status()
        assert _versions(rl_proxy) == {fake[1]: "v2"}
    finally:
        upstream.gate.set()
        reader.join(60)
    rl_proxy.wait_all_records()
    (row,) = rl_proxy.rows("SELECT weight_version, weight_versions FROM llm_calls WHERE trajectory_id = 's'")
    assert row["weight_version"] == "default"
    assert json.loads(row["weight_versions"]) == [
        {"version": "default", "start": 0, "end": 2},
        {"version": "v2", "start": 2, "end": 6},
    ]
    # the straddling call arrived before the short one, yet v2 stays the newer version
    order = rl_proxy.rows("SELECT version FROM weight_versions ORDER BY first_seen_at")
    assert [r["version"] for r in order] == ["default", "v2"]


def test_calls_wait_at_the_proxy_while_paused_and_none_is_lost(
    rl_proxy: Proxy, fake: tuple[FakeUpstream, str]
) -> None:
    paused = httpx.post(rl_proxy.url + "/tokentrail/v1/pause", timeout=60).json()  # mode=wait by default
    assert paused["paused"] is True
    assert paused["mode"] == "wait"
    assert paused["upstreams"] == [{"upstream": fake[1], "status": 200, "body": '{"status":"paused"}'}]
    statuses: list[int] = []
    callers = [
        threading.Thread(target=lambda i=i: statuses.append(_call(rl_proxy, f"a{i}").status_code))
        for i in range(8)
    ]
    for caller in callers:
        caller.start()
    _until(lambda: httpx.get(rl_proxy.url + "/tokentrail/v1/pause").json()["held_now"] == 8)
    assert not any(r["path"] == CHAT for r in fake[0].requests)  # nothing reached vLLM while paused
    resumed = httpx.post(rl_proxy.url + "/tokentrail/v1/resume", timeout=60).json()
    assert resumed["paused"] is False
    assert resumed["held_total"] == 8
    for caller in callers:
        caller.join(60)
    assert statuses == [200] * 8
    assert fake[0].control == ["/weight_info", "/pause?mode=wait", "/resume", "/weight_info"]  # re-learned
    rl_proxy.wait_all_records()
    assert rl_proxy.rows("SELECT count(*) AS n FROM llm_calls WHERE outcome = 'ok'") == [{"n": 8}]


def test_a_call_held_past_the_limit_gets_503_with_retry_after_and_is_recorded(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    with running_proxy(fake[1], tmp_path, pause_max_wait_s=0.2) as proxy:
        httpx.post(proxy.url + "/tokentrail/v1/pause?mode=keep", timeout=60).raise_for_status()
        response = _call(proxy, "late")
        httpx.post(proxy.url + "/tokentrail/v1/resume", timeout=60).raise_for_status()
        proxy.wait_all_records()
        (row,) = proxy.rows("SELECT outcome, status_code FROM llm_calls")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json()["error"]["type"] == "ServiceUnavailableError"
    assert "TOKENTRAIL_PAUSE_MAX_WAIT_S" in response.json()["error"]["message"]
    assert row == {"outcome": "paused", "status_code": 503}


def test_group_advantages_are_normalised_over_the_rewarded_trajectories(rl_proxy: Proxy) -> None:
    for trajectory in ("g-a", "g-b", "g-c"):
        assert _call(rl_proxy, trajectory, {"X-Trajectory-Group": "task-1"}).status_code == 200
    assert _call(rl_proxy, "g-d").status_code == 200
    rl_proxy.wait_all_records()
    api = rl_proxy.url + "/tokentrail/v1"
    httpx.post(api + "/trajectories/g-d/group", json={"group_id": "task-1"}).raise_for_status()
    for trajectory, reward in (("g-a", 1.0), ("g-b", 0.0), ("g-d", 0.5)):
        httpx.post(api + f"/trajectories/{trajectory}/reward", json={"reward": reward}).raise_for_status()
    group = httpx.get(api + "/groups/task-1").json()
    by_id = {t["trajectory_id"]: t["advantage"] for t in group["trajectories"]}
    # rewards 1, 0, 0.5: mean 0.5, population std sqrt(1/6); g-c has no reward
    std = (1 / 6) ** 0.5
    assert by_id == pytest.approx({"g-a": 0.5 / std, "g-b": -0.5 / std, "g-c": None, "g-d": 0.0})
    summary = rl_proxy.rows("SELECT trajectory_id, group_id FROM trajectory_summary ORDER BY trajectory_id")
    assert [r["group_id"] for r in summary] == ["task-1"] * 4


def test_group_and_pause_input_errors(rl_proxy: Proxy) -> None:
    api = rl_proxy.url + "/tokentrail/v1"
    assert httpx.get(api + "/groups/nobody").status_code == 404
    assert httpx.post(api + "/pause?mode=sideways").status_code == 400  # OpenAI error shape
    bad = _call(rl_proxy, "x", {"X-Trajectory-Group": "bad\tgroup"})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "X-Trajectory-Group"


def _export(
    proxy: Proxy, tmp_path: Path, *args: str
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    out = tmp_path / f"export-{len(list(tmp_path.glob('export-*')))}.jsonl"
    command = [sys.executable, "-m", "tokentrail.proxy.cli", "export", "--format", "jsonl"]
    done = subprocess.run(
        [*command, "--out", str(out), "--db", proxy.db_url, *args],
        capture_output=True,
        text=True,
        check=False,
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return done, rows


def test_the_export_gives_versions_staleness_and_group_advantages_and_filters_on_them(
    rl_proxy: Proxy, tmp_path: Path
) -> None:
    assert _call(rl_proxy, "old", {"X-Trajectory-Group": "g"}).status_code == 200
    httpx.post(rl_proxy.url + "/update_weight_version", json={"new_version": "v2"}).raise_for_status()
    assert _call(rl_proxy, "new", {"X-Trajectory-Group": "g"}).status_code == 200
    assert _call(rl_proxy, "alone").status_code == 200
    rl_proxy.wait_all_records()
    for trajectory, reward in (("old", 1.0), ("new", 0.0)):
        httpx.post(f"{rl_proxy.url}/tokentrail/v1/trajectories/{trajectory}/reward", json={"reward": reward})

    done, rows = _export(rl_proxy, tmp_path, "--by-group")
    assert done.returncode == 0, done.stderr
    columns = ("trajectory_id", "group_id", "advantage", "weight_version", "staleness")
    assert [tuple(r[c] for c in columns) for r in rows] == [
        ("old", "g", 1.0, "default", 1),
        ("new", "g", -1.0, "v2", 0),
    ]
    # the read API gives the same columns as the export
    api = httpx.get(rl_proxy.url + "/tokentrail/v1/trajectories/old/sequences").json()["sequences"]
    assert [tuple(s[c] for c in columns[1:]) for s in api] == [("g", 1.0, "default", 1)]
    done, rows = _export(rl_proxy, tmp_path, "--max-staleness", "0")
    assert sorted(r["trajectory_id"] for r in rows) == ["alone", "new"]
    assert "1 stale sequences left out" in done.stdout
    done, rows = _export(rl_proxy, tmp_path, "--min-weight-version", "default")
    assert len(rows) == 3
    done, _ = _export(rl_proxy, tmp_path, "--min-weight-version", "v9")
    assert done.returncode == 2
    assert "no call ran under weight version 'v9'" in done.stderr


def test_only_trajectories_an_export_wrote_whole_are_marked_exported_and_pruned(
    rl_proxy: Proxy, tmp_path: Path
) -> None:
    """A policy filter that leaves a trajectory's sequences out did not export it: ``prune --exported``
    must never delete what was not archived."""
    assert _call(rl_proxy, "stale").status_code == 200
    httpx.post(rl_proxy.url + "/update_weight_version", json={"new_version": "v2"}).raise_for_status()
    assert _call(rl_proxy, "fresh").status_code == 200
    rl_proxy.wait_all_records()
    done, rows = _export(rl_proxy, tmp_path, "--max-staleness", "0", "--mark-exported")
    assert done.returncode == 0, done.stderr
    assert [r["trajectory_id"] for r in rows] == ["fresh"]
    marked = rl_proxy.rows("SELECT id FROM trajectories WHERE exported_at IS NOT NULL")
    assert [r["id"] for r in marked] == ["fresh"]
    command = [
        sys.executable,
        "-m",
        "tokentrail.proxy.cli",
        "db",
        "prune",
        "--exported",
        "--db",
        rl_proxy.db_url,
    ]
    dry = subprocess.run(command, capture_output=True, text=True, check=False)
    assert dry.returncode == 0, dry.stderr
    assert re.search(r"\b1 trajector", dry.stdout), dry.stdout


def test_a_sequence_over_several_versions_is_stamped_with_its_oldest() -> None:
    """A merged sequence's first tokens came from its oldest policy: that is the one a trainer must
    weigh its staleness by (versions ordered as first seen, not by name)."""
    sequence = TrainingSequence(
        "t", 0, [1, 2, 3], [0, 1, 1], [None, None, None], None, ["c0", "c1", "c2"], [0, 0, 0]
    )
    versions = {"c0": "b-late", "c1": "a-early", "c2": None}
    annotate([sequence], versions, {"a-early": 0, "b-late": 1, "c-newest": 2})
    assert (sequence.weight_version, sequence.staleness) == ("a-early", 2)


def test_a_wait_pause_lets_running_calls_finish_before_vllm_is_paused(
    rl_proxy: Proxy, fake: tuple[FakeUpstream, str]
) -> None:
    """vLLM's own wait would hold a request sent a moment after it; TokenTrail drains its calls
    first, the client's X-Policy-Version ones included, and only then pauses vLLM."""
    upstream = fake[0]
    headers = {"X-Trajectory-Id": "held", "x-fake": "gate-stream", "X-Policy-Version": "mine"}
    results: dict[str, Any] = {}

    def stream() -> None:
        body = dict(BODY, stream=True)
        results["call"] = httpx.post(rl_proxy.url + CHAT, json=body, headers=headers, timeout=60).status_code

    def pause() -> None:
        results["pause"] = httpx.post(rl_proxy.url + "/tokentrail/v1/pause?mode=wait", timeout=60).status_code

    caller = threading.Thread(target=stream)
    caller.start()
    assert upstream.hanging.acquire(timeout=30)
    pauser = threading.Thread(target=pause)
    try:
        pauser.start()
        _until(lambda: httpx.get(rl_proxy.url + "/tokentrail/v1/pause").json()["paused"])
        assert "/pause?mode=wait" not in upstream.control  # still draining the held stream
    finally:
        upstream.gate.set()
        caller.join(60)
        pauser.join(60)
    assert results == {"call": 200, "pause": 200}
    assert upstream.control[-1] == "/pause?mode=wait"
    httpx.post(rl_proxy.url + "/tokentrail/v1/resume", timeout=60).raise_for_status()


def test_a_resume_that_comes_while_a_wait_pause_drains_wins_and_nothing_stays_paused(
    rl_proxy: Proxy, fake: tuple[FakeUpstream, str]
) -> None:
    """The last request wins: the resume ends the pause that was still waiting for a running call,
    so vLLM is never paused behind an open gate."""
    upstream = fake[0]
    results: dict[str, Any] = {}

    def stream() -> None:
        body = dict(BODY, stream=True)
        headers = {"X-Trajectory-Id": "running", "x-fake": "gate-stream"}
        results["call"] = httpx.post(rl_proxy.url + CHAT, json=body, headers=headers, timeout=60).status_code

    def pause() -> None:
        results["pause"] = httpx.post(rl_proxy.url + "/tokentrail/v1/pause?mode=wait", timeout=60).status_code

    caller = threading.Thread(target=stream)
    caller.start()
    assert upstream.hanging.acquire(timeout=30)
    pauser = threading.Thread(target=pause)
    try:
        pauser.start()
        _until(lambda: httpx.get(rl_proxy.url + "/tokentrail/v1/pause").json()["paused"])
        resumed = httpx.post(rl_proxy.url + "/tokentrail/v1/resume", timeout=60)
        pauser.join(30)
        assert not pauser.is_alive(), "the pause still waits for the running call after the resume"
        assert not upstream.gate.is_set()  # ended by the resume, while the call still runs
    finally:
        upstream.gate.set()
        caller.join(60)
        pauser.join(60)
    assert resumed.status_code == 200
    assert results == {"call": 200, "pause": 409}
    assert "/pause?mode=wait" not in upstream.control
    assert httpx.get(rl_proxy.url + "/tokentrail/v1/pause").json()["paused"] is False
    assert _call(rl_proxy, "after").status_code == 200


@pytest.mark.parametrize("ending", ["chunk", "unfinished", "cut"])
def test_a_stream_an_abort_pause_ends_is_recorded_as_aborted(
    rl_proxy: Proxy, fake: tuple[FakeUpstream, str], ending: str
) -> None:
    """vLLM ends the requests an abort pause catches with finish reason ``abort``, or with no finish
    reason at all; a stream broken off while an abort pause is in force is one of them too. Each is
    ``aborted``, never ``ok``."""
    upstream = fake[0]
    upstream.abort_ending = ending
    lines: list[str] = []

    def stream() -> None:
        body = dict(BODY, stream=True)
        headers = {"X-Trajectory-Id": "cut", "x-fake": "gate-stream"}
        try:
            with httpx.stream(
                "POST", rl_proxy.url + CHAT, json=body, headers=headers, timeout=60
            ) as response:
                lines.extend(response.iter_lines())
        except httpx.RemoteProtocolError:
            lines.append("(cut)")

    reader = threading.Thread(target=stream)
    reader.start()
    assert upstream.hanging.acquire(timeout=30), "the stream never reached the upstream"
    httpx.post(rl_proxy.url + "/tokentrail/v1/pause?mode=abort", timeout=60).raise_for_status()
    reader.join(60)
    httpx.post(rl_proxy.url + "/tokentrail/v1/resume", timeout=60).raise_for_status()
    assert _call(rl_proxy, "after").status_code == 200
    rl_proxy.wait_all_records()
    rows = rl_proxy.rows("SELECT trajectory_id, outcome FROM llm_calls ORDER BY trajectory_id")
    assert [(r["trajectory_id"], r["outcome"]) for r in rows] == [("after", "ok"), ("cut", "aborted")]
    assert any('"finish_reason":"abort"' in line for line in lines) == (ending == "chunk")


def test_a_pause_no_upstream_accepts_is_a_502_and_leaves_nothing_paused(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    fake[0].dev_mode = False
    with running_proxy(fake[1], tmp_path) as proxy:
        refused = httpx.post(proxy.url + "/tokentrail/v1/pause", timeout=60)
        state = httpx.get(proxy.url + "/tokentrail/v1/pause").json()
        assert _call(proxy, "goes-through").status_code == 200
    assert refused.status_code == 502
    assert "VLLM_SERVER_DEV_MODE" in refused.json()["error"]["message"]
    assert state["paused"] is False


def test_a_version_that_cannot_be_stored_is_ignored_and_recording_goes_on(
    rl_proxy: Proxy, fake: tuple[FakeUpstream, str]
) -> None:
    long_version = "v" * 300
    httpx.post(rl_proxy.url + "/update_weight_version", json={"new_version": long_version}).raise_for_status()
    assert fake[0].weight_version == long_version  # vLLM took it; TokenTrail only declines to record it
    assert _call(rl_proxy, "after-long").status_code == 200
    rl_proxy.wait_all_records()
    assert rl_proxy.rows("SELECT weight_version FROM llm_calls") == [{"weight_version": "default"}]


def test_with_an_api_key_vllms_control_routes_need_it(fake: tuple[FakeUpstream, str], tmp_path: Path) -> None:
    with running_proxy(fake[1], tmp_path, api_key="secret") as proxy:
        anonymous = httpx.post(proxy.url + "/pause?mode=abort")
        prefixed = httpx.post(proxy.url + "/t/x/update_weight_version", json={"new_version": "evil"})
        keyed = httpx.post(proxy.url + "/resume", headers={"Authorization": "Bearer secret"})
        models = httpx.get(proxy.url + "/v1/models")  # other routes stay open, as before
    assert (anonymous.status_code, prefixed.status_code, keyed.status_code) == (401, 401, 200)
    assert models.status_code == 200
    assert "/pause?mode=abort" not in fake[0].control
    assert fake[0].weight_version == "default"


def test_an_upstream_that_comes_back_is_asked_its_version_again_and_never_given_the_old_one(
    tmp_path: Path,
) -> None:
    """vLLM restarted with other weights (and so another version) between two calls: the calls after
    it are stamped with the new version, or none until it is known, never with the one before."""
    with contextlib.ExitStack() as stack:
        first = contextlib.ExitStack()
        url = first.enter_context(serve_in_thread(FakeUpstream()))
        proxy = stack.enter_context(running_proxy(url, tmp_path))
        _until(lambda: _versions(proxy) == {url: "default"})
        assert _call(proxy, "before").status_code == 200
        first.close()  # vLLM goes away ...
        assert _call(proxy, "gone").status_code == 502
        restarted = FakeUpstream(weight_version="step-9")  # ... and comes back on its port, new weights
        stack.enter_context(serve_in_thread(restarted, port=int(url.rsplit(":", 1)[1])))
        assert _call(proxy, "after").status_code == 200
        upstreams = httpx.get(proxy.url + "/tokentrail/health").json()["upstreams"]
        assert [u["healthy"] for u in upstreams] == [True]  # (one upstream: nothing else probes it)
        _until(lambda: _versions(proxy) == {url: "step-9"})
        assert _call(proxy, "later").status_code == 200
        proxy.wait_all_records()
        rows = proxy.rows("SELECT trajectory_id, weight_version FROM llm_calls")
    stamped = {r["trajectory_id"]: r["weight_version"] for r in rows}
    assert stamped["before"] == "default"
    assert stamped["after"] in (None, "step-9")  # unknown until asked, never the old one
    assert stamped["later"] == "step-9"
