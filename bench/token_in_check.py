"""Token-in before/after on a real vLLM: training sequences, drift, prefix cache, cost per call.

    python bench/token_in_check.py --upstream http://127.0.0.1:8001

Drives the same multi-turn conversations (plain, streamed, cut at ``max_tokens``, tool loops that
begin with a forced tool call) through ``tokentrail serve`` twice, without and with
``TOKENTRAIL_TOKEN_IN``, each run with its own database and its own ``cache_salt`` (so the second run
does not hit the first one's prefix cache). Prints, per run: trajectories, calls, merged sequences,
prefix mismatches by cause (the drift of the call where the sequence broke), trajectories that are
one sequence, vLLM's prefix-cache hit rate over the run (``vllm:prefix_cache_hits_total`` /
``vllm:prefix_cache_queries_total`` from ``/metrics``), the token-in fallback reasons, the mean and
median latency of the follow-up calls, and the extra upstream requests (``/tokenize``, re-sends).
"""

from __future__ import annotations

import argparse
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
from run import TOKENTRAIL_SERVE, _free_port, _wait_http, tokentrail_env  # noqa: E402

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


def drive(upstream: str, mode: str, turns: int, tmp: Path) -> Run:
    run = Run(mode)
    db_url = f"sqlite:///{tmp / f'{mode}.db'}"
    port = _free_port()
    env = tokentrail_env(
        upstream, db_url, port, tmp / mode, TOKENTRAIL_TOKEN_IN=str(mode == "token-in").lower()
    )
    (tmp / mode).mkdir()
    process = subprocess.Popen(TOKENTRAIL_SERVE, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_http(base + "/tokentrail/health", process)
        before = metrics(upstream)
        salt = f"token-in-check-{mode}-{time.time_ns()}"  # no prefix cache shared between runs
        with httpx.Client(timeout=300) as client:
            for name, options in CONVERSATIONS:
                conversation = converse(
                    client, base, f"{mode}-{name}", turns=turns, extra_body={"cache_salt": salt}, **options
                )
                run.follow_up_ms.extend(t.seconds * 1000 for t in conversation.turns[1:])
        after = metrics(upstream)
    finally:
        process.terminate()
        process.wait(60)
    queries_delta = after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"]
    hits_delta = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
    run.hit_rate = hits_delta / queries_delta if queries_delta else 0.0
    run.tokenize_requests = after["tokenize"] - before["tokenize"]
    _read_records(run, db_url)
    return run


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
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="the vLLM base URL, e.g. http://127.0.0.1:8001")
    parser.add_argument("--turns", type=int, default=5, help="calls per conversation")
    args = parser.parse_args()
    upstream = args.upstream.rstrip("/").removesuffix("/v1")
    with tempfile.TemporaryDirectory(prefix="token-in-check-") as tmp:
        runs = [drive(upstream, mode, args.turns, Path(tmp)) for mode in ("off", "token-in")]
    print(report(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
