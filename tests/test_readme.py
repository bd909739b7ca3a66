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


def readme_sql_commands() -> list[list[str]]:
    text = README.read_text()
    block = text.split("Three questions, copy-paste:", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    code = "\n".join(line for line in block.splitlines() if not line.lstrip().startswith("#"))
    words = shlex.split(code)
    commands: list[list[str]] = []
    for word in words:
        if word == "tokentrail":
            commands.append([])
        else:
            commands[-1].append(word)
    return commands


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
    outputs = []
    for command in readme_sql_commands():
        result = subprocess.run(
            [sys.executable, "-m", "tokentrail.proxy.cli", *command],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    assert re.search(r"ok\s+\|\s+ok\s+\|\s+1", outputs[0])
    assert re.search(r"no_usage\s+\|\s+1", outputs[0])
    assert outputs[1].strip().endswith("(2 rows)")
    turns = json.loads(outputs[2])
    assert [t["seq"] for t in turns] == [0, 1]
    assert json.loads(turns[0]["token_ids"]) == [100, 107, 114]
