"""Whether ``seq`` follows the order in which a fleet received each trajectory's turns, with the
writers waiting for each other (``TOKENTRAIL_ORDER_WAIT_S``, the default 5 s) and without (0), side by
side in one run.

    python bench/arrival_order.py                   # serve --workers 2 (SQLite), 2 replicas (PostgreSQL)
    python bench/arrival_order.py --setups workers  # one of them

Agents send every turn on a fresh connection (the kernel spreads them over the workers; for replicas
each turn goes to the other replica), the moment the last answer came, with token-in off (token-in
waits for the earlier turn's record itself). A trajectory is in order when its calls, by ``seq``, are
its turns 0, 1, 2, ...; the turn of a call is read from its request (the number of its messages).
Also printed: how many records waited, and how long after the last answer every record was written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
from targets import (  # noqa: E402
    fresh_postgres_database,
    serve_tokentrail,
    tests_fake_upstream,
    throwaway_postgres,
)

CHAT = "/v1/chat/completions"
FRESH = httpx.Limits(max_keepalive_connections=0)


async def _agents(urls: list[str], trajectories: int, turns: int, prefix: str) -> None:
    async with httpx.AsyncClient(limits=FRESH, timeout=60) as client:

        async def one(trajectory: int) -> None:
            messages: list[dict[str, Any]] = [{"role": "user", "content": f"task {trajectory}"}]
            for turn in range(turns):
                response = await client.post(
                    urls[(trajectory + turn) % len(urls)] + CHAT,
                    json={"model": "m", "messages": messages, "max_tokens": 8},
                    headers={"X-Trajectory-Id": f"{prefix}-{trajectory}", "X-TokenTrail-Token-In": "false"},
                )
                response.raise_for_status()
                reply = response.json()["choices"][0]["message"]
                messages = [
                    *messages,
                    {"role": "assistant", "content": reply["content"]},
                    {"role": "user", "content": f"turn {turn}"},
                ]

        await asyncio.gather(*(one(t) for t in range(trajectories)))


def _judge(
    db_url: str, prefix: str, expected: int, limit_s: float = 120
) -> tuple[int, int, float, dict[str, float]]:
    """(trajectories in order, trajectories in all, seconds until every record was written, order waits)."""
    engine = create_engine(db_url)
    started = time.monotonic()
    try:
        while True:
            with engine.connect() as connection:
                rows = connection.execute(
                    text(
                        "SELECT trajectory_id, seq, request FROM llm_calls "
                        "WHERE trajectory_id LIKE :p ORDER BY 1, 2"
                    ),
                    {"p": f"{prefix}-%"},
                ).all()
                waits: dict[Any, Any] = dict(
                    connection.execute(
                        text(
                            "SELECT labels, sum(value) FROM metric_counts "
                            "WHERE metric = 'tokentrail_record_order_waits' GROUP BY labels"
                        )
                    ).all()
                )
            if len(rows) >= expected or time.monotonic() - started > limit_s:
                break
            time.sleep(0.05)
    finally:
        engine.dispose()
    written_s = time.monotonic() - started
    turns: dict[str, list[int]] = {}
    for trajectory_id, _seq, request in rows:
        messages = (json.loads(request) if isinstance(request, str) else request)["messages"]
        turns.setdefault(trajectory_id, []).append((len(messages) - 1) // 2)
    in_order = sum(1 for mine in turns.values() if mine == list(range(len(mine))))
    return in_order, len(turns), written_s, {str(k): float(v) for k, v in waits.items()}


def _cell(setup: str, wait: str, upstream: str, server: str, tmp: Path, trajectories: int, turns: int) -> str:
    """One run of the agents against ``setup`` with ``TOKENTRAIL_ORDER_WAIT_S=wait``: its line."""
    settings = {"TOKENTRAIL_ORDER_WAIT_S": wait}
    with ExitStack() as servers:
        if setup == "workers":
            db_url = f"sqlite:///{tmp}.sqlite"
            serving = [serve_tokentrail(upstream, db_url, tmp, TOKENTRAIL_WORKERS="2", **settings)]
        else:
            db_url = fresh_postgres_database(server)
            serving = [
                serve_tokentrail(upstream, db_url, tmp / name, TOKENTRAIL_INSTANCE=name, **settings)
                for name in ("a", "b")
            ]
        urls = [servers.enter_context(serve)[0] for serve in serving]
        asyncio.run(_agents(urls, trajectories, turns, "o"))
        in_order, total, written_s, waits = _judge(db_url, "o", trajectories * turns)
    label = "no wait (0)" if wait == "0" else "wait (5 s)"
    return (
        f"{setup:8} {label:12}: {in_order:3d} of {total:3d} trajectories in arrival order; records written "
        f"{written_s:5.2f} s after the last answer; order waits {waits or '{}'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--setups", nargs="+", choices=["workers", "replicas"], default=["workers", "replicas"]
    )
    parser.add_argument("--trajectories", type=int, default=32)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="of each wait setting, alternated")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tokentrail-order-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        upstream = tests_fake_upstream(stack)
        server = throwaway_postgres(stack) if "replicas" in args.setups else ""
        for setup in args.setups:
            for round_ in range(args.rounds):
                for wait in ("0", "5"):
                    cell = tmp / f"{setup}-{wait}-{round_}"
                    print(
                        _cell(setup, wait, upstream, server, cell, args.trajectories, args.turns), flush=True
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
