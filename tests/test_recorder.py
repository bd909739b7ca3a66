"""The recorder process (``TOKENTRAIL_RECORDER=process``): relays hand it their records over a Unix
socket, and nothing handed to it is lost, written twice, or numbered out of arrival order.

Everything runs for real: the proxy under uvicorn, the recorder as the process ``serve`` starts
(``proxy/recorder/keeper.py``), SQLite. Where a test plays a relay itself it speaks the recorder's
frames over the real socket (``proxy/recorder/frames.py``), so that it can do what a relay does only
when it dies: hang up with calls arrived and never recorded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import ProxyFactory
from tests.fake_upstream import FakeUpstream
from tokentrail.proxy.ids import new_id
from tokentrail.proxy.recorder.frames import (
    ARRIVED,
    RECORD,
    RECORD_AGAIN,
    FrameReader,
    decode_acks,
    encode_record,
    frame,
)
from tokentrail.proxy.recorder.keeper import RecorderKeeper
from tokentrail.proxy.recorder.link import RecorderLink
from tokentrail.proxy.recording.records import CallRecord, ChoiceRecord, Integrity
from tokentrail.proxy.recording.writer import THREAD_NAME
from tokentrail.proxy.server.workers import stranded_spools
from tokentrail.proxy.settings import Settings
from tokentrail.proxy.storage.migrate import upgrade_database

CHAT = "/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
ACK_TIMEOUT_S = 20.0


def _ids(db_path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db_path) as connection:
        return connection.execute(sql).fetchall()


@contextmanager
def _recorder(tmp_path: Path, **overrides: object) -> Iterator[tuple[RecorderKeeper, Path]]:
    """The recorder process on a new database, as ``serve`` starts it; (keeper, database file)."""
    db_path = tmp_path / "recorder.db"
    upgrade_database(f"sqlite:///{db_path}")
    settings = Settings(
        db=f"sqlite:///{db_path}", fallback_path=tmp_path / "recorder-spool.jsonl", **overrides
    )
    keeper = RecorderKeeper({**os.environ, **settings.environment()})
    keeper.start()
    try:
        yield keeper, db_path
    finally:
        keeper.stop(30)


class _Relay:
    """A relay played by the test: the recorder's frames over its real socket."""

    def __init__(self, path: Path) -> None:
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                assert time.monotonic() < deadline, "the recorder never listened"
                time.sleep(0.02)
        self.sock.settimeout(ACK_TIMEOUT_S)
        self.reader = FrameReader()
        self.acks: dict[str, bool] = {}

    def send(self, kind: bytes, payload: bytes) -> None:
        self.sock.sendall(b"".join(frame(kind, payload)))

    def arrive(self, call_id: str, trajectory_id: str) -> None:
        self.send(ARRIVED, f"{call_id}\t{trajectory_id}".encode())

    def wait_ack(self, call_id: str) -> bool:
        """The recorder's answer for ``call_id`` (fails the test when none comes in time)."""
        while call_id not in self.acks:
            data = self.sock.recv(65536)
            assert data, "the recorder hung up"
            for _kind, payload in self.reader.feed(data):
                self.acks.update((call_id, ok) for call_id, ok, _integrity in decode_acks(payload))
        return self.acks[call_id]

    def close(self) -> None:
        self.sock.close()


