"""The README's no-GPU demo runs as documented: ``deploy/demo/try-cpu.sh`` then ``... stop``.

It reuses the session's vLLM (``TOKENTRAIL_DEMO_VLLM_URL``, one vLLM per run) and its own folder for
the database, logs and pid files; everything else is the script as a user runs it.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.servers import free_socket

pytestmark = pytest.mark.vllm

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "demo" / "try-cpu.sh"


def _demo(argument: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), argument], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_demo_records_an_agent_prints_its_trajectory_and_stops(vllm_url: str, tmp_path: Path) -> None:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = dict(
        os.environ,
        TOKENTRAIL_DEMO_VLLM_URL=vllm_url,
        TOKENTRAIL_DEMO_DIR=str(tmp_path),
        TOKENTRAIL_PORT=str(port),
    )
    try:
        started = _demo("start", env)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        out = started.stdout
        trajectory_id = re.search(r"trajectory_id = '(demo-\w+)'", out).group(1)  # type: ignore[union-attr]
        engine = create_engine(f"sqlite:///{tmp_path / 'tokentrail.db'}")
        with engine.connect() as connection:
            rows = connection.execute(
                text("SELECT outcome FROM llm_calls WHERE trajectory_id = :t"), {"t": trajectory_id}
            ).all()
        engine.dispose()
        assert len(rows) >= 3  # three user turns, more calls if the model used the tool
        assert all(row.outcome == "ok" for row in rows)
        assert f"({len(rows)} rows)" in out  # the SQL rows were printed
        # the demo runs TokenTrail with --token-in: the agent's turns are one exact training sequence
        whole = rf"sequence 0: \d+ tokens, \d+ generated \(loss_mask 1\), from {len(rows)} calls"
        assert re.search(whole, out)
        assert "sequence 1:" not in out
        assert "Stop:  bash deploy/demo/try-cpu.sh stop" in out
        # where to look, and what produced the tokens (learned from the vLLM it runs against)
        assert f"trajectory:  http://127.0.0.1:{port}/tokentrail/ui/#/t/{trajectory_id}" in out
        assert re.search(r"certificate [0-9a-f]{32} \(every call\):", out)
        assert '  model: "tiny"' in out
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # TokenTrail is left running for the user's own client
    finally:
        stopped = _demo("stop", env)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped TokenTrail" in stopped.stdout
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
