"""``examples/grpo_training.py`` closes the loop on the real CPU vLLM: two rounds of agents through
TokenTrail, a policy-gradient step on each round's export, the weights pushed back while TokenTrail holds
the next round's agents.

Asserted: round 2's calls carry round 2's version; ``tokentrail verify`` passes round 2's tokens under the
weights pushed after round 1 and fails them under the weights before; vLLM's ``/weight_checker`` matches
the trainer's checkpoint; no agent call failed or was lost. The test borrows the session's vLLM and gives
its weights back (the kit's model, reloaded the same way) whatever happens.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Proxy, running_proxy

pytestmark = pytest.mark.vllm

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "grpo_training.py"


@pytest.fixture
def weights_given_back(vllm_url: str, tiny_model_dir: Path) -> Iterator[None]:
    try:
        yield
    finally:
        rpc = {"method": "reload_weights", "kwargs": {"weights_path": str(tiny_model_dir)}}
        httpx.post(vllm_url + "/resume", timeout=60)
        httpx.post(vllm_url + "/collective_rpc", json=rpc, timeout=600).raise_for_status()
        httpx.post(vllm_url + "/reset_prefix_cache", timeout=60).raise_for_status()


def _verify(model: Path, export: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tokentrail.proxy.cli", "verify", "--model", str(model), str(export)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def test_two_rounds_train_on_the_export_and_sample_round_two_with_the_pushed_weights(
    vllm_url: str, tiny_model_dir: Path, tmp_path: Path, weights_given_back: None
) -> None:
    with running_proxy(vllm_url, tmp_path, pause_max_wait_s=300) as proxy:
        _two_rounds(proxy, vllm_url, tiny_model_dir, tmp_path)


def _two_rounds(vllm_proxy: Proxy, vllm_url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    command = [sys.executable, str(EXAMPLE), "--proxy", vllm_proxy.url, "--vllm", vllm_url]
    done = subprocess.run(
        [*command, "--db", vllm_proxy.db_url, "--model", str(tiny_model_dir), "--work", str(work)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env=dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"),
    )
    print("\n" + done.stdout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "agent failed" not in done.stdout
    versions = re.findall(r"version -> (\S+);", done.stdout)
    assert len(versions) == 2
    assert re.findall(r"^verify round \d under \S+: (\w+)", done.stdout, re.M) == ["PASS", "PASS"]
    assert len(re.findall(r"^weight_checker: \d+ of \d+ tensors match", done.stdout, re.M)) == 2

    # round 2's calls carry round 2's version (the one set after round 1's step), round 1's the one before
    vllm_proxy.wait_all_records()
    rows = vllm_proxy.rows(
        "SELECT t.group_id, c.weight_version, c.outcome FROM llm_calls c "
        "JOIN trajectories t ON t.id = c.trajectory_id"
    )
    round1 = {r["weight_version"] for r in rows if "-round1-" in r["group_id"]}
    round2 = {r["weight_version"] for r in rows if "-round2-" in r["group_id"]}
    assert round2 == {versions[0]}
    assert len(round1) == 1
    assert versions[0] not in round1

    # no agent call failed or was lost: every call ok, every agent's trajectory recorded and rewarded
    assert {r["outcome"] for r in rows} == {"ok"}
    trajectories = vllm_proxy.rows(
        "SELECT group_id, reward, finished FROM trajectories WHERE group_id IS NOT NULL"
    )
    assert len(trajectories) == 2 * 2 * 3  # rounds x tasks x samples
    assert all(t["reward"] is not None and t["finished"] for t in trajectories)
    held = re.search(r"push: paused \(keep\), (\d+) calls held", done.stdout)
    assert held is not None
    assert int(held.group(1)) == 2 * 3  # round 2's agents, each held on its first call

    # verify: round 2's tokens agree with the weights pushed after round 1, not with the ones before
    round2_export = work / "round-2.parquet"
    under_new = _verify(work / "step-1", round2_export)
    under_old = _verify(tiny_model_dir, round2_export)
    print(f"under step-1: {under_new.stdout.splitlines()[-1]}")
    print(f"under the kit's weights: {under_old.stdout.splitlines()[-1]}")
    assert under_new.returncode == 0, under_new.stdout
    assert under_old.returncode == 1, under_old.stdout

    # what vLLM serves now is the trainer's last checkpoint, tensor for tensor where vLLM can show it
    # (the CPU backend repacks its linear layers for its kernels: their checksum is of no bytes)
    import torch
    from safetensors.torch import load_file

    trainer = {
        name: hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
        for name, t in load_file(str(work / "step-2" / "model.safetensors")).items()
    }
    answer = httpx.post(vllm_url + "/weight_checker", json={"action": "checksum"}, timeout=120).json()
    served = {name.split(":")[-1]: d for name, d in answer["checksums"].items()}
    shown = {name: d for name, d in served.items() if d != hashlib.sha256(b"").hexdigest()}
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= shown.keys()
    assert {name: trainer[name] for name in shown} == shown
    original = load_file(str(tiny_model_dir / "model.safetensors"))["lm_head.weight"]
    assert not torch.equal(original, load_file(str(work / "step-2" / "model.safetensors"))["lm_head.weight"])
