"""Soak: many mixed calls through TokenTrail, then prove nothing was lost and memory stayed flat.

    python bench/soak.py --calls 10000                 # issue 7's soak (about 1-2 minutes here)
    python bench/soak.py --duration 600 --rss-every 30 # issue 6's 10-minute RSS run

Starts the fast fake vLLM and ``tokentrail serve`` (SQLite), then keeps ``--concurrency`` calls open
over ``--trajectories`` trajectories, each call drawn (seeded) from: chat non-streaming, chat streaming
with usage, chat with n=2, text completion streaming, and a body vLLM refuses (an upstream 400). It
samples the proxy's RSS while it runs and afterwards checks the database:

* exactly one ``llm_calls`` row per call the proxy answered, outcome matching the answer;
* ``seq`` gapless (0..k-1) in every trajectory;
* every successful call's stored generated IDs as many as vLLM's usage says, and equal to the fake
  upstream's deterministic IDs; ``integrity = 'ok'``;
* bytes stored per call and per generated token.

With ``--lock-db-for 30`` another connection holds SQLite's write lock for 30 s from ``--lock-db-at``:
a database outage. The records of that time go to the spool and are replayed once it ends; the checks
are the same (every call once, seq gapless, IDs exact).

Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from fake_vllm import generated_id  # noqa: E402
from loadgen import _Connection, build_request, chat_body, completion_body  # noqa: E402
from targets import FAKE_VLLM, TOKENTRAIL_SERVE, free_port, rss_mib, tokentrail_env, wait_http  # noqa: E402

KINDS = ("chat", "chat_stream", "chat_n2", "text_stream", "refused")


def _request_for(kind: str, max_tokens: int) -> tuple[str, bytes]:
    """(path, body) for one kind of call."""
    if kind == "chat":
        return "/v1/chat/completions", json.dumps(chat_body(40, max_tokens, False)).encode()
    if kind == "chat_stream":
        return "/v1/chat/completions", json.dumps(chat_body(40, max_tokens, True)).encode()
    if kind == "chat_n2":
        return "/v1/chat/completions", json.dumps(chat_body(40, max_tokens, False, n=2)).encode()
    if kind == "text_stream":
        return "/v1/completions", json.dumps(completion_body(40, max_tokens, True)).encode()
    return "/v1/chat/completions", b'{"model": "fake", "messages": ['  # not JSON: vLLM answers 400


async def _drive(url: str, args: argparse.Namespace, proxy_pid: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    host, port = url.removeprefix("http://").split(":")
    rng = random.Random(args.seed)  # noqa: S311 - a reproducible mix, not a secret
    answered: dict[str, int] = dict.fromkeys(KINDS, 0)
    statuses: dict[int, int] = {}
    rss: list[tuple[float, float]] = []
    sent = 0
    slot_calls = [0] * args.trajectories
    started = time.monotonic()
    deadline = started + args.duration if args.duration else None

    def more() -> bool:
        if deadline is not None:
            return time.monotonic() < deadline
        return sent < args.calls

    async def worker() -> None:
        nonlocal sent
        connection: _Connection | None = None
        while more():
            sent += 1
            kind = rng.choice(KINDS)
            path, body = _request_for(kind, args.max_tokens)
            slot = rng.randrange(args.trajectories)
            generation = 0
            if args.calls_per_trajectory:  # a slot's trajectory ends and a new one takes its place
                generation = slot_calls[slot] // args.calls_per_trajectory
                slot_calls[slot] += 1
            trajectory = f"soak-{slot}-{generation}"
            request = build_request(url, path, body, {"x-trajectory-id": trajectory})
            if connection is None or connection.transport is None:
                _, connection = await loop.create_connection(_Connection, host, int(port))
            await connection.call(request)
            statuses[connection.status] = statuses.get(connection.status, 0) + 1
            answered[kind] += 1

    async def sample_rss() -> None:
        while True:
            rss.append((time.monotonic() - started, rss_mib(proxy_pid)))
            await asyncio.sleep(args.rss_every)

    sampler = asyncio.create_task(sample_rss())
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    sampler.cancel()
    rss.append((time.monotonic() - started, rss_mib(proxy_pid)))
    return {
        "sent": sent,
        "answered": answered,
        "statuses": statuses,
        "seconds": time.monotonic() - started,
        "rss": rss,
    }


def _hold_write_lock(db_path: Path, args: argparse.Namespace) -> None:
    """Another process's long write transaction: the proxy's writer cannot write meanwhile."""
    time.sleep(args.lock_db_at)
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as lock:
        lock.execute("BEGIN IMMEDIATE")
        time.sleep(args.lock_db_for)
        lock.execute("ROLLBACK")


def _settled_writer(url: str, calls: int, limit_s: float = 300) -> dict[str, Any]:
    """The proxy's writer counters once every call's record is written or replayed."""
    deadline = time.monotonic() + limit_s
    while True:
        writer: dict[str, Any] = httpx.get(url + "/tokentrail/health", timeout=10).json()["writer"]
        done = writer["records_written"] + writer["records_replayed"] + writer["records_lost"]
        if done >= calls or time.monotonic() > deadline:
            return writer
        time.sleep(0.2)


def _check(db_path: Path, result: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    problems: list[str] = []
    db = sqlite3.connect(db_path)
    calls = db.execute("SELECT count(*) FROM llm_calls").fetchone()[0]
    if calls != result["sent"]:
        problems.append(f"{calls} call rows for {result['sent']} calls")
    by_outcome = dict(db.execute("SELECT outcome, count(*) FROM llm_calls GROUP BY outcome").fetchall())
    if by_outcome.get("upstream_error", 0) != result["answered"]["refused"]:
        problems.append(f"outcomes {by_outcome} but {result['answered']['refused']} refused calls")
    gaps = db.execute(
        "SELECT trajectory_id, count(*), min(seq), max(seq) FROM llm_calls GROUP BY trajectory_id "
        "HAVING min(seq) != 0 OR max(seq) != count(*) - 1 OR count(DISTINCT seq) != count(*)"
    ).fetchall()
    if gaps:
        problems.append(f"{len(gaps)} trajectories with gaps or repeats in seq, e.g. {gaps[0]}")
    not_ok = db.execute(
        "SELECT count(*) FROM llm_calls WHERE outcome = 'ok' AND integrity != 'ok'"
    ).fetchone()[0]
    if not_ok:
        problems.append(f"{not_ok} successful calls with integrity problems")
    mismatched = 0
    for count, n, raw, choice in db.execute(
        "SELECT c.completion_tokens, coalesce(json_extract(c.request, '$.n'), 1), p.token_ids, "
        "p.choice_index FROM llm_calls c JOIN completions p ON p.call_id = c.id WHERE c.outcome = 'ok'"
    ):
        ids = json.loads(raw)
        if len(ids) * n != count or ids != [generated_id(i, choice) for i in range(len(ids))]:
            mismatched += 1
    if mismatched:
        problems.append(f"{mismatched} completions whose IDs differ from the upstream's")
    generated = db.execute("SELECT coalesce(sum(completion_tokens), 0) FROM llm_calls").fetchone()[0]
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    used_pages = (
        db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0]
    )
    db.close()
    stored = used_pages * page_size
    figures = {
        "call_rows": calls,
        "outcomes": by_outcome,
        "generated_tokens": generated,
        "database_bytes": stored,
        "bytes_per_call": stored / max(calls, 1),
        "bytes_per_generated_token": stored / max(generated, 1),
    }
    return problems, figures


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=0.0, help="seconds; overrides --calls")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--trajectories", type=int, default=200)
    parser.add_argument(
        "--calls-per-trajectory",
        type=int,
        default=0,
        help="start a new trajectory after this many (0: never)",
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rss-every", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", type=Path, help="keep the database at this path")
    parser.add_argument(
        "--lock-db-at", type=float, default=5.0, help="seconds into the run (with --lock-db-for)"
    )
    parser.add_argument(
        "--lock-db-for", type=float, default=0.0, help="hold SQLite's write lock this long: a database outage"
    )
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        db_path = tmp / "soak.db"
        upstream_port, proxy_port = free_port(), free_port()
        upstream = subprocess.Popen([*FAKE_VLLM, str(upstream_port)])
        env = tokentrail_env(f"http://127.0.0.1:{upstream_port}", f"sqlite:///{db_path}", proxy_port, tmp)
        proxy = subprocess.Popen(TOKENTRAIL_SERVE, env=env)
        url = f"http://127.0.0.1:{proxy_port}"
        try:
            wait_http(f"http://127.0.0.1:{upstream_port}/health", upstream)
            wait_http(url + "/tokentrail/health", proxy)
            locker = threading.Thread(target=_hold_write_lock, args=(db_path, args), daemon=True)
            if args.lock_db_for:
                locker.start()
            result = asyncio.run(_drive(url, args, proxy.pid))
            if args.lock_db_for:
                locker.join()
            result["writer"] = _settled_writer(url, result["sent"])
        finally:
            proxy.terminate()  # SIGTERM: the proxy drains its writer before it exits
            proxy.wait(120)
            upstream.terminate()
            upstream.wait(30)
        problems, figures = _check(db_path, result)
        if args.keep:
            args.keep.write_bytes(db_path.read_bytes())
    rss = [mib for _, mib in result["rss"]]
    warm = rss[len(rss) // 10 :] or rss  # after the first tenth of the run (imports, caches, pools warm)
    rate = result["sent"] / result["seconds"]
    print(f"calls: {result['sent']} in {result['seconds']:.0f} s ({rate:.0f}/s), "
          f"concurrency {args.concurrency}, {args.trajectories} trajectories at a time; "
          f"by kind {result['answered']}; "
          f"statuses {result['statuses']}")  # fmt: skip
    print(f"rows: {figures['call_rows']}, outcomes {figures['outcomes']}")
    print(f"RSS MiB: start {rss[0]:.0f}, after warm-up {warm[0]:.0f}, max {max(rss):.0f}, end {rss[-1]:.0f} "
          f"(end vs after warm-up: {100 * (rss[-1] - warm[0]) / warm[0]:+.1f}%)")  # fmt: skip
    print("RSS samples (s, MiB): " + " ".join(f"{t:.0f}:{m:.0f}" for t, m in result["rss"]))
    print(f"stored: {figures['database_bytes'] / 2**20:.1f} MiB, {figures['bytes_per_call']:.0f} bytes/call, "
          f"{figures['bytes_per_generated_token']:.0f} bytes/generated token")  # fmt: skip
    writer = result["writer"]
    print(
        f"writer: written {writer['records_written']}, spooled {writer['records_failed']}, "
        f"replayed {writer['records_replayed']}, lost {writer['records_lost']}"
    )
    print(
        "check: " + ("; ".join(problems) if problems else "every call recorded once, seq gapless, IDs exact")
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
