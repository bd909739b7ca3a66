"""The benchmark scripts still run and still check what they claim (a short run of each).

They print figures rather than assert speeds; what is asserted here is that every call they made
through TokenTrail was recorded with the upstream's exact token IDs, and that nginx and the naive
passthrough really served calls, so the comparison stays meaningful.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _run(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=BENCH.parent
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _require_nginx() -> None:
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        if os.environ.get("CI"):  # .ci/run installs nginx: its absence there is a failure, not a skip
            pytest.fail("nginx is missing under CI")
        pytest.skip("no nginx (apt-get install nginx-light)")


def test_side_by_side_runner_measures_every_target_and_checks_the_records() -> None:
    _require_nginx()
    out = _run(str(BENCH / "run.py"), "--quick", "--duration", "0.4", "--warmup", "0.1")
    rows = [line.split() for line in out.splitlines() if line.startswith(("non-stream", "stream"))]
    targets = {row[-10] for row in rows}  # the target column, counted from the right
    assert targets == {"direct", "nginx", "naive", "tokentrail"}
    assert all(row[-1] == "0" for row in rows), out  # no errors in any cell
    assert "all ok; checked 200 sampled rows' IDs" in out
    assert "0 failed" in out


def _table_row(out: str, label: str) -> list[str]:
    """The cells of one row of bench/agents.py's table (one column per target)."""
    line = next(line for line in out.splitlines() if line.startswith(label))
    return line[len(label) :].split()


def test_agent_benchmark_serves_every_turn_and_records_the_prompt_ids_vllm_used() -> None:
    """8 agents x 6 turns through direct, nginx and TokenTrail; a second TokenTrail for 3 turns."""
    _require_nginx()
    out = _run(str(BENCH / "agents.py"), "--quick", "--turns-list", "3")
    header = next(line.split() for line in out.splitlines() if line.strip().startswith("direct"))
    assert header == ["direct", "nginx", "tokentrail"]
    assert _table_row(out, "errors") == ["0", "0", "0"], out
    assert _table_row(out, "  writer thread's part")[2].endswith("%"), out  # the thread was found by name
    assert "check: 48 rows for 48 calls, all ok; 48 sampled calls' prompt IDs equal the fake's" in out
    assert re.search(r"bytes per trajectory token by turns per agent: 3: [\d.]+ .*, 6: [\d.]+ ", out), out
    assert re.search(r"export \(tokentrail export --format parquet\): 48 sequences, ", out), out
    # Without token-in, a reply re-sent as text re-tokenizes differently at its end, as with a real vLLM.
    assert "(llm_calls.drift): {'first': 8, 'retokenized': 40}" in out


def test_agent_benchmark_with_token_in_keeps_each_trajectory_one_sequence() -> None:
    out = _run(str(BENCH / "agents.py"), "--quick", "--token-in", "--targets", "tokentrail")
    assert _table_row(out, "errors") == ["0"], out
    assert "check: 48 rows for 48 calls, all ok; 48 sampled calls' prompt IDs equal the fake's" in out
    assert "(llm_calls.drift): {'first': 8, 'token_in': 40}" in out
    assert "token-in fallbacks: {'first_call': 8}" in out
    assert re.search(r"export \(tokentrail export --format parquet\): 8 sequences, ", out), out


def test_soak_records_every_mixed_call_once_with_gapless_seq() -> None:
    out = _run(str(BENCH / "soak.py"), "--calls", "600", "--concurrency", "16", "--trajectories", "20")
    assert "rows: 600" in out
    assert "check: every call recorded once, seq gapless, IDs exact" in out


def test_after_sigkill_durable_mode_lost_no_finished_call_and_the_database_reopens_clean() -> None:
    out = _run(str(BENCH / "crash.py"), "--seconds", "1.5", "--concurrency", "16")
    durable = next(line for line in out.splitlines() if line.startswith("durable=true"))
    assert " lost    0 " in durable
    assert out.count("integrity ok, ok calls without completions 0") == 2


def test_prune_bench_prunes_every_filled_call_beside_the_load_on_both_databases() -> None:
    out = _run(str(BENCH / "prune.py"), "--calls", "2000", "--load-s", "1", "--concurrency", "2")
    for db in ("sqlite", "postgresql"):
        assert f"== {db}: prune of 2,000 calls ==" in out
    assert out.count("deleted 200 trajectories, 2000 calls, 2000 completions") == 2
    assert out.count("during / without: p50 x") == 2


@pytest.mark.vllm
def test_storage_check_measures_before_and_after_on_one_database_and_reads_back_the_same(
    vllm_url: str,
) -> None:
    """bench/storage_check.py on the real vLLM, small: stored against bases is smaller than whole,
    and the database migrated down and up again reads back what was recorded."""
    out = _run(
        str(BENCH / "storage_check.py"), "--upstream", vllm_url, "--turns", "4", "--conversations", "2"
    )
    (row,) = [line for line in out.splitlines() if line.startswith("| 4 |")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    before, after = (float(cell.split()[0]) for cell in cells[4:6])
    assert after < before, out
    assert cells[8] == "same", out


def test_agent_benchmark_token_in_modes_stand_in_tokenizes_flat_bytes_per_call() -> None:
    """Token-in rendering whole histories against rendering only the new messages: both keep every
    stored prompt equal to the fake's, and only the stand-in's /tokenize bytes per call stay flat."""
    out = _run(str(BENCH / "agents.py"), "--quick", "--token-in-modes", "--targets", "tokentrail")
    header = next(line.split() for line in out.splitlines() if line.strip().startswith("tokentrail"))
    assert header == ["tokentrail", "ti-full", "ti-stand-in"]
    assert _table_row(out, "errors") == ["0", "0", "0"], out
    for mode in ("ti-full", "ti-stand-in"):
        assert f"{mode}: 48 rows for 48 calls, all ok; 48 sampled calls' prompt IDs equal the fake's" in out
    table = out.split("/tokenize per call", 1)[1]

    def per_call(turn: int) -> list[int]:
        cells = _table_row(table, f"  turn {turn}")
        return [int(cells[i].replace(",", "")) for i in (0, 3, 6)]  # "N B; requests" per target

    off, full, stand_in = zip(per_call(4), per_call(6), strict=True)
    assert off == (0, 0)
    assert full[1] > 1.3 * full[0]  # the whole history, twice, grows with every turn
    assert stand_in[1] <= 1.05 * stand_in[0] < full[0]


def test_arrival_order_bench_finds_every_trajectory_in_order_when_writers_wait() -> None:
    out = _run(str(BENCH / "arrival_order.py"), "--setups", "workers", "--trajectories", "6", "--turns", "3")
    waiting = [line for line in out.splitlines() if "wait (5 s)" in line]
    assert len(waiting) == 2, out  # two rounds
    assert all("6 of   6 trajectories in arrival order" in line for line in waiting), out
