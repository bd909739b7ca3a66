"""Data lifecycle on SQLite and PostgreSQL: the foreign key on ``base_call_id`` (migration 0007, on a
database made by 0006), ``tokentrail db prune`` (whole trajectories, beside a recording proxy), and
the view, the API and the export agreeing afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from tests.conftest import Proxy
from tests.conversations import record_conversation
from tests.fake_upstream import FakeUpstream
from tests.servers import serve_in_thread
from tokentrail.proxy.app import create_app
from tokentrail.proxy.server.own_headers import UVICORN_OPTIONS
from tokentrail.proxy.settings import Settings
from tokentrail.proxy.storage.engine import make_engine
from tokentrail.proxy.storage.migrate import alembic_config, current_revision, upgrade_database

DANGLING = (
    "SELECT count(*) AS n FROM llm_calls_stored c WHERE c.base_call_id IS NOT NULL "
    "AND NOT EXISTS (SELECT 1 FROM llm_calls_stored b WHERE b.id = c.base_call_id)"
)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokentrail.proxy.cli", *args], capture_output=True, text=True, timeout=300
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
        assert upgrade_database(db_url) == ("0006_stored_calls", "0007_lifecycle")
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
