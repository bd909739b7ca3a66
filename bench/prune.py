"""A prune of 100,000 calls beside a recording proxy: its time, the space it gives back, and what it
does to the recording latency, on SQLite and on PostgreSQL.

    python bench/prune.py                                   # 100,000 calls, both databases
    python bench/prune.py --calls 20000 --db sqlite --load-s 5

For each database:

1. fill: ``--calls`` calls in trajectories of ``--turns`` calls, written by TokenTrail's own writer
   (each call continues the previous one, so it is stored against it, as agents' calls are), all
   created a day before the run;
2. a ``tokentrail serve`` on that database in front of ``bench/fake_vllm.py``, durable
   (``TOKENTRAIL_DURABLE=1``: a call's answer ends once its record is committed, so a call's latency
   includes recording it), with ``--concurrency`` clients making new two-turn trajectories;
3. baseline: the clients' call latencies for ``--load-s`` seconds with nothing else running;
4. prune: ``tokentrail db prune --before <run start> --yes`` as its own process, the clients going on
   until it ends: the call latencies meanwhile, and the prune's own time;
5. space: the database before, after the prune (SQLite: the file, and its free pages that new records
   reuse; PostgreSQL: ``pg_database_size``, whose dead rows autovacuum makes reusable), and after
   ``tokentrail db vacuum`` (the proxy stopped), which gives it back to the file system.

Printed per database: prune time and calls/s; sizes; p50/p99/max latency of recorded calls without and
during the prune, and their ratio, measured side by side on the same machine. All three processes
(clients, proxy, prune) share the machine's cores, as on a small box.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
from targets import FAKE_VLLM, TOKENTRAIL_SERVE, free_port, tokentrail_env, wait_http  # noqa: E402

from tokentrail.proxy.recording.records import CallRecord, ChoiceRecord, Integrity  # noqa: E402
from tokentrail.proxy.recording.writer import RecordWriter  # noqa: E402
from tokentrail.proxy.storage.engine import make_engine  # noqa: E402
from tokentrail.proxy.storage.migrate import upgrade_database, vacuum_database  # noqa: E402
from tokentrail.proxy.trajectory.drift import DriftJudge  # noqa: E402

CLI = [sys.executable, "-m", "tokentrail.proxy.cli"]
PROMPT_START = 300  # tokens of a trajectory's first prompt
TURN_TOKENS = 40  # tokens a turn adds: the new user message, then the reply
REPLY_TOKENS = 20


@dataclass
class Sizes:
    before: int
    after_prune: int
    free_after_prune: int  # SQLite: bytes of free pages; PostgreSQL: 0 (not measured)
    after_vacuum: int


@dataclass
class Figures:
    db: str
    calls: int
    fill_s: float
    prune_s: float
    prune_line: str
    sizes: Sizes
    baseline_ms: list[float]
    during_ms: list[float]


# ---- fill ----


def _records(trajectory: str, turns: int, started: float) -> list[CallRecord]:
    records = []
    prompt: list[int] = list(range(1000, 1000 + PROMPT_START))
    messages: list[dict[str, Any]] = [{"role": "user", "content": f"task {trajectory}"}]
    for turn in range(turns):
        generated = [5000 + (turn * REPLY_TOKENS + k) % 1000 for k in range(REPLY_TOKENS)]
        record = CallRecord(
            call_id=f"{trajectory}-{turn}",
            trajectory_id=trajectory,
            route="/v1/chat/completions",
            received_at=started + turn,
            finished_at=started + turn + 0.5,
            seq=turn,
            integrity=Integrity.OK,
            request={"model": "m", "messages": list(messages), "max_tokens": REPLY_TOKENS},
            prompt_token_ids=list(prompt),
            prompt_tokens=len(prompt),
            completion_tokens=REPLY_TOKENS,
        )
        logprobs = [{"token": str(t), "logprob": -0.25} for t in generated]
        reply = {"role": "assistant", "content": f"reply {turn} " * 8}
        record.choices = [ChoiceRecord(0, generated, logprobs, "stop", None, reply)]
        records.append(record)
        prompt = (
            prompt + generated + list(range(2000 + turn * 20, 2000 + turn * 20 + TURN_TOKENS - REPLY_TOKENS))
        )
        messages = [*messages, reply, {"role": "user", "content": f"tool result {turn} " * 10}]
    return records


def fill(db_url: str, calls: int, turns: int, tmp: Path) -> float:
    """``calls`` calls, all of trajectories created a day ago; returns the seconds it took."""
    upgrade_database(db_url)
    engine = make_engine(db_url)
    writer = RecordWriter(
        engine,
        queue_size=10**6,
        batch_size=500,
        retries=0,
        fallback_path=tmp / "fill-spool.jsonl",
        judge=DriftJudge(),
    )
    writer.start()
    started = time.perf_counter()
    day_ago = time.time() - 86_400
    submitted = 0
    for index in range(calls // turns):
        for record in _records(f"old-{index:06d}", turns, day_ago + index * 1e-3):
            writer.next_ordinal(record.trajectory_id)
            writer.submit(record)
            submitted += 1
        if index % 500 == 0:  # keep the queue short: memory, not speed
            writer.wait_settled(submitted - 2000, 600)
    writer.close(600)
    engine.dispose()
    if writer.failed:
        raise SystemExit(f"fill: {writer.failed} records did not reach the database")
    return time.perf_counter() - started


# ---- sizes ----


def database_size(db_url: str) -> tuple[int, int]:
    """(bytes of the database, bytes of its free pages: SQLite only)."""
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
                page = int(connection.exec_driver_sql("PRAGMA page_size").scalar_one())
                pages = int(connection.exec_driver_sql("PRAGMA page_count").scalar_one())
                free = int(connection.exec_driver_sql("PRAGMA freelist_count").scalar_one())
                return pages * page, free * page
            size = connection.execute(text("SELECT pg_database_size(current_database())")).scalar_one()
            return int(size), 0
    finally:
        engine.dispose()


# ---- load ----


async def _client(url: str, worker: int, stop: asyncio.Event, latencies: list[float]) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        round_ = 0
        while not stop.is_set():
            trajectory = f"new-{worker}-{round_}-{time.monotonic_ns()}"
            messages: list[dict[str, Any]] = [{"role": "user", "content": "word " * 200}]
            for turn in range(2):
                body = {"model": "fake", "messages": messages, "max_tokens": 16, "temperature": 0}
                started = time.perf_counter()
                response = await client.post(
                    url + "/v1/chat/completions", json=body, headers={"X-Trajectory-Id": trajectory}
                )
                latencies.append((time.perf_counter() - started) * 1000)
                if response.status_code != 200:
                    raise SystemExit(f"a call failed: {response.status_code} {response.text[:200]}")
                reply = response.json()["choices"][0]["message"]
                messages = [*messages, reply, {"role": "user", "content": f"turn {turn}"}]
            round_ += 1


async def _load(url: str, concurrency: int, until: Any) -> list[float]:
    """Calls from ``concurrency`` clients until ``until()`` (awaited) returns; their latencies."""
    stop = asyncio.Event()
    latencies: list[float] = []
    clients = [asyncio.create_task(_client(url, w, stop, latencies)) for w in range(concurrency)]
    try:
        await until()
    finally:
        stop.set()
        await asyncio.gather(*clients)
    return latencies


def load_for(url: str, concurrency: int, seconds: float) -> list[float]:
    return asyncio.run(_load(url, concurrency, lambda: asyncio.sleep(seconds)))


def load_while(url: str, concurrency: int, process: subprocess.Popen[str]) -> list[float]:
    async def until_done() -> None:
        await asyncio.to_thread(process.wait)

    return asyncio.run(_load(url, concurrency, until_done))


# ---- one database ----


@contextmanager
def _process(command: list[str], **kwargs: Any) -> Any:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run_one(name: str, db_url: str, args: argparse.Namespace, tmp: Path) -> Figures:
    print(f"[{name}] filling {args.calls} calls ...", flush=True)
    fill_s = fill(db_url, args.calls, args.turns, tmp)
    cutoff = datetime.now(UTC) - timedelta(hours=1)  # the filled trajectories are a day old
    with ExitStack() as stack:
        fake_port, port = free_port(), free_port()
        fake = stack.enter_context(_process([*FAKE_VLLM, str(fake_port)]))
        wait_http(f"http://127.0.0.1:{fake_port}/health", fake)
        upstream = f"http://127.0.0.1:{fake_port}"
        env = tokentrail_env(upstream, db_url, port, tmp, TOKENTRAIL_DURABLE="1")
        proxy = stack.enter_context(_process(TOKENTRAIL_SERVE, env=env))
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/tokentrail/health", proxy)
        load_for(url, args.concurrency, 1.0)  # warm up
        print(f"[{name}] baseline load for {args.load_s} s ...", flush=True)
        baseline = load_for(url, args.concurrency, args.load_s)
        before, _ = database_size(db_url)
        print(f"[{name}] prune beside the load ...", flush=True)
        prune_command = [*CLI, "db", "prune", "--db", db_url, "--before", cutoff.isoformat(), "--yes"]
        started = time.perf_counter()
        pruner = subprocess.Popen(prune_command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        during = load_while(url, args.concurrency, pruner)
        out, err = pruner.communicate()
        prune_s = time.perf_counter() - started
        if pruner.returncode != 0:
            raise SystemExit(f"prune failed: {err}")
    after, free = database_size(db_url)
    _, after_vacuum = vacuum_database(db_url)
    return Figures(
        name,
        args.calls,
        fill_s,
        prune_s,
        out.strip(),
        Sizes(before, after, free, after_vacuum),
        baseline,
        during,
    )


# ---- report ----


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(figures: Figures) -> None:
    mb = 1e6
    s = figures.sizes
    rate = figures.calls / figures.prune_s
    print(f"\n== {figures.db}: prune of {figures.calls:,} calls ==")
    print(f"fill: {figures.fill_s:.1f} s; prune process: {figures.prune_s:.1f} s ({rate:,.0f} calls/s)")
    print(f"tokentrail db prune: {figures.prune_line}")
    free = (
        f" ({s.free_after_prune / mb:.1f} MB free pages, reused by new records)" if s.free_after_prune else ""
    )
    print(f"size: before the prune {s.before / mb:.1f} MB; after it {s.after_prune / mb:.1f} MB{free}")
    given = (s.before - s.after_vacuum) / mb
    print(f"      after db vacuum {s.after_vacuum / mb:.1f} MB: {given:.1f} MB given back to the file system")
    print(
        f"{'recorded calls (durable: ends once committed)':<52} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'max':>8}"
    )
    for label, values in (("without a prune", figures.baseline_ms), ("during the prune", figures.during_ms)):
        p50, p99 = _percentile(values, 0.5), _percentile(values, 0.99)
        print(f"  {label:<50} {len(values):>6} {p50:>8.1f} {p99:>8.1f} {max(values):>8.1f}")
    p50 = _percentile(figures.during_ms, 0.5) / _percentile(figures.baseline_ms, 0.5)
    p99 = _percentile(figures.during_ms, 0.99) / _percentile(figures.baseline_ms, 0.99)
    mean = statistics.fmean(figures.during_ms)
    print(f"  during / without: p50 x{p50:.2f}, p99 x{p99:.2f} (mean during {mean:.1f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--turns", type=int, default=10, help="calls per filled trajectory")
    parser.add_argument("--db", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    parser.add_argument("--concurrency", type=int, default=4, help="clients recording calls")
    parser.add_argument("--load-s", type=float, default=15.0, help="seconds of the baseline load")
    args = parser.parse_args()
    for name in args.db.split(","):
        with tempfile.TemporaryDirectory(prefix="tokentrail-prune-") as folder:
            tmp = Path(folder)
            if name == "sqlite":
                report(run_one(name, f"sqlite:///{tmp / 'bench.db'}", args, tmp))
            elif name == "postgresql":
                from tests.postgres import create_database, postgres_server

                with postgres_server() as server:
                    report(run_one(name, create_database(server), args, tmp))
            else:
                raise SystemExit(f"unknown database {name!r}")
    os.sync()


if __name__ == "__main__":
    main()
