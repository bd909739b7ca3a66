"""Token-in before/after on a real vLLM: training sequences, drift, prefix cache, cost per call.

    python bench/token_in_check.py --upstream http://127.0.0.1:8001

Drives the same multi-turn conversations (plain, streamed, cut at ``max_tokens``, tool loops that
begin with a forced tool call; ``ignore_eos``, so replies have the same length in both modes) through
two ``tokentrail serve``, without and with ``TOKENTRAIL_TOKEN_IN``, each with its own database and its
own ``cache_salt`` (no prefix cache shared); each conversation runs in one mode, then in the other.

Prints, per mode: trajectories, calls, merged sequences, prefix mismatches by cause (the drift of the
call where the sequence broke), trajectories that are one sequence, vLLM's prefix-cache hit rate
(``vllm:prefix_cache_hits_total`` / ``vllm:prefix_cache_queries_total`` from ``/metrics``, read around
each conversation), the token-in fallback reasons, the mean and median latency of the follow-up
calls, the extra ``/tokenize`` requests, and the time those take, replayed alone.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
from targets import TOKENTRAIL_SERVE, free_port, tokentrail_env, wait_http  # noqa: E402

from tests.token_in_helpers import converse  # noqa: E402
from tokentrail.proxy.storage import queries  # noqa: E402
from tokentrail.proxy.training.sequences import build_sequences  # noqa: E402

# (name, converse() arguments): ten conversations, as agents drive them.
CONVERSATIONS: list[tuple[str, dict[str, Any]]] = [
    ("plain-24", {"max_tokens": 24}),
    ("plain-48", {"max_tokens": 48}),
    ("plain-64", {"max_tokens": 64}),
    ("streamed-32", {"max_tokens": 32, "stream": True}),
    ("streamed-64", {"max_tokens": 64, "stream": True}),
    ("cut-4", {"max_tokens": 4}),
    ("streamed-cut-6", {"max_tokens": 6, "stream": True}),
    ("tools", {"tool_first": True, "max_tokens": 32}),
    ("tools-streamed", {"tool_first": True, "max_tokens": 32, "stream": True}),
    ("tools-cut", {"tool_first": True, "max_tokens": 8}),
]
_METRIC = re.compile(
    r"^(vllm:prefix_cache_(?:hits|queries)_total|http_requests_total)\{([^}]*)\} ([0-9.e+]+)$"
)


@dataclass
class Run:
    mode: str
    trajectories: int = 0
    calls: int = 0
    sequences: int = 0
    mismatches: Counter[str] = field(default_factory=Counter)
    one_sequence: int = 0
    drift: Counter[str] = field(default_factory=Counter)
    fallbacks: Counter[str] = field(default_factory=Counter)
    hit_rate: float = 0.0
    tokenize_requests: float = 0.0
    follow_up_ms: list[float] = field(default_factory=list)
    renders_ms: list[float] = field(default_factory=list)  # token-in's /tokenize, timed alone


def metrics(upstream: str) -> dict[str, float]:
    found: dict[str, float] = Counter()
    for line in httpx.get(upstream + "/metrics", timeout=30).text.splitlines():
        match = _METRIC.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        if name == "http_requests_total":
            if 'handler="/tokenize"' not in labels:
                continue
            name = "tokenize"
        found[name] += float(value)
    return found


MODES = ("off", "token-in")


def drive(upstream: str, turns: int, scale: int, tmp: Path) -> list[Run]:
    """Both proxies up at once; each conversation runs without, then with token-in, so that both modes
    see the same minutes of a shared machine. vLLM's counters are read around each conversation."""
    runs = {mode: Run(mode) for mode in MODES}
    bases: dict[str, str] = {}
    processes = []
    try:
        for mode in MODES:
            port = free_port()
            (tmp / mode).mkdir()
            env = tokentrail_env(
                upstream, _db_url(tmp, mode), port, tmp / mode, TOKENTRAIL_TOKEN_IN=str(mode != "off").lower()
            )
            processes.append(subprocess.Popen(TOKENTRAIL_SERVE, env=env))
            bases[mode] = f"http://127.0.0.1:{port}"
            wait_http(bases[mode] + "/tokentrail/health", processes[-1])
        salt = str(time.time_ns())  # a cache salt per mode: no prefix cache shared between them
        totals: dict[str, Counter[str]] = {mode: Counter() for mode in MODES}
        with httpx.Client(timeout=300) as client:
            for name, given in CONVERSATIONS:
                options = {**given, "max_tokens": given["max_tokens"] * scale}
                for mode in MODES:
                    before = metrics(upstream)
                    conversation = converse(
                        client,
                        bases[mode],
                        f"{mode}-{name}",
                        turns=turns,
                        extra_body={"cache_salt": f"{mode}-{salt}", "ignore_eos": True},  # same lengths
                        **options,
                    )
                    totals[mode].update({k: v - before[k] for k, v in metrics(upstream).items()})
                    runs[mode].follow_up_ms.extend(t.seconds * 1000 for t in conversation.turns[1:])
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(60)
    for mode, run in runs.items():
        queries_total = totals[mode]["vllm:prefix_cache_queries_total"]
        run.hit_rate = totals[mode]["vllm:prefix_cache_hits_total"] / queries_total if queries_total else 0.0
        run.tokenize_requests = totals[mode]["tokenize"]
        _read_records(run, _db_url(tmp, mode))
    runs["token-in"].renders_ms = time_renders(upstream, _db_url(tmp, "token-in"))
    return list(runs.values())


