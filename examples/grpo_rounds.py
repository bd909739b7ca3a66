"""Two rounds of GRPO-style rollouts through TokenTrail, as an RL loop runs them.

Per round and task, several Strands agents (one trajectory each, all in the task's group) answer a
multiplication with a calculator tool; a checker scores each trajectory; between the rounds the
"trainer" pauses the fleet through TokenTrail, bumps the policy version and resumes; at the end the
groups are exported to Parquet with their advantages and loaded with Hugging Face ``datasets``.

    python examples/grpo_rounds.py --proxy http://127.0.0.1:8000 --db sqlite:///tokentrail.db

(next to the no-GPU demo: ``--db sqlite:///$HOME/.cache/tokentrail/demo/tokentrail.db``; it needs the
``dev`` extra, for Strands and ``datasets``)

vLLM must run with ``VLLM_SERVER_DEV_MODE=1`` (its pause, resume and weight-version routes). With the
tiny CPU model the answers are gibberish, so the checker gives partial credit (the share of the
answer's digits the reply contains) and rewards still differ within a group.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import httpx
from strands import Agent, tool
from strands.types.exceptions import MaxTokensReachedException

from tokentrail.client import VLLMModel

TASKS = [(17, 19), (23, 29)]


@tool
def calculator(expression: str) -> str:
    """Evaluate a product such as 17 * 19."""
    left, _, right = expression.partition("*")
    return str(int(left) * int(right))


def checker(answer: int, reply: str) -> float:
    """1.0 for the right number in the reply, else the share of its digits the reply contains."""
    if str(answer) in reply:
        return 1.0
    digits = set(str(answer))
    return round(len(digits & set(reply)) / len(digits), 3)


def rollout(proxy: str, model_id: str, group_id: str, question: str, answer: int) -> tuple[str, float]:
    """One agent, one trajectory in ``group_id``; returns its id and its reward."""
    trajectory_id = f"{group_id}-{uuid.uuid4().hex[:6]}"
    model = VLLMModel(
        base_url=proxy + "/v1",
        model_id=model_id,
        return_token_ids=True,
        trajectory_id=trajectory_id,
        headers={"X-Trajectory-Group": group_id},
        params={"temperature": 1.0, "max_tokens": 24},
    )
    agent = Agent(model=model, tools=[calculator], callback_handler=None)
    try:
        reply = str(agent(question))
    except MaxTokensReachedException:  # the rollout ends at its budget; its text so far is scored
        reply = " ".join(
            block.get("text", "") for message in agent.messages[1:] for block in message["content"]
        )
    return trajectory_id, checker(answer, reply)


def sample_group(
    proxy: str, model_id: str, group_id: str, a: int, b: int, samples: int
) -> list[tuple[str, float]]:
    """``samples`` agents on one task at once, all in ``group_id``."""
    results: list[tuple[str, float]] = []

    def sample() -> None:
        results.append(rollout(proxy, model_id, group_id, f"What is {a} * {b}?", a * b))

    agents = [threading.Thread(target=sample) for _ in range(samples)]
    for thread in agents:
        thread.start()
    for thread in agents:
        thread.join()
    return results


def run_round(proxy: str, model_id: str, round_index: int, samples: int) -> None:
    for task_index, (a, b) in enumerate(TASKS):
        group_id = f"round{round_index}-task{task_index}"
        results = sample_group(proxy, model_id, group_id, a, b, samples)
        for trajectory_id, reward in results:
            api = f"{proxy}/tokentrail/v1/trajectories/{trajectory_id}"
            httpx.post(api + "/reward", json={"reward": reward}, timeout=30).raise_for_status()
            httpx.post(api + "/finish", timeout=30).raise_for_status()
        rewards = ", ".join(f"{reward:.2f}" for _, reward in sorted(results))
        print(f"round {round_index} {group_id}: {samples} trajectories, rewards {rewards}")


def training_step(proxy: str, version: str) -> None:
    """What a trainer does between rounds: pause the fleet (in-flight calls finish), load new weights
    (here only the version), resume; calls arriving meanwhile wait at TokenTrail."""
    paused = httpx.post(f"{proxy}/tokentrail/v1/pause?mode=wait", timeout=600).raise_for_status().json()
    try:
        update = httpx.post(f"{proxy}/update_weight_version", json={"new_version": version}, timeout=60)
        update.raise_for_status()
    finally:  # never leave the fleet paused
        resumed = httpx.post(f"{proxy}/tokentrail/v1/resume", timeout=600).raise_for_status().json()
    print(f"trainer: paused={paused['paused']}, policy version -> {version}, resumed={not resumed['paused']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxy", default="http://127.0.0.1:8000", help="TokenTrail's URL")
    parser.add_argument("--db", default="sqlite:///tokentrail.db", help="TokenTrail's database URL")
    parser.add_argument("--model", default="tiny", help="the served model name")
    parser.add_argument("--samples", type=int, default=4, help="trajectories per task (the group size)")
    parser.add_argument("--out", type=Path, default=Path("groups.parquet"), help="the Parquet file to write")
    args = parser.parse_args(argv)

    run_round(args.proxy, args.model, 1, args.samples)
    training_step(args.proxy, f"step-{uuid.uuid4().hex[:4]}")
    run_round(args.proxy, args.model, 2, args.samples)

    tokentrail = Path(sys.executable).with_name("tokentrail")
    export = [str(tokentrail), "export", "--db", args.db, "--format", "parquet", "--out", str(args.out)]
    subprocess.run([*export, "--by-group", "--finished"], check=True)

    import datasets

    rows = datasets.load_dataset("parquet", data_files=str(args.out), split="train")
    print(f"{args.out}: {rows.num_rows} sequences; columns {', '.join(rows.column_names)}")
    for row in rows.select_columns(["group_id", "trajectory_id", "reward", "advantage", "weight_version"]):
        advantage = "null" if row["advantage"] is None else f"{row['advantage']:+.2f}"
        print(
            f"  {row['group_id']:16} {row['trajectory_id']:30} reward {row['reward']:.2f} "
            f"advantage {advantage:>6} policy {row['weight_version']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
