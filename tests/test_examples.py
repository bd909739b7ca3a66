"""``examples/grpo_rounds.py`` runs as documented against TokenTrail and the real CPU vLLM."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Proxy

pytestmark = pytest.mark.vllm

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "grpo_rounds.py"


def test_two_grpo_rounds_around_a_training_pause_export_their_groups(
    vllm_proxy: Proxy, tmp_path: Path
) -> None:
    out = tmp_path / "groups.parquet"
    command = [sys.executable, str(EXAMPLE), "--proxy", vllm_proxy.url, "--db", vllm_proxy.db_url]
    done = subprocess.run(
        [*command, "--samples", "3", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=dict(os.environ, HF_DATASETS_OFFLINE="1"),
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "trainer: paused=True, policy version -> step-" in done.stdout
    rows = re.findall(
        r"^  (round\d-task\d) +(\S+) +reward ([\d.]+) advantage +(\S+) policy (\S+)$", done.stdout, re.M
    )
    assert len({trajectory for _, trajectory, *_ in rows}) == 12  # 2 rounds x 2 tasks x 3 samples
    assert sorted({group for group, *_ in rows}) == [
        "round1-task0",
        "round1-task1",
        "round2-task0",
        "round2-task1",
    ]
    new_version = re.search(r"policy version -> (\S+),", done.stdout).group(1)  # type: ignore[union-attr]
    assert {version for group, *_, version in rows if group.startswith("round2")} == {new_version}
    assert new_version not in {version for group, *_, version in rows if group.startswith("round1")}
    calls = vllm_proxy.rows("SELECT count(*) AS n FROM llm_calls WHERE outcome = 'ok'")[0]["n"]
    assert calls >= 12
