"""Data lifecycle on SQLite and PostgreSQL: the foreign key on ``base_call_id`` (migration 0007, on a
database made by 0006), ``tokentrail db prune`` (whole trajectories, beside a recording proxy), and
the view, the API and the export agreeing afterwards.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from tests.conftest import Proxy, running_proxy
from tests.conversations import record_conversation
from tests.fake_upstream import FakeUpstream
from tests.postgres import create_database
from tests.servers import serve_in_thread
from tests.test_metrics import scrape
from tokentrail.proxy.app import create_app
from tokentrail.proxy.server.own_headers import UVICORN_OPTIONS
from tokentrail.proxy.settings import Settings
from tokentrail.proxy.storage.engine import make_engine
from tokentrail.proxy.storage.migrate import alembic_config, current_revision, head_revision, upgrade_database
from tokentrail.proxy.storage.prune import PruneSelection, prune

README = Path(__file__).resolve().parents[1] / "README.md"
DANGLING = (
    "SELECT count(*) AS n FROM llm_calls_stored c WHERE c.base_call_id IS NOT NULL "
    "AND NOT EXISTS (SELECT 1 FROM llm_calls_stored b WHERE b.id = c.base_call_id)"
)


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokentrail.proxy.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, **env),
    )


@contextmanager
def proxy_without_migrating(upstream: str, tmp_path: Path, db_url: str) -> Iterator[Proxy]:
    """Today's proxy writing into the database as it is (the writer's rows fit schema 0006 too)."""
    settings = Settings(upstream=upstream, db=db_url, fallback_path=tmp_path / "fallback.jsonl")
    app = create_app(settings)
    with serve_in_thread(app, proxy_headers=False, **UVICORN_OPTIONS) as url:
        yield Proxy(url, db_url, app)


def _parsed(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def view_rows(proxy: Proxy) -> list[tuple[Any, ...]]:
    rows = proxy.rows(
        "SELECT trajectory_id, id, seq, request, prompt_token_ids FROM llm_calls ORDER BY trajectory_id, seq"
    )
    return [
        (r["trajectory_id"], r["id"], r["seq"], _parsed(r["request"]), _parsed(r["prompt_token_ids"]))
        for r in rows
    ]


def api_calls(proxy: Proxy, trajectory_id: str) -> list[tuple[Any, ...]]:
    response = httpx.get(f"{proxy.url}/tokentrail/v1/trajectories/{trajectory_id}", timeout=30)
    assert response.status_code == 200, response.text
    return [
        (trajectory_id, c["id"], c["seq"], c["request"], c["prompt_token_ids"])
        for c in response.json()["calls"]
    ]


def a_base_and_its_calls(proxy: Proxy) -> str:
    (row,) = proxy.rows(
        "SELECT base_call_id FROM llm_calls_stored WHERE base_call_id IS NOT NULL ORDER BY seq LIMIT 1"
    )
    return str(row["base_call_id"])


# ---- migration 0007 on a database made by 0006 ----


def test_the_foreign_key_migration_keeps_a_0006_database_whole_and_refuses_deleting_a_base(
    fake: tuple[FakeUpstream, str], tmp_path: Path, db_url: str
) -> None:
    config = alembic_config(db_url)
    command.upgrade(config, "0006_stored_calls")
    with proxy_without_migrating(fake[1], tmp_path, db_url) as proxy:
        for i in range(3):
            record_conversation(proxy.url, f"old-{i}", [f"step {j} " * 4 for j in range(6)], break_at=3)
        proxy.wait_all_records()
        before = view_rows(proxy)
        engine = make_engine(db_url)
        assert current_revision(engine) == "0006_stored_calls"
        based = a_base_and_its_calls(proxy)
        assert upgrade_database(db_url) == ("0006_stored_calls", head_revision(db_url))  # 0007 and on
        assert view_rows(proxy) == before  # every call reads back as it was
        assert [r for r in before if r[0] == "old-1"] == api_calls(proxy, "old-1")
        with engine.connect() as connection:
            connection.execute(text("DELETE FROM completions WHERE call_id = :c"), {"c": based})
            with pytest.raises(IntegrityError):
                connection.execute(text("DELETE FROM llm_calls_stored WHERE id = :c"), {"c": based})
            connection.rollback()
        engine.dispose()
        # the proxy that wrote into 0006 goes on writing into 0007
        record_conversation(proxy.url, "old-0", ["one more"])
        proxy.wait_all_records()
        assert proxy.runtime.writer.failed == 0
    refused = cli("sql", "--db", db_url, f"DELETE FROM llm_calls_stored WHERE id = '{based}'")
    assert refused.returncode == 1
    assert "FOREIGN KEY" in refused.stderr.upper()
    command.downgrade(config, "0006_stored_calls")
    command.upgrade(config, "head")


def test_a_0006_database_with_a_deleted_base_is_refused_with_the_query_that_lists_it(
    fake: tuple[FakeUpstream, str], tmp_path: Path, db_url: str
) -> None:
    command.upgrade(alembic_config(db_url), "0006_stored_calls")
    with proxy_without_migrating(fake[1], tmp_path, db_url) as proxy:
        record_conversation(proxy.url, "edited", [f"step {j}" for j in range(3)])
        proxy.wait_all_records()
        based = a_base_and_its_calls(proxy)
    engine = make_engine(db_url)
    with engine.begin() as connection:  # by hand, as the review did before the foreign key
        connection.execute(text("DELETE FROM completions WHERE call_id = :c"), {"c": based})
        connection.execute(text("DELETE FROM llm_calls_stored WHERE id = :c"), {"c": based})
    upgraded = cli("db", "upgrade", "--db", db_url)
    assert upgraded.returncode != 0
    assert "stored against a call that was deleted" in upgraded.stderr
    assert "trajectory edited" in upgraded.stderr
    assert current_revision(engine) == "0006_stored_calls"  # nothing half done
    with engine.connect() as connection:
        columns = connection.execute(text("SELECT * FROM trajectories")).keys()
    assert "exported_at" not in columns
    engine.dispose()


# ---- prune ----


def _count(proxy: Proxy, sql: str) -> int:
    return int(proxy.rows(sql)[0]["n"])


def test_prune_takes_a_trajectory_across_the_cutoff_whole_and_view_api_export_agree(
    fake: tuple[FakeUpstream, str], tmp_path: Path, db_url: str
) -> None:
    with running_proxy(fake[1], tmp_path, db_url=db_url) as proxy:
        record_conversation(proxy.url, "early", [f"a{i}" for i in range(3)], tags="env=a")
        (reply,) = record_conversation(proxy.url, "spanning", ["b0"], tags="env=b")
        proxy.wait_all_records()
        cutoff = datetime.now(UTC)
        # the spanning trajectory goes on after the cut-off: its later call rests on its first
        messages = [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "b0"},
            {"role": "assistant", "content": reply["content"]},
            {"role": "user", "content": "b1"},
        ]
        answer = httpx.post(
            f"{proxy.url}/v1/chat/completions",
            json={"model": "tiny", "messages": messages, "max_tokens": 6},
            headers={"X-Trajectory-Id": "spanning", "x-fake": "render"},
            timeout=60,
        )
        assert answer.status_code == 200
        record_conversation(proxy.url, "late", [f"c{i}" for i in range(3)], tags="env=a")
        proxy.wait_all_records()
        spanning = proxy.rows(
            "SELECT received_at, base_call_id FROM llm_calls_stored WHERE trajectory_id = 'spanning' "
            "ORDER BY seq"
        )
        assert spanning[1]["base_call_id"] is not None  # stored against the call before the cut-off

        dry = cli("db", "prune", "--db", db_url, "--before", cutoff.isoformat())
        assert dry.returncode == 0, dry.stderr
        assert "would delete 2 trajectories, 5 calls" in dry.stdout
        assert _count(proxy, "SELECT count(*) AS n FROM llm_calls") == 8  # a dry run deletes nothing

        done = cli("db", "prune", "--db", db_url, "--before", cutoff.isoformat(), "--batch", "1", "--yes")
        assert done.returncode == 0, done.stderr
        assert "deleted 2 trajectories, 5 calls" in done.stdout
        assert [r["trajectory_id"] for r in proxy.rows("SELECT DISTINCT trajectory_id FROM llm_calls")] == [
            "late"
        ]
        assert _count(proxy, "SELECT count(*) AS n FROM trajectories") == 1
        assert _count(proxy, DANGLING) == 0

        # the view, the API and the export say the same
        listed = httpx.get(f"{proxy.url}/tokentrail/v1/trajectories").json()["data"]
        assert [t["id"] for t in listed] == ["late"]
        for gone in ("early", "spanning"):
            assert httpx.get(f"{proxy.url}/tokentrail/v1/trajectories/{gone}").status_code == 404
        assert view_rows(proxy) == api_calls(proxy, "late")
        out = tmp_path / "after.jsonl"
        exported = cli("export", "--db", db_url, "--format", "jsonl", "--out", str(out))
        assert exported.returncode == 0, exported.stderr
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        api = httpx.get(f"{proxy.url}/tokentrail/v1/trajectories/late/sequences").json()["sequences"]
        assert [line["input_ids"] for line in lines] == [s["input_ids"] for s in api]
        assert {line["trajectory_id"] for line in lines} == {"late"}

        # nothing matches now: a second prune deletes nothing
        again = cli("db", "prune", "--db", db_url, "--before", cutoff.isoformat(), "--yes")
        assert "deleted 0 trajectories" in again.stdout


def test_prune_selects_by_tag_and_finished_and_refuses_an_empty_selection(
    fake: tuple[FakeUpstream, str], tmp_path: Path, db_url: str
) -> None:
    with running_proxy(fake[1], tmp_path, db_url=db_url) as proxy:
        for name, tags in (("a1", "env=a"), ("a2", "env=a"), ("b1", "env=b")):
            record_conversation(proxy.url, name, ["x", "y"], tags=tags)
        proxy.wait_all_records()
        assert httpx.post(f"{proxy.url}/tokentrail/v1/trajectories/a1/finish").status_code == 200
        nothing = cli("db", "prune", "--db", db_url, "--yes")
        assert nothing.returncode == 2
        assert "say which trajectories" in nothing.stderr
        bad = cli("db", "prune", "--db", db_url, "--tag", "env")
        assert bad.returncode == 2
        assert "key=value" in bad.stderr
        done = cli("db", "prune", "--db", db_url, "--tag", "env=a", "--unfinished", "--yes")
        assert "deleted 1 trajectories, 2 calls" in done.stdout, done.stdout + done.stderr
        left = sorted(r["id"] for r in proxy.rows("SELECT id FROM trajectories"))
        assert left == ["a1", "b1"]
        ids = tmp_path / "ids.txt"
        ids.write_text("b1\nnot-there\n")
        done = cli("db", "prune", "--db", db_url, "--ids", str(ids), "--yes")
        assert "deleted 1 trajectories, 2 calls" in done.stdout, done.stdout + done.stderr
        assert [r["id"] for r in proxy.rows("SELECT id FROM trajectories")] == ["a1"]


def test_a_prune_beside_the_recording_proxy_loses_no_call_and_leaves_no_dangling_base(
    fake: tuple[FakeUpstream, str], tmp_path: Path, db_url: str
) -> None:
    """Recorders keep adding calls, to new trajectories and to the very ones being pruned, until the
    prune ends; each call's record must be in the database, stored whole or against a base that is
    there, and read back through the view and the API alike."""
    with running_proxy(fake[1], tmp_path, db_url=db_url) as proxy:
        old = [f"old-{i:03d}" for i in range(60)]
        _record_many(proxy, old, turns=3)
        proxy.wait_all_records()
        cutoff = datetime.now(UTC)
        assert _count(proxy, "SELECT count(*) AS n FROM llm_calls_stored") == 180
        pruned = threading.Event()
        sent: list[tuple[str, int]] = []  # (trajectory, calls sent)
        errors: list[BaseException] = []

        def recorder(worker: int) -> None:
            try:
                round_ = 0
                while not pruned.is_set() or round_ < 2:
                    # a new trajectory, and one of those being pruned (a call to it may see it go)
                    for trajectory in (f"new-{worker}-{round_}", old[(worker * 7 + round_) % len(old)]):
                        record_conversation(proxy.url, trajectory, ["p", "q"])
                        sent.append((trajectory, 2))
                    round_ += 1
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=recorder, args=(w,)) for w in range(3)]
        for thread in threads:
            thread.start()
        engine = make_engine(db_url)
        try:
            summary = prune(engine, PruneSelection(before=cutoff), batch=5)
        finally:
            pruned.set()
            for thread in threads:
                thread.join(120)
            engine.dispose()
        assert not errors
        proxy.wait_all_records()
        writer = proxy.runtime.writer
        assert writer.failed == 0
        assert writer.written == writer.submitted
        assert summary.trajectories >= 1
        assert _count(proxy, DANGLING) == 0
        # every call sent is in the database: all of a new trajectory's, and of an old one at least
        # the calls sent since its prune (the prune may have taken calls sent before it)
        new_sent = sum(n for t, n in sent if t.startswith("new-"))
        assert (
            _count(proxy, "SELECT count(*) AS n FROM llm_calls WHERE trajectory_id LIKE 'new-%'") == new_sent
        )
        assert _count(proxy, "SELECT count(*) AS n FROM llm_calls WHERE prompt_token_ids IS NULL") == 0
        for trajectory in {t for t, _ in sent}:
            rows = [r for r in view_rows(proxy) if r[0] == trajectory]
            if rows:
                assert rows == api_calls(proxy, trajectory)
                assert [r[2] for r in rows] == list(range(len(rows)))  # seq without gaps


def _record_many(proxy: Proxy, trajectories: list[str], turns: int) -> None:
    def run(chunk: list[str]) -> None:
        with httpx.Client(timeout=60) as client:
            for trajectory in chunk:
                record_conversation(proxy.url, trajectory, [f"t{j}" for j in range(turns)], client=client)

    threads = [threading.Thread(target=run, args=(trajectories[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)


# ---- archive, then prune what was archived ----


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root).parent) for p in root.rglob("part-*"))


def test_archive_per_tag_then_prune_only_what_was_exported_and_not_changed_since(
    fake: tuple[FakeUpstream, str], tmp_path: Path, db_url: str
) -> None:
    archive = tmp_path / "archive"
    with running_proxy(fake[1], tmp_path, db_url=db_url) as proxy:
        for name, tags in (("a1", "env=a"), ("a2", "env=a"), ("b1", "env=b"), ("n1", None)):
            record_conversation(proxy.url, name, ["x", "y"], tags=tags)
        proxy.wait_all_records()
        args = [
            "export",
            "--db",
            db_url,
            "--format",
            "jsonl",
            "--out-dir",
            str(archive),
            "--split",
            "tag:env",
        ]
        exported = cli(*args, "--mark-exported")
        assert exported.returncode == 0, exported.stderr
        assert "marked 4 of 4 trajectories exported" in exported.stdout
        assert _files(archive) == ["_untagged", "env=a", "env=b"]
        in_a = [
            json.loads(line) for f in (archive / "env=a").iterdir() for line in f.read_text().splitlines()
        ]
        api = httpx.get(f"{proxy.url}/tokentrail/v1/trajectories/a2/sequences").json()["sequences"]
        assert [s["input_ids"] for s in in_a if s["trajectory_id"] == "a2"] == [s["input_ids"] for s in api]
        assert {s["trajectory_id"] for s in in_a} == {"a1", "a2"}

        # a2 gets a call after the export, b1 a reward: neither archive holds that
        record_conversation(proxy.url, "a2", ["later"])
        proxy.wait_all_records()
        rewarded = httpx.post(f"{proxy.url}/tokentrail/v1/trajectories/b1/reward", json={"reward": 1.0})
        assert rewarded.status_code == 200
        dry = cli("db", "prune", "--db", db_url, "--exported")
        assert "would delete 2 trajectories, 4 calls" in dry.stdout, dry.stdout + dry.stderr
        done = cli("db", "prune", "--db", db_url, "--exported", "--yes")
        assert "deleted 2 trajectories" in done.stdout
        assert sorted(r["id"] for r in proxy.rows("SELECT id FROM trajectories")) == ["a2", "b1"]

        # archiving again adds files beside the first ones, and never replaces one
        again = cli(*args, "--mark-exported")
        assert again.returncode == 0, again.stderr
        assert _files(archive) == ["_untagged", "env=a", "env=a", "env=b", "env=b"]
        assert (
            "deleted 2 trajectories, 5 calls"
            in cli("db", "prune", "--db", db_url, "--exported", "--yes").stdout
        )


def test_parquet_archive_per_day_through_a_pyarrow_url_reads_back_as_a_dataset(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    import pyarrow.dataset as ds

    with running_proxy(fake[1], tmp_path) as proxy:
        for name in ("d1", "d2"):
            record_conversation(proxy.url, name, ["x", "y", "z"])
        proxy.wait_all_records()
        url = (tmp_path / "by-day").as_uri()  # file:///...: opened with pyarrow.fs, as s3:// would be
        done = cli("export", "--db", proxy.db_url, "--format", "parquet", "--out-dir", url)
        assert done.returncode == 0, done.stderr
        table = ds.dataset(tmp_path / "by-day", format="parquet", partitioning="hive").to_table()
        today = datetime.now(UTC).date().isoformat()
        assert set(table.column("day").to_pylist()) == {today}  # both made today (UTC)
        api = httpx.get(f"{proxy.url}/tokentrail/v1/trajectories/d2/sequences").json()["sequences"]
        rows = [r for r in table.to_pylist() if r["trajectory_id"] == "d2"]
        assert [r["input_ids"] for r in rows] == [s["input_ids"] for s in api]
    bad = cli(
        "export", "--db", proxy.db_url, "--format", "jsonl", "--out-dir", str(tmp_path), "--split", "week"
    )
    assert bad.returncode == 2
    assert "--split 'week': use day or tag:<key>" in bad.stderr


# ---- retention in the background ----


def test_retention_prunes_old_finished_trajectories_at_start_and_reports_it_in_the_metrics(
    fake: tuple[FakeUpstream, str], tmp_path: Path, db_url: str
) -> None:
    with running_proxy(fake[1], tmp_path, db_url=db_url) as proxy:
        for name in ("old-done", "old-open", "new-done"):
            record_conversation(proxy.url, name, ["x", "y", "z"])
        proxy.wait_all_records()
        for name in ("old-done", "new-done"):
            assert httpx.post(f"{proxy.url}/tokentrail/v1/trajectories/{name}/finish").status_code == 200
    engine = make_engine(db_url)
    with engine.begin() as connection:  # ten days ago
        connection.execute(
            text("UPDATE trajectories SET created_at = :t WHERE id LIKE 'old-%'"),
            {"t": datetime.now(UTC) - timedelta(days=10)},
        )
    engine.dispose()
    with running_proxy(fake[1], tmp_path, db_url=db_url, retention_days=5) as proxy:
        deadline = time.monotonic() + 60
        while (samples := scrape(proxy.url)[0])[("tokentrail_retention_runs_total", frozenset())] < 1:
            assert time.monotonic() < deadline, "the retention job never ran"
        assert samples[("tokentrail_retention_pruned_trajectories_total", frozenset())] == 1
        assert samples[("tokentrail_retention_pruned_calls_total", frozenset())] == 3
        assert samples[("tokentrail_retention_last_run_timestamp_seconds", frozenset())] > 0
        left = sorted(r["id"] for r in proxy.rows("SELECT id FROM trajectories"))
        assert left == ["new-done", "old-open"]  # unfinished, or recent: kept
        assert _count(proxy, DANGLING) == 0
    without = cli("serve", "--help")
    assert "TOKENTRAIL_RETENTION_DAYS" in without.stdout


def test_the_readme_prune_and_archive_commands_run_copy_pasted(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    section = README.read_text().split("## Pruning, retention and archives", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 3
    with running_proxy(fake[1], tmp_path) as proxy:
        for name in ("r1", "r2"):
            record_conversation(proxy.url, name, ["x", "y"], tags="env=prod")
            assert httpx.post(f"{proxy.url}/tokentrail/v1/trajectories/{name}/finish").status_code == 200
        proxy.wait_all_records()
        bin_dir = Path(sys.executable).parent
        env = dict(os.environ, TOKENTRAIL_DB=proxy.db_url, PATH=f"{bin_dir}:{os.environ['PATH']}")
        for line in commands:
            done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True)
            assert done.returncode == 0, (line, done.stderr)
        assert "deleted 2 trajectories, 4 calls" in done.stdout  # archived, then pruned
        assert len(list((tmp_path / "archive").rglob("part-*.parquet"))) == 1
        assert proxy.rows("SELECT count(*) AS n FROM trajectories") == [{"n": 0}]


def test_a_call_continuing_a_pruned_trajectory_starts_it_again_stored_whole(
    fake: tuple[FakeUpstream, str], tmp_path: Path, db_url: str
) -> None:
    """The writer still remembers the pruned calls (its drift judge keeps recent calls in memory):
    the next call must not be stored against one of them, which the foreign key would refuse."""
    with running_proxy(fake[1], tmp_path, db_url=db_url) as proxy:
        replies = record_conversation(proxy.url, "again", ["one", "two"])
        proxy.wait_all_records()
        engine = make_engine(db_url)
        try:
            summary = prune(engine, PruneSelection(trajectory_ids=("again",)))
        finally:
            engine.dispose()
        assert summary.calls == 2
        messages = [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": replies[0]["content"]},
            {"role": "user", "content": "two"},
            {"role": "assistant", "content": replies[1]["content"]},
            {"role": "user", "content": "three"},
        ]
        answer = httpx.post(
            f"{proxy.url}/v1/chat/completions",
            json={"model": "tiny", "messages": messages, "max_tokens": 6},
            headers={"X-Trajectory-Id": "again", "x-fake": "render"},
            timeout=60,
        )
        assert answer.status_code == 200
        proxy.wait_all_records()
        assert proxy.runtime.writer.failed == 0
        (row,) = proxy.rows(
            "SELECT seq, base_call_id, prompt_shared_tokens FROM llm_calls_stored "
            "WHERE trajectory_id = 'again'"
        )
        assert row == {"seq": 0, "base_call_id": None, "prompt_shared_tokens": 0}
        (call,) = api_calls(proxy, "again")
        assert call[3]["messages"] == messages
        listed = httpx.get(f"{proxy.url}/tokentrail/v1/trajectories/again").json()
        assert listed["trajectory"]["call_count"] == 1


def test_a_prune_that_cannot_get_the_database_says_so_after_retrying(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'locked.db'}"
    upgrade_database(db_url)
    engine = make_engine(db_url)
    with engine.connect() as holder:  # another writer that never lets go
        holder.exec_driver_sql("BEGIN IMMEDIATE")
        done = cli("db", "prune", "--db", db_url, "--finished", "--yes", TOKENTRAIL_DB_BUSY_TIMEOUT_MS="50")
        holder.rollback()
    engine.dispose()
    assert done.returncode == 1
    assert "tokentrail: database error, prune stopped: database is locked" in done.stderr
    assert "Traceback" not in done.stderr


def test_replicas_started_together_on_a_new_postgresql_migrate_it_once(postgres_url: str) -> None:
    """The compose replicas profile starts two ``serve`` at once on an empty database."""
    db_url = create_database(postgres_url)
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "tokentrail.proxy.cli", "db", "upgrade", "--db", db_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0] * 4, [err for _out, err in results]
