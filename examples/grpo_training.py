"""A closed GRPO loop on CPU: rollouts through TokenTrail, one policy-gradient step on what it recorded,
the new weights pushed back to vLLM while TokenTrail holds the agents, and the next round sampled by them.

Each round, in order:

1. Strands agents with a calculator tool, in GRPO groups (one per task), run through TokenTrail with
   token-in and logprobs;
2. a checker scores each trajectory (its reward);
3. ``tokentrail export --by-group`` writes the round's sequences (``--min-weight-version``: this round's);
4. ``tokentrail verify`` checks the round's tokens against the weights that sampled them, and one
   policy-gradient step runs on the Hugging Face copy of the model: the clipped importance ratio
   against the recorded sampling logprobs (the behaviour policy), the exported group advantages, the
   loss mask;
5. TokenTrail pauses the fleet (``keep``); the next round's agents start and are held; the weights go to
   vLLM (``/collective_rpc`` ``reload_weights`` from the saved checkpoint, then ``/reset_prefix_cache``:
   the cache holds keys and values computed by the old weights);
6. a new weight version is set through TokenTrail, and TokenTrail resumes.

    python examples/grpo_training.py --proxy http://127.0.0.1:8000 --vllm http://127.0.0.1:8001 \\
        --db sqlite:///tokentrail.db --model ~/.cache/tokentrail/demo/model --work /tmp/grpo

vLLM must run with ``VLLM_SERVER_DEV_MODE=1`` (pause, resume, versions, ``/collective_rpc``).
``--model`` is the folder vLLM serves (the trainer starts from it; it is not changed). Needs the
``dev`` extra (Strands, pyarrow) and the ``verify`` extra (torch, transformers).

Plain PyTorch, not TRL: TRL's GRPOTrainer generates its own rollouts and has no entry for recorded token
sequences with their sampling logprobs; the loss is ten lines here, the same clipped objective.

No forced tool call (``tool_choice: "required"``): vLLM applies the grammar's mask before it computes the
logprobs it returns, so a constrained call's recorded logprobs are not the model's (``verify`` shows
|Δ| of about 7 on the tiny model) and are not a behaviour policy a trainer can divide by.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import torch
from strands import Agent, tool
from strands.hooks import BeforeModelCallEvent
from strands.types.exceptions import MaxTokensReachedException
from transformers import AutoModelForCausalLM

from tokentrail.client import VLLMModel
from tokentrail.proxy.training.verify import Scorer, verify

TASKS = [(17, 19), (23, 29)]
CLIP = 0.2  # PPO/GRPO's clip range of the importance ratio


@tool
def calculator(expression: str = "") -> str:
    """Evaluate a product such as 17 * 19."""
    left, _, right = expression.partition("*")
    try:
        return str(int(left) * int(right))
    except ValueError:
        return "error: write the product as A * B"


def checker(answer: int, reply: str) -> float:
    """1.0 for the right number in the reply; else half the share of its digits the reply contains,
    less 0.001 per character (a length penalty: the tiny CPU model answers gibberish, and rewards must
    still differ within a group for the group's advantages to exist)."""
    if str(answer) in reply:
        return 1.0
    digits = set(str(answer))
    return round(0.5 * len(digits & set(reply)) / len(digits) - 0.001 * len(reply), 4)


@dataclass
class Round:
    index: int
    threads: list[threading.Thread] = field(default_factory=list)
    results: list[tuple[str, str, float]] = field(default_factory=list)  # group, trajectory, reward
    calls: dict[str, int] = field(default_factory=dict)  # model calls each agent made
    errors: list[str] = field(default_factory=list)


def rollout(proxy: str, model_id: str, group_id: str, a: int, b: int, out: Round) -> None:
    """One agent, one trajectory in ``group_id``, token-in and logprobs on: the question, then a
    follow-up in the same conversation (the second call is one token-in continues)."""
    trajectory_id = f"{group_id}-{uuid.uuid4().hex[:6]}"
    model = VLLMModel(
        base_url=proxy + "/v1",
        model_id=model_id,
        return_token_ids=True,
        trajectory_id=trajectory_id,
        headers={"X-Trajectory-Group": group_id, "X-TokenTrail-Token-In": "true"},
        params={"temperature": 1.0, "max_tokens": 24, "logprobs": True},
    )
    agent = Agent(model=model, tools=[calculator], callback_handler=None)
    out.calls[trajectory_id] = 0

    def count_call(event: BeforeModelCallEvent) -> None:
        out.calls[trajectory_id] += 1

    agent.hooks.add_callback(BeforeModelCallEvent, count_call)
    try:
        for turn in (f"What is {a} * {b}?", "Check it with the calculator; answer with the number only."):
            # a reply cut at its budget ends the turn; its text so far is scored
            with contextlib.suppress(MaxTokensReachedException):
                agent(turn)
    except Exception as exc:  # an agent call that failed: reported, never hidden
        out.errors.append(f"{trajectory_id}: {type(exc).__name__}: {exc}")
        return
    reply = " ".join(
        block.get("text", "")
        for message in agent.messages
        if message["role"] == "assistant"
        for block in message["content"]
    )
    out.results.append((group_id, trajectory_id, checker(a * b, reply)))


RUN = uuid.uuid4().hex[:4]  # in every group's name: a group's advantages are over all its members, so
# a second run against the same database must not join the first one's groups


def start_round(proxy: str, model_id: str, index: int, samples: int) -> Round:
    """Every agent of the round at once (while the fleet is paused they wait at TokenTrail)."""
    this = Round(index)
    for task, (a, b) in enumerate(TASKS):
        group_id = f"{RUN}-round{index}-task{task}"
        for _ in range(samples):
            thread = threading.Thread(target=rollout, args=(proxy, model_id, group_id, a, b, this))
            this.threads.append(thread)
            thread.start()
    return this


def finish_round(proxy: str, this: Round) -> None:
    """Wait for the agents and for TokenTrail to have written every call they made (its writer
    commits a moment after the answer, unless it runs with TOKENTRAIL_DURABLE=true); then reward."""
    for thread in this.threads:
        thread.join()
    deadline = time.monotonic() + 60
    for trajectory_id, made in this.calls.items():
        api = f"{proxy}/tokentrail/v1/trajectories/{trajectory_id}?token_ids=false"
        while (answer := httpx.get(api, timeout=30)).status_code == 404 or len(answer.json()["calls"]) < made:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{trajectory_id}: {made} calls made, not all recorded after 60 s")
            time.sleep(0.05)
    for _, trajectory_id, reward in this.results:
        api = f"{proxy}/tokentrail/v1/trajectories/{trajectory_id}"
        httpx.post(api + "/reward", json={"reward": reward}, timeout=30).raise_for_status()
        httpx.post(api + "/finish", timeout=30).raise_for_status()
    for group in sorted({g for g, _, _ in this.results}):
        rewards = ", ".join(f"{r:.2f}" for g, _, r in sorted(this.results) if g == group)
        print(f"round {this.index} {group}: rewards {rewards}")
    for error in this.errors:
        print(f"round {this.index} agent failed: {error}")


def export_round(db: str, version: str, out: Path, this: Round) -> list[dict[str, Any]]:
    """``tokentrail export --by-group`` of the finished groups sampled under ``version`` or later; every
    agent of the round must be in it."""
    tokentrail = Path(sys.executable).with_name("tokentrail")
    command = [str(tokentrail), "export", "--db", db, "--format", "parquet", "--out", str(out)]
    done = subprocess.run(
        [*command, "--by-group", "--finished", "--min-weight-version", version],
        check=False,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"tokentrail export failed: {done.stderr.strip()[-2000:]}")
    print(f"export: {done.stdout.strip()}")
    rows: list[dict[str, Any]] = pq.read_table(out).to_pylist()
    missing = {t for _, t, _ in this.results} - {row["trajectory_id"] for row in rows}
    if missing:
        raise RuntimeError(f"agents' trajectories not in the export: {sorted(missing)}")
    return rows


def policy_gradient_step(model: Any, optimizer: torch.optim.Optimizer, rows: list[dict[str, Any]]) -> str:
    """One GRPO step: per masked token, -min(r A, clip(r) A) with r = exp(new logprob - recorded one)."""
    model.train()
    losses = []
    ratios = []
    for row in rows:
        if row["advantage"] is None:  # a group whose rewards were all equal teaches nothing
            continue
        positions = torch.tensor([p for p, m in enumerate(row["loss_mask"]) if m and p > 0])
        ids = torch.tensor([row["input_ids"]])
        logits = model(input_ids=ids, logits_to_keep=positions - 1).logits[0].float()
        new = torch.log_softmax(logits, -1).gather(-1, ids[0, positions][:, None])[:, 0]
        old = torch.tensor([row["logprobs"][p] for p in positions.tolist()])
        ratio = torch.exp(new - old)
        advantage = float(row["advantage"])
        clipped = torch.clamp(ratio, 1 - CLIP, 1 + CLIP)
        losses.append(-torch.minimum(ratio * advantage, clipped * advantage))
        ratios.append(ratio.detach())
    if not losses:
        return "no sequence with an advantage: no step"
    loss = torch.cat(losses).mean()  # token-level mean over the batch, as GRPO's DAPO-style loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    ratio = torch.cat(ratios)
    outside = int(((ratio < 1 - CLIP) | (ratio > 1 + CLIP)).sum())
    return (
        f"loss {loss.item():+.4f} over {ratio.numel()} tokens of {len(losses)} sequences, "
        f"ratio mean {ratio.mean().item():.4f} max |r-1| {(ratio - 1).abs().max().item():.4f}, "
        f"{outside} clipped"
    )


def save_checkpoint(model: Any, base: Path, out: Path) -> None:
    """The weights as vLLM serves them (bf16 safetensors) beside the base model's config and tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    for item in base.iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy(item, out / item.name)
    state = {name: tensor.detach().to(torch.bfloat16) for name, tensor in model.state_dict().items()}
    from safetensors.torch import save_file

    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def checkpoint_digests(path: Path) -> dict[str, str]:
    """sha256 of each saved tensor's bytes, as vLLM's ``/weight_checker`` computes them."""
    from safetensors.torch import load_file

    return {
        name: hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
        for name, t in load_file(str(path / "model.safetensors")).items()
    }


EMPTY = hashlib.sha256(b"").hexdigest()


def weight_check(vllm: str, checkpoint: Path) -> str:
    """Compare vLLM's per-tensor checksums with the trainer's checkpoint: every tensor vLLM can show
    must match (on CPU, vLLM repacks its linear layers for its kernels and shows them empty)."""
    answer = httpx.post(vllm + "/weight_checker", json={"action": "checksum"}, timeout=120)
    answer.raise_for_status()
    served = {name.split(":")[-1]: digest for name, digest in answer.json()["checksums"].items()}
    trainer = checkpoint_digests(checkpoint)
    shown = {name: d for name, d in served.items() if d != EMPTY}
    mismatched = sorted(name for name, d in shown.items() if trainer.get(name) != d)
    if mismatched:
        raise RuntimeError(f"vLLM's weights differ from the trainer's: {', '.join(mismatched)}")
    return f"{len(shown)} of {len(served)} tensors match the trainer's ({len(served) - len(shown)} repacked)"


def push_weights(proxy: str, vllm: str, checkpoint: Path, version: str, next_round: Any) -> str:
    """Pause the fleet at TokenTrail (keep), let ``next_round()`` start agents (they are held), load the
    checkpoint into vLLM, drop its prefix cache, set the version, resume. Returns what it cost."""
    started = time.perf_counter()
    httpx.post(f"{proxy}/tokentrail/v1/pause?mode=keep", timeout=600).raise_for_status()
    try:
        waiting = next_round()
        deadline = time.monotonic() + 60
        while waiting and httpx.get(f"{proxy}/tokentrail/v1/pause").json()["held_now"] < waiting:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not all {waiting} agents reached TokenTrail's pause in 60 s")
            time.sleep(0.05)  # until every new agent's first call is held (nothing to wait on but this)
        held_from = time.perf_counter()
        rpc = {"method": "reload_weights", "kwargs": {"weights_path": str(checkpoint)}}
        httpx.post(vllm + "/collective_rpc", json=rpc, timeout=600).raise_for_status()
        loaded = time.perf_counter()
        httpx.post(vllm + "/reset_prefix_cache", timeout=60).raise_for_status()
        update = httpx.post(f"{proxy}/update_weight_version", json={"new_version": version}, timeout=60)
        update.raise_for_status()
    finally:  # never leave the fleet paused
        state = httpx.post(f"{proxy}/tokentrail/v1/resume", timeout=600).raise_for_status().json()
    done = time.perf_counter()
    return (
        f"push: paused (keep), {state['held_total']} calls held so far, reload_weights "
        f"{loaded - held_from:.2f} s, version -> {version}; agents held {done - held_from:.2f} s "
        f"(pause to resume {done - started:.2f} s)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxy", default="http://127.0.0.1:8000", help="TokenTrail's URL")
    parser.add_argument("--vllm", default="http://127.0.0.1:8001", help="vLLM's URL (for the weights)")
    parser.add_argument("--db", default="sqlite:///tokentrail.db", help="TokenTrail's database URL")
    parser.add_argument("--model", type=Path, required=True, help="the model folder vLLM serves")
    parser.add_argument("--model-id", default="tiny", help="the served model name")
    parser.add_argument("--work", type=Path, default=Path("grpo-work"), help="checkpoints and exports")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--samples", type=int, default=3, help="trajectories per task (the group size)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    version = httpx.get(f"{args.vllm}/weight_info", timeout=30).json()["weight_version"]
    weights = args.model  # the checkpoint vLLM samples with now
    current = start_round(args.proxy, args.model_id, 1, args.samples)
    for index in range(1, args.rounds + 1):
        finish_round(args.proxy, current)
        rows = export_round(args.db, version, args.work / f"round-{index}.parquet", current)
        check = verify(Scorer(weights, device="cpu"), rows)
        print(f"verify round {index} under {version}: {'PASS' if check.passed() else 'FAIL'}: {check.line()}")
        if not check.passed():  # the trainer's logprobs would not be the ones vLLM sampled with
            print(f"not training on round {index}: vLLM did not sample it with {weights}", file=sys.stderr)
            return 1
        print(f"step {index}: {policy_gradient_step(model, optimizer, rows)}")
        weights = args.work / f"step-{index}"
        save_checkpoint(model, args.model, weights)
        version = f"step-{index}-{uuid.uuid4().hex[:4]}"
        following = index + 1

        def next_round(following: int = following) -> int:
            nonlocal current
            if following > args.rounds:
                return 0
            current = start_round(args.proxy, args.model_id, following, args.samples)
            return len(current.threads)

        print(push_weights(args.proxy, args.vllm, weights, version, next_round))
        print(f"weight_checker: {weight_check(args.vllm, weights)}")
    summary = {"final_version": version, "final_weights": str(weights), "rounds": args.rounds}
    print(f"done: {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
