"""``tokentrail export`` and ``tokentrail reward`` on a real SQLite file filled through the writer."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlalchemy import create_engine, text

from tokentrail.proxy.recording.records import CallRecord, ChoiceRecord, Integrity
from tokentrail.proxy.recording.writer import RecordWriter
from tokentrail.proxy.storage.engine import make_engine
from tokentrail.proxy.storage.migrate import upgrade_database
from tokentrail.proxy.trajectory.drift import DriftJudge

PROMPT = list(range(1000, 1020))
FIRST = list(range(2000, 2010))
NEW_TURN = [3000, 3001, 3002, 3003, 3004]
SECOND = list(range(4000, 4010))
# The peak of this process's own memory: VmHWM belongs to the process image, while ru_maxrss survives
# exec and so reports the forking test process's size when that was larger (a CI run saw 1.2 GB that way).
PEAK_RSS = (
    "import sys; from tokentrail.proxy.cli import main; rc = main(sys.argv[1:]); "
    "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]; "
    "print('PEAK_RSS_KB', hwm, file=sys.stderr); sys.exit(rc)"
)


def _record(writer: RecordWriter, trajectory: str, prompt: list[int], generated: list[int]) -> CallRecord:
    record = CallRecord(
        call_id=f"{trajectory}-{len(prompt)}",
        trajectory_id=trajectory,
        route="/v1/chat/completions",
        received_at=time.time(),
        seq=writer.next_ordinal(trajectory),
        integrity=Integrity.OK,
        prompt_token_ids=prompt,
        prompt_tokens=len(prompt),
        completion_tokens=len(generated),
    )
    logprobs = [{"token": str(t), "logprob": -0.5} for t in generated]
    record.choices = [ChoiceRecord(0, generated, logprobs, "stop", None, {"role": "assistant"})]
    return record


def fill(db_url: str, trajectories: int, tmp_path: Path) -> float:
    """Two turns per trajectory, the second extending the first; returns the seconds it took."""
    upgrade_database(db_url)
    writer = RecordWriter(
        make_engine(db_url),
        queue_size=50_000,
        batch_size=500,
        retries=0,
        fallback_path=tmp_path / "f.jsonl",
        judge=DriftJudge(),
    )
    writer.start()
    started = time.perf_counter()
    for i in range(trajectories):
        trajectory = f"traj-{i:05d}"
        writer.submit(_record(writer, trajectory, PROMPT, FIRST))
        writer.submit(_record(writer, trajectory, PROMPT + FIRST + NEW_TURN, SECOND))
    writer.close(timeout=600)
    writer._engine.dispose()
    assert writer.written == 2 * trajectories
    return time.perf_counter() - started


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *args], capture_output=True, text=True, check=False
    )


def test_export_of_10000_trajectories_streams_in_bounded_memory_and_loads_with_datasets(
    tmp_path: Path,
) -> None:
    import datasets

    db_url = f"sqlite:///{tmp_path / 'big.db'}"
    fill_seconds = fill(db_url, 10_000, tmp_path)
    out = tmp_path / "sequences.parquet"
    result = _cli("export", "--format", "parquet", "--out", str(out), "--db", db_url)
    assert result.returncode == 0, result.stderr[-2000:]
    peak_kb = int(result.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    summary = result.stdout.strip().splitlines()[-1]
    print(f"\nfill: {fill_seconds:.1f} s; export: {summary}; peak RSS {peak_kb / 1024:.0f} MiB")
    assert (
        "10000 trajectories, 10000 sequences, 450000 tokens (200000 generated), 0 prefix mismatches"
        in summary
    )
    assert peak_kb < 1024 * 1024, "the export should not hold the database in memory"

    table = pq.read_table(out)
    assert table.num_rows == 10_000
    loaded = datasets.load_dataset("parquet", data_files=str(out), split="train")
    engine = create_engine(db_url)
    with engine.connect() as connection:
        trajectories = connection.execute(text("SELECT count(*) FROM trajectories")).scalar_one()
        generated = connection.execute(
            text("SELECT sum(json_array_length(token_ids)) FROM completions")
        ).scalar_one()
    engine.dispose()
    assert len(loaded) == trajectories == 10_000
    assert sum(sum(row) for row in loaded["loss_mask"]) == generated
    first = loaded[0]
    assert first["input_ids"] == PROMPT + FIRST + NEW_TURN + SECOND
    assert first["loss_mask"] == [0] * 20 + [1] * 10 + [0] * 5 + [1] * 10
    assert first["logprobs"][19] is None
    assert first["logprobs"][20] == pytest.approx(-0.5)
    assert len(first["call_ids"]) == 2


def test_jsonl_export_with_filters_and_rewards(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'small.db'}"
    fill(db_url, 3, tmp_path)
    reward = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokentrail.proxy.cli",
            "reward",
            "traj-00001",
            "0.75",
            "--finish",
            "--db",
            db_url,
            "--metadata",
            '{"judge": "exact-match"}',
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert reward.returncode == 0, reward.stderr
    out = tmp_path / "finished.jsonl"
    result = _cli("export", "--format", "jsonl", "--out", str(out), "--finished", "--db", db_url)
    assert result.returncode == 0, result.stderr
    (line,) = out.read_text().splitlines()
    row = json.loads(line)
    assert row["trajectory_id"] == "traj-00001"
    assert row["reward"] == 0.75
    assert row["num_generated"] == 20
    last = tmp_path / "last.jsonl"
    assert (
        _cli(
            "export", "--format", "jsonl", "--out", str(last), "--mode", "last_turn", "--db", db_url
        ).returncode
        == 0
    )
    rows = [json.loads(x) for x in last.read_text().splitlines()]
    assert len(rows) == 3
    assert all(r["input_ids"] == PROMPT + FIRST + NEW_TURN + SECOND for r in rows)


def test_an_export_read_in_small_batches_gives_each_trajectory_once(tmp_path: Path) -> None:
    """Each batch starts after the last trajectory of the one before: none is repeated or skipped."""
    db_url = f"sqlite:///{tmp_path / 'small.db'}"
    fill(db_url, 5, tmp_path)
    out = tmp_path / "all.jsonl"
    result = _cli("export", "--format", "jsonl", "--out", str(out), "--batch", "2", "--db", db_url)
    assert result.returncode == 0, result.stderr
    exported = [json.loads(line)["trajectory_id"] for line in out.read_text().splitlines()]
    assert exported == [f"traj-{i:05d}" for i in range(5)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["reward", "t", "nan"], "finite"),
        (["reward", "t", "1", "--metadata", "[1]"], "JSON object"),
        (["reward", "x" * 300, "1"], "256"),
        (["export", "--format", "jsonl", "--out", "x.jsonl", "--tag", "novalue"], "key=value"),
        (["export", "--format", "jsonl", "--out", "x.jsonl", "--since", "yesterday"], "ISO"),
        (["export", "--format", "jsonl", "--out", "no/such/x.jsonl"], "cannot write no/such/x.jsonl"),
        (["export", "--format", "parquet", "--out", "no/such/x.parquet"], "cannot write no/such/x.parquet"),
    ],
)
def test_bad_cli_input_is_refused_clearly(tmp_path: Path, args: list[str], message: str) -> None:
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade_database(db_url)
    result = subprocess.run(
        [sys.executable, "-m", "tokentrail.proxy.cli", *args, "--db", db_url],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
