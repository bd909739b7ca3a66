"""Each Python example of the README's "Coming from strands-vllm" runs as written, through the proxy."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Proxy

pytestmark = pytest.mark.vllm

README = Path(__file__).resolve().parents[1] / "README.md"


def examples() -> list[str]:
    section = README.read_text().split("## Coming from strands-vllm", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


# Each example runs as written and with a budget of 4 tokens, which every rollout reaches: where the
# tiny model stops by itself differs between machines, so both endings must be handled and recorded.
BUDGETS = ["as-written", "budget-4"]


def run_example(code: str, proxy: Proxy, tmp_path: Path, budget: str = "as-written") -> str:
    if budget == "budget-4":
        assert '"max_tokens": 256' in code
        code = code.replace('"max_tokens": 256', '"max_tokens": 4')
    script = tmp_path / "example.py"
    script.write_text(code)
    env = dict(os.environ, VLLM_BASE_URL=proxy.url + "/v1", VLLM_MODEL_ID="tiny")
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_the_readme_has_the_four_seed_examples() -> None:
    assert len(examples()) == 4
    assert all("tokentrail.client" in code and "strands_vllm" not in code for code in examples())


def _generated(proxy: Proxy, trajectory_id: str) -> list[int]:
    rows = proxy.rows(
        "SELECT d.token_ids FROM llm_calls c JOIN completions d ON d.call_id = c.id "
        "WHERE c.trajectory_id = :t ORDER BY c.seq",
        t=trajectory_id,
    )
    return [len(json.loads(r["token_ids"])) for r in rows]


@pytest.mark.parametrize("budget", BUDGETS)
def test_basic_example_records_its_trajectory(vllm_proxy: Proxy, tmp_path: Path, budget: str) -> None:
    out = run_example(examples()[0], vllm_proxy, tmp_path, budget)
    trajectory_id = re.search(r"Trajectory: (\w+)", out).group(1)  # type: ignore[union-attr]
    response_tokens = int(re.search(r"Response tokens: (\d+)", out).group(1))  # type: ignore[union-attr]
    vllm_proxy.wait_records(1)
    assert _generated(vllm_proxy, trajectory_id) == [response_tokens]
    assert response_tokens > 0


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("index", [1, 2], ids=["tool-validation", "spans"])
def test_examples_run_and_are_recorded(vllm_proxy: Proxy, tmp_path: Path, index: int, budget: str) -> None:
    out = run_example(examples()[index], vllm_proxy, tmp_path, budget)
    if budget == "budget-4":
        assert "stopped at max_tokens" in out
    vllm_proxy.wait_all_records()
    rows = vllm_proxy.rows("SELECT outcome, integrity FROM llm_calls")
    assert rows
    assert all(row == {"outcome": "ok", "integrity": "ok"} for row in rows)


@pytest.mark.parametrize("budget", BUDGETS)
def test_loss_mask_example_masks_exactly_the_recorded_generated_tokens(
    vllm_proxy: Proxy, tmp_path: Path, budget: str
) -> None:
    out = run_example(examples()[3], vllm_proxy, tmp_path, budget)
    trajectory_id = re.search(r"Trajectory: (\w+), sequences: \d+", out).group(1)  # type: ignore[union-attr]
    response_tokens = int(re.search(r"Response tokens: (\d+)", out).group(1))  # type: ignore[union-attr]
    vllm_proxy.wait_all_records()
    assert sum(_generated(vllm_proxy, trajectory_id)) == response_tokens
