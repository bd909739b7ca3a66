"""The README's copy-paste SQL runs as written against a database the proxy filled."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import Proxy

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_sql_commands(marker: str = "Three questions, copy-paste:") -> list[list[str]]:
    text = README.read_text()
    block = text.split(marker, 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    code = "\n".join(line for line in block.splitlines() if not line.lstrip().startswith("#"))
    words = shlex.split(code)
    commands: list[list[str]] = []
    for word in words:
        if word == "tokentrail":
            commands.append([])
        else:
            commands[-1].append(word)
    return commands


def run_copy_pasted(command: list[str], folder: Path) -> str:
    """Run one README ``tokentrail ...`` command in ``folder`` (where tokentrail.db is); its output."""
    result = subprocess.run(
        [sys.executable, "-m", "tokentrail.proxy.cli", *command],
        cwd=folder,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_readme_has_three_sql_questions() -> None:
    commands = readme_sql_commands()
    assert len(commands) == 3
    assert all(c[0] == "sql" for c in commands)


def test_readme_sql_runs_copy_pasted(fake_proxy: Proxy, tmp_path: Path) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    for stream in (False, True):
        httpx.post(
            fake_proxy.url + "/v1/chat/completions",
            json=dict(body, stream=stream),
            headers={"X-Trajectory-Id": "run-1"},
        )
    fake_proxy.wait_records(2)
    assert (tmp_path / "tokentrail.db").exists()
    outputs = [run_copy_pasted(command, tmp_path) for command in readme_sql_commands()]
    assert re.search(r"ok\s+\|\s+ok\s+\|\s+1", outputs[0])
    assert re.search(r"no_usage\s+\|\s+1", outputs[0])
    assert outputs[1].strip().endswith("(2 rows)")
    turns = json.loads(outputs[2])
    assert [t["seq"] for t in turns] == [0, 1]
    assert json.loads(turns[0]["token_ids"]) == [100, 107, 114]


def test_readme_five_questions_over_the_views_run_copy_pasted(fake_proxy: Proxy, tmp_path: Path) -> None:
    commands = readme_sql_commands("Five questions, copy-paste:")
    assert len(commands) == 5
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    for trajectory, extra in (("good", {}), ("good", {"n": 2}), ("bad", {})):
        headers = {"X-Trajectory-Id": trajectory}
        if trajectory == "bad":
            headers["x-fake"] = "status:500"
        httpx.post(fake_proxy.url + "/v1/chat/completions", json={**body, **extra}, headers=headers)
    httpx.post(fake_proxy.url + "/tokentrail/v1/trajectories/good/reward", json={"reward": 2.5})
    fake_proxy.wait_all_records()
    outputs = [run_copy_pasted(command, tmp_path).splitlines() for command in commands]
    rewarded, by_turn, stops, failing, latency = outputs
    assert [cell.strip() for cell in rewarded[2].split("|")[:3]] == ["good", "2.5", "2"]
    assert rewarded[-1] == "(1 row)"
    assert by_turn[-1] == "(2 rows)"
    assert any(line.startswith("length") and line.rstrip().endswith("3") for line in stops)
    assert [line.split("|")[0].strip() for line in failing[2:-1]] == ["bad"]
    assert latency[2].split("|")[0].strip() == "tiny"
