"""Retokenization drift with the tiny model's real tokenizer: the function and ``tokentrail drift``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tokentrail.client.drift import drift_report, load_tokenizer
from tokentrail.proxy.storage.migrate import upgrade_database

pytestmark = pytest.mark.vllm  # the tiny model's tokenizer is built with the vLLM kit's venv

TEXT = "def lambda_handler(event):\n    return event"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return load_tokenizer(tiny_model_dir)


def _split_first_long_token(tokenizer: Any, ids: list[int]) -> tuple[list[int], int]:
    """Replace the first multi-character token by one token per character: same text, other IDs."""
    for position, token_id in enumerate(ids):
        piece = tokenizer.decode([token_id])
        singles = [tokenizer.token_to_id(ch) for ch in piece]
        if len(piece) > 2 and all(s is not None for s in singles):
            return ids[:position] + singles + ids[position + 1 :], position
    raise AssertionError("no token to split")


def test_canonical_ids_do_not_drift(tokenizer: Any) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False).ids
    report = drift_report(ids, tokenizer)
    assert not report.drifted
    assert report.first_position is None
    assert report.recorded_length == report.retokenized_length == len(ids)


def test_a_non_canonical_tokenization_is_reported_where_it_differs(tokenizer: Any) -> None:
    canonical = tokenizer.encode(TEXT, add_special_tokens=False).ids
    recorded, position = _split_first_long_token(tokenizer, canonical)
    assert tokenizer.decode(recorded) == tokenizer.decode(canonical)
    report = drift_report(recorded, tokenizer)
    assert report.drifted
    assert report.first_position == position
    (span,) = report.spans
    assert span.retokenized == [canonical[position]]
    assert len(span.recorded) > 1
    assert report.retokenized_length == len(canonical)


def test_drift_command_over_a_stored_trajectory(tokenizer: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade_database(db_url)
    canonical = tokenizer.encode(TEXT, add_special_tokens=False).ids
    drifting, position = _split_first_long_token(tokenizer, canonical)
    engine = create_engine(db_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO trajectories (id, created_at, updated_at) "
                "VALUES ('t1', '2026-01-01', '2026-01-01')"
            )
        )
        connection.execute(
            text(
                "INSERT INTO llm_calls_stored (id, trajectory_id, seq, route, stream, received_at, outcome, "
                "integrity, prompt_rest_ids) "
                "VALUES ('c1', 't1', 0, '/v1/completions', 0, '2026-01-01', 'ok', 'ok', :p)"
            ),
            {"p": json.dumps(canonical)},
        )
        connection.execute(
            text("INSERT INTO completions (call_id, choice_index, token_ids) VALUES ('c1', 0, :t)"),
            {"t": json.dumps(drifting)},
        )
    engine.dispose()
    command = [
        sys.executable,
        "-m",
        "tokentrail.proxy.cli",
        "drift",
        "t1",
        "--tokenizer",
        str(tiny_model_dir),
    ]
    table = subprocess.run([*command, "--db", db_url], capture_output=True, text=True, check=False)
    assert table.returncode == 0, table.stderr
    assert table.stdout.strip().splitlines()[-1].startswith("1 of 2 sequences drift;")
    as_json = subprocess.run([*command, "--db", db_url, "--json"], capture_output=True, text=True, check=True)
    prompt, choice = json.loads(as_json.stdout)
    assert (prompt["part"], prompt["drift_spans"]) == ("prompt", 0)
    assert (choice["part"], choice["first_position"]) == ("choice 0", position)
    unknown = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokentrail.proxy.cli",
            "drift",
            "nope",
            "--tokenizer",
            str(tiny_model_dir),
            "--db",
            db_url,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert unknown.returncode == 1
    assert "no calls recorded for trajectory 'nope'" in unknown.stderr