def _db_url(tmp: Path, mode: str) -> str:
    return f"sqlite:///{tmp / f'{mode}.db'}"


def time_renders(upstream: str, db_url: str) -> list[float]:
    """Milliseconds for the ``/tokenize`` request token-in sends before each follow-up call once the
    template is trusted (the new messages after a stand-in history, ``token_in/prompt.py``), replayed
    on the recorded requests: the latency token-in adds to a call."""
    from tokentrail.proxy.token_in.prompt import stand_in_history

    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            requests = [
                json.loads(r) if isinstance(r, str) else r
                for r in connection.execute(
                    text("SELECT request FROM llm_calls WHERE drift = 'token_in'")
                ).scalars()
            ]
    finally:
        engine.dispose()
    timings = []
    with httpx.Client(timeout=60) as client:
        for request in requests:
            messages = request["messages"]
            kept = max(i for i, m in enumerate(messages) if m.get("role") == "assistant") + 1
            history = stand_in_history(messages, kept) or messages[:kept]
            body = {"model": request["model"], "messages": [*history, *messages[kept:]]}
            body["add_generation_prompt"] = True
            if request.get("tools"):
                body["tools"] = request["tools"]
            started = time.perf_counter()
            client.post(upstream + "/tokenize", json=body).raise_for_status()
            timings.append((time.perf_counter() - started) * 1000)
    return timings


def _read_records(run: Run, db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT id FROM trajectories")).scalars().all()
            calls = queries.load_call_tokens(connection, rows)
            broken: list[str] = []
            for trajectory_id in rows:
                built = build_sequences(trajectory_id, calls[trajectory_id], None)
                run.sequences += len(built.sequences)
                broken.extend(m.call_id for m in built.mismatches)
                run.one_sequence += len(built.sequences) == 1 and not built.mismatches
            run.mismatches.update(queries.drift_of_calls(connection, broken))
            run.trajectories = len(rows)
            for drift, fallback in connection.execute(text("SELECT drift, token_in_fallback FROM llm_calls")):
                run.calls += 1
                run.drift[drift or "-"] += 1
                if fallback is not None:
                    run.fallbacks[fallback] += 1
    finally:
        engine.dispose()


def report(runs: list[Run]) -> str:
    def causes(counter: Counter[str]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "-"

    lines = [
        "| mode | trajectories | calls | merged sequences | one sequence | mismatches (by cause) "
        "| prefix-cache hit rate | follow-up latency mean / median | /tokenize requests |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        latencies = run.follow_up_ms or [0.0]
        mismatches = f"{sum(run.mismatches.values())} ({causes(run.mismatches)})"
        latency = f"{statistics.mean(latencies):.0f} / {statistics.median(latencies):.0f} ms"
        lines.append(
            f"| {run.mode} | {run.trajectories} | {run.calls} | {run.sequences} | "
            f"{run.one_sequence}/{run.trajectories} | {mismatches} | {run.hit_rate:.1%} | {latency} | "
            f"{run.tokenize_requests:.0f} |"
        )
    for run in runs:
        lines.append(f"{run.mode}: drift {causes(run.drift)}; token-in fallbacks {causes(run.fallbacks)}")
        if run.renders_ms:
            lines.append(
                f"{run.mode}: the /tokenize request of a continuing call (the new messages after a "
                f"stand-in history) takes {statistics.mean(run.renders_ms):.1f} / "
                f"{statistics.median(run.renders_ms):.1f} ms (mean / median of {len(run.renders_ms)})"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="the vLLM base URL, e.g. http://127.0.0.1:8001")
    parser.add_argument("--turns", type=int, default=5, help="calls per conversation")
    parser.add_argument(
        "--scale", type=int, default=1, help="multiply every max_tokens (longer replies, longer prompts)"
    )
    args = parser.parse_args()
    upstream = args.upstream.rstrip("/").removesuffix("/v1")
    with tempfile.TemporaryDirectory(prefix="token-in-check-") as tmp:
        runs = drive(upstream, args.turns, args.scale, Path(tmp))
    print(report(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