def _record(trajectory_id: str, *, named: bool = True, prompt: list[int] | None = None) -> CallRecord:
    record = CallRecord(new_id(), trajectory_id, CHAT, time.time(), seq=0 if named else None)
    record.request = {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
    record.status_code = 200
    record.finished_at = time.time()
    ids = prompt or [1, 2, 3]
    record.prompt_ids_text = json.dumps(ids).encode()  # as the relay keeps them: vLLM's bytes
    record.prompt_count_unchecked = True
    record.prompt_tokens, record.completion_tokens = len(ids), 2
    record.choices = [ChoiceRecord(0, [7, 8], None, "stop", None, {"role": "assistant", "content": "ab"})]
    record.integrity = Integrity.OK
    return record


def _payload(record: CallRecord) -> bytes:
    raw, pieces = encode_record(record)
    assert not raw
    return b"".join(pieces)


# ---- through the proxy ----


def test_records_are_written_by_the_recorder_process_not_the_relay(
    fake: tuple[FakeUpstream, str], proxy_factory: ProxyFactory
) -> None:
    long_message = "y" * 3000  # its prompt IDs come as a long array: handed over as vLLM's bytes
    body = {**BODY, "messages": [{"role": "user", "content": long_message}]}
    with proxy_factory(fake[1], recorder="process") as proxy:
        headers = {"X-Trajectory-Id": "rec", "X-Fake": "render"}
        whole = httpx.post(proxy.url + CHAT, json=body, headers=headers, timeout=30)
        streaming = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", proxy.url + CHAT, json=streaming, headers=headers, timeout=30) as streamed:
            streamed.read()
        assert whole.status_code == 200
        assert streamed.status_code == 200
        assert whole.json()["choices"][0].get("token_ids") is None  # the flag's effects undone
        proxy.wait_all_records()
        assert not [t for t in threading.enumerate() if t.name == THREAD_NAME]  # no writer here
        rows = proxy.rows("SELECT seq, outcome, integrity, prompt_tokens FROM llm_calls ORDER BY seq")
        assert [(r["seq"], r["outcome"], r["integrity"]) for r in rows] == [(0, "ok", "ok"), (1, "ok", "ok")]
        (turn,) = proxy.rows("SELECT prompt_token_ids FROM llm_calls WHERE seq = 0")
        prompt = turn["prompt_token_ids"]
        prompt = json.loads(prompt) if isinstance(prompt, str) else prompt
        assert len(prompt) == rows[0]["prompt_tokens"] > 1000
        health = httpx.get(proxy.url + "/tokentrail/health").json()
        assert health["writer"]["records_written"] == 2
        assert health["writer"]["queue_depth"] == 0


@pytest.mark.parametrize("recorder", ["thread", "process"])
def test_a_stream_vllm_ends_with_an_error_event_is_recorded_as_an_upstream_error(
    fake: tuple[FakeUpstream, str], proxy_factory: ProxyFactory, recorder: str
) -> None:
    with proxy_factory(fake[1], recorder=recorder) as proxy:
        headers = {"X-Trajectory-Id": "e", "X-Fake": "error-event"}
        with httpx.stream(
            "POST", proxy.url + CHAT, json={**BODY, "stream": True}, headers=headers
        ) as streamed:
            assert b"fake error mid-stream" in streamed.read()
        proxy.wait_all_records()
        (row,) = proxy.rows("SELECT outcome, error, completion_tokens FROM llm_calls")
    assert row == {"outcome": "upstream_error", "error": "fake error mid-stream", "completion_tokens": None}


def test_a_durable_answer_ends_after_the_recorder_committed_it(
    fake: tuple[FakeUpstream, str], proxy_factory: ProxyFactory
) -> None:
    with proxy_factory(fake[1], recorder="process", durable=True) as proxy:
        link = proxy.runtime.writer
        assert isinstance(link, RecorderLink)
        answers: list[httpx.Response] = []
        blocker = sqlite3.connect(Path(proxy.db_url.removeprefix("sqlite:///")), isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # no commit can happen: the answer must not end
        try:
            caller = threading.Thread(
                target=lambda: answers.append(
                    httpx.post(proxy.url + CHAT, json=BODY, headers={"X-Trajectory-Id": "d"}, timeout=60)
                )
            )
            caller.start()
            deadline = time.monotonic() + ACK_TIMEOUT_S
            while link.queue_depth < 1:  # handed to the recorder, which cannot commit it
                assert time.monotonic() < deadline, "the record never reached the recorder"
                time.sleep(0.01)
            caller.join(0.5)  # (the correct code never ends it here; a premature answer is caught)
            assert caller.is_alive(), "the answer ended before its record was committed"
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        caller.join(60)
        # read the moment the answer is whole, without waiting for anything
        assert proxy.rows("SELECT response_id FROM llm_calls") == [{"response_id": answers[0].json()["id"]}]


def test_killing_the_recorder_loses_nothing_and_writes_nothing_twice(
    fake: tuple[FakeUpstream, str], proxy_factory: ProxyFactory
) -> None:
    """Records handed to a recorder that dies before it commits them are handed to the next one."""
    with proxy_factory(fake[1], recorder="process") as proxy:
        link = proxy.runtime.writer
        assert isinstance(link, RecorderLink)
        httpx.post(proxy.url + CHAT, json=BODY, headers={"X-Trajectory-Id": "k"}, timeout=30)
        proxy.wait_all_records()
        db_path = Path(proxy.db_url.removeprefix("sqlite:///"))
        blocker = sqlite3.connect(db_path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # the recorder cannot commit: what it takes stays unwritten
        try:
            for _ in range(5):
                httpx.post(proxy.url + CHAT, json=BODY, headers={"X-Trajectory-Id": "k"}, timeout=30)
            assert link.queue_depth == 5
            assert link.written == 1
            keeper_pid = _recorder_pid()
            os.kill(keeper_pid, signal.SIGKILL)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert link.wait_settled(6, ACK_TIMEOUT_S), "the records never reached the new recorder"
        assert link.connects >= 2
        assert link.failed == 0
        rows = proxy.rows("SELECT id, seq FROM llm_calls WHERE trajectory_id = 'k' ORDER BY seq")
        assert [r["seq"] for r in rows] == list(range(6))
        assert len({r["id"] for r in rows}) == 6
        assert _recorder_pid() != keeper_pid  # a new one took over


def _recorder_pid() -> int:
    """The recorder process this test process started (exactly one)."""
    found = subprocess.run(
        ["pgrep", "-P", str(os.getpid()), "-f", "tokentrail.proxy.recorder.main"],
        capture_output=True, text=True, check=False,
    ).stdout.split()  # fmt: skip
    assert len(found) == 1, found
    return int(found[0])


def test_records_wait_in_the_relays_spool_while_no_recorder_answers(
    fake: tuple[FakeUpstream, str], proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    socket_path = tmp_path / "nobody.sock"
    spool = tmp_path / "fallback.relay0.jsonl"
    settings = Settings(db=f"sqlite:///{tmp_path / 'tokentrail.db'}", fallback_path=tmp_path / "rec.jsonl")
    command = [sys.executable, "-m", "tokentrail.proxy.recorder.main", "--socket", str(socket_path)]
    recorder: subprocess.Popen[bytes] | None = None
    try:
        with proxy_factory(
            fake[1], recorder="process", recorder_socket=socket_path, recorder_wait_s=0.2
        ) as proxy:
            link = proxy.runtime.writer
            assert isinstance(link, RecorderLink)
            for _ in range(3):
                response = httpx.post(proxy.url + CHAT, json=BODY, headers={"X-Trajectory-Id": "s"})
                assert response.status_code == 200
            assert link.wait_settled(3, ACK_TIMEOUT_S)
            assert link.failure_reasons == {"recorder_unreachable": 3}
            assert len(spool.read_text().splitlines()) == 3
            health = httpx.get(proxy.url + "/tokentrail/health").json()
            assert health["status"] == "degraded"
            assert health["recorder"] == {"connected": False, "connects": 0}
            recorder = subprocess.Popen(
                [*command, "--parent-pid", str(os.getpid())], env={**os.environ, **settings.environment()}
            )
            deadline = time.monotonic() + ACK_TIMEOUT_S
            while link.replayed < 3:
                assert time.monotonic() < deadline, "the spool was never handed over"
                time.sleep(0.02)
            assert proxy.rows("SELECT seq FROM llm_calls ORDER BY seq") == [{"seq": s} for s in range(3)]
            assert not spool.exists()
            health = httpx.get(proxy.url + "/tokentrail/health").json()
            assert health["recorder"] == {"connected": True, "connects": 1}
    finally:
        if recorder is not None:  # (after the proxy: a recorder waits for its relays to go first)
            recorder.send_signal(signal.SIGTERM)
            assert recorder.wait(30) == 0


def test_a_record_spooled_because_the_recorder_was_slow_does_not_hold_back_its_trajectory(
    fake: tuple[FakeUpstream, str], proxy_factory: ProxyFactory
) -> None:
    """Call 0 of a trajectory is still open when its later calls' records fill what a relay may keep
    unacknowledged: its own record goes to the relay's spool, and the recorder, told so, writes the
    later calls instead of waiting for call 0 forever; call 0 follows from the spool."""
    upstream, url = fake
    with proxy_factory(url, recorder="process", writer_queue_size=2) as proxy:
        link = proxy.runtime.writer
        assert isinstance(link, RecorderLink)
        first: list[int] = []
        opened = threading.Thread(
            target=lambda: first.append(
                httpx.post(
                    proxy.url + CHAT,
                    json=BODY,
                    headers={"X-Trajectory-Id": "t", "X-Fake": "gate"},
                    timeout=30,
                ).status_code
            )
        )
        opened.start()
        assert upstream.hanging.acquire(timeout=30)  # call 0 is at vLLM
        for _ in range(2):
            assert (
                httpx.post(proxy.url + CHAT, json=BODY, headers={"X-Trajectory-Id": "t"}).status_code == 200
            )
        assert link.queue_depth == 2  # held by the recorder until call 0 is written
        upstream.gate.set()
        opened.join(30)
        assert first == [200]
        assert link.failure_reasons == {"recorder_slow": 1}
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while link.written + link.replayed < 3:
            assert time.monotonic() < deadline, f"stuck: {link.written} written, {link.queue_depth} waiting"
            time.sleep(0.02)
        assert [r["seq"] for r in proxy.rows("SELECT seq FROM llm_calls ORDER BY seq")] == [0, 1, 2]


def test_a_recorder_that_stops_answering_does_not_hold_durable_answers_for_ever(
    fake: tuple[FakeUpstream, str], proxy_factory: ProxyFactory
) -> None:
    with proxy_factory(fake[1], recorder="process", durable=True, recorder_wait_s=1) as proxy:
        link = proxy.runtime.writer
        assert isinstance(link, RecorderLink)
        recorder = _recorder_pid()
        os.kill(recorder, signal.SIGSTOP)  # alive, connected, answering nothing
        try:
            response = httpx.post(proxy.url + CHAT, json=BODY, headers={"X-Trajectory-Id": "z"}, timeout=20)
            assert response.status_code == 200
            assert link.failure_reasons == {"recorder_unresponsive": 1}  # kept in the relay's spool
        finally:
            os.kill(recorder, signal.SIGCONT)
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while link.replayed < 1:
            assert time.monotonic() < deadline, "the spooled record was never handed over again"
            time.sleep(0.02)
        proxy.wait_all_records()
        assert proxy.rows("SELECT response_id FROM llm_calls") == [{"response_id": response.json()["id"]}]


def test_spools_nobody_replays_in_this_run_are_pointed_out(tmp_path: Path) -> None:
    path = tmp_path / "spool.jsonl"
    for name in ("spool.jsonl", "spool.1.jsonl", "spool.3.jsonl", "spool.relay0.jsonl", "spool.relay2.jsonl"):
        (tmp_path / name).write_text("{}\n")
    (tmp_path / "spool.relay1.jsonl").write_text("")  # empty: nothing waits
    names = lambda found: sorted(p.name for p in found)  # noqa: E731
    assert names(stranded_spools(path, 2, "thread")) == [
        "spool.3.jsonl",
        "spool.relay0.jsonl",
        "spool.relay2.jsonl",
    ]
    assert names(stranded_spools(path, 2, "process")) == [
        "spool.1.jsonl",
        "spool.3.jsonl",
        "spool.relay2.jsonl",
    ]


# ---- the recorder's side of the socket ----


def test_a_record_handed_over_again_is_written_once(tmp_path: Path) -> None:
    with _recorder(tmp_path) as (keeper, db_path):
        relay = _Relay(keeper.path)
        record = _record("again")
        relay.arrive(record.call_id, "again")
        relay.send(RECORD, _payload(record))
        assert relay.wait_ack(record.call_id)
        del relay.acks[record.call_id]
        relay.send(RECORD_AGAIN, _payload(record))  # as after a recorder restart
        assert relay.wait_ack(record.call_id)
        relay.close()
        assert _ids(db_path, "SELECT id, seq FROM llm_calls") == [(record.call_id, 0)]
        spooled = sorted(
            p.name for p in tmp_path.glob("recorder-spool.jsonl*") if not p.name.endswith(".lock")
        )
        assert spooled == []  # not refused by the database as a duplicate and set aside either
        (ids,) = _ids(db_path, "SELECT prompt_token_ids FROM llm_calls")
        assert json.loads(ids[0]) == [1, 2, 3]


def test_calls_are_numbered_in_the_order_they_reached_the_host_whichever_relay_took_them(
    tmp_path: Path,
) -> None:
    with _recorder(tmp_path) as (keeper, db_path):
        first, second = _Relay(keeper.path), _Relay(keeper.path)
        early, late = _record("order"), _record("order")
        first.arrive(early.call_id, "order")
        # the arrival is read before the second relay speaks: a record answers only after its write
        probe = _record("probe", named=False)
        first.send(RECORD, _payload(probe))
        assert first.wait_ack(probe.call_id)
        second.arrive(late.call_id, "order")
        second.send(RECORD, _payload(late))  # the later call ends first, on another relay
        first.send(RECORD, _payload(early))
        assert first.wait_ack(early.call_id)
        assert second.wait_ack(late.call_id)
        first.close()
        second.close()
        rows = _ids(db_path, "SELECT id, seq FROM llm_calls WHERE trajectory_id = 'order' ORDER BY seq")
        assert rows == [(early.call_id, 0), (late.call_id, 1)]


def test_a_relay_that_dies_does_not_hold_back_its_trajectorys_later_calls(tmp_path: Path) -> None:
    with _recorder(tmp_path) as (keeper, db_path):
        dying, living = _Relay(keeper.path), _Relay(keeper.path)
        lost, kept = _record("t"), _record("t")
        dying.arrive(lost.call_id, "t")
        probe = _record("probe", named=False)
        dying.send(RECORD, _payload(probe))
        assert dying.wait_ack(probe.call_id)  # (its arrival was read first)
        living.arrive(kept.call_id, "t")
        living.send(RECORD, _payload(kept))
        dying.close()  # killed with its call open: that call's record never comes
        assert living.wait_ack(kept.call_id), "the later call was held for a record that never comes"
        living.close()
        assert _ids(db_path, "SELECT id FROM llm_calls WHERE trajectory_id = 't'") == [(kept.call_id,)]


def test_a_frame_too_large_closes_only_that_connection(tmp_path: Path) -> None:
    with _recorder(tmp_path) as (keeper, db_path):
        bad, good = _Relay(keeper.path), _Relay(keeper.path)
        bad.sock.sendall(b"\xff\xff\xff\xff" + b"R")
        assert bad.sock.recv(10) == b""  # closed
        record = _record("fine", named=False)
        good.send(RECORD, _payload(record))
        assert good.wait_ack(record.call_id)
        bad.close()
        good.close()
        assert _ids(db_path, "SELECT count(*) FROM llm_calls") == [(1,)]


# ---- serve ----


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_with_the_recorder_drains_everything_on_sigterm(
    fake: tuple[FakeUpstream, str], tmp_path: Path, workers: int
) -> None:
    db_path = tmp_path / "serve.db"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "TOKENTRAIL_UPSTREAM": fake[1],
        "TOKENTRAIL_DB": f"sqlite:///{db_path}",
        "TOKENTRAIL_PORT": str(port),
        "TOKENTRAIL_RECORDER": "process",
        "TOKENTRAIL_WORKERS": str(workers),
        "TOKENTRAIL_FALLBACK_PATH": str(tmp_path / "spool.jsonl"),
        "TOKENTRAIL_LOG_LEVEL": "warning",
    }
    serve = subprocess.Popen([sys.executable, "-m", "tokentrail.proxy.cli", "serve"], env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/tokentrail/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve did not start"
            assert serve.poll() is None, "serve ended"
            time.sleep(0.05)
        for turn in range(8):  # a fresh connection per call: under workers, any worker takes it
            body = {**BODY, "messages": [{"role": "user", "content": f"turn {turn}"}]}
            response = httpx.post(url + CHAT, json=body, headers={"X-Trajectory-Id": "w"}, timeout=30)
            assert response.status_code == 200, turn
    finally:
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(60)
    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after draining
    rows = _ids(db_path, "SELECT seq, request FROM llm_calls ORDER BY seq")
    assert [seq for seq, _request in rows] == list(range(8))
    turns = [json.loads(request)["messages"][0]["content"] for _seq, request in rows]
    assert turns == [f"turn {t}" for t in range(8)]  # numbered in the order they were sent
    leftover = subprocess.run(
        ["pgrep", "-f", f"tokentrail.proxy.recorder.main.*--parent-pid {serve.pid}"],
        capture_output=True,
        check=False,
    )
    assert leftover.stdout == b""
