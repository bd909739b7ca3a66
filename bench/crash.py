"""SIGKILL the proxy in the middle of a run: what is lost, with and without durable mode, and its cost.

    python bench/crash.py                 # both modes, 5 s of load each, then kill -9
    python bench/crash.py --seconds 2 --concurrency 16

For each mode (``TOKENTRAIL_DURABLE`` off, then on) it starts the fast fake vLLM and ``tokentrail serve``
on a fresh SQLite file, keeps ``--concurrency`` calls open (chat, half of them streaming), notes the
response id of every call whose answer the client saw end, and after ``--seconds`` kills the proxy
with SIGKILL while calls are still open. Then it counts the finished calls missing from the database,
restarts the proxy on the same file (nothing half-written may remain: every call row has its
completions, SQLite's integrity check passes) and prints calls/s before the kill, so the cost of
durable mode is measured side by side.

Without durable mode the bound is the records still in the writer's queue and its last gather window
(about 20 ms of calls) plus the calls in flight; with durable mode no finished call may be missing.
Exits non-zero when durable mode lost one or a restart found damage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from loadgen import _Connection, build_request, chat_body  # noqa: E402
from targets import FAKE_VLLM, TOKENTRAIL_SERVE, free_port, tokentrail_env, wait_http  # noqa: E402


async def _load_until_killed(
    url: str, process: subprocess.Popen[bytes], args: argparse.Namespace
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    host, port = url.removeprefix("http://").split(":")
    finished_ids: list[str] = []
    latencies: list[float] = []
    kill_at = time.monotonic() + args.seconds
    killed = asyncio.Event()
    in_flight = 0

    async def worker(index: int) -> None:
        nonlocal in_flight
        stream = index % 2 == 1
        body = json.dumps(chat_body(40, args.max_tokens, stream)).encode()
        request = build_request(url, "/v1/chat/completions", body, {"x-trajectory-id": f"crash-{index}"})
        connection: _Connection | None = None
        while not killed.is_set():
            try:
                if connection is None or connection.transport is None:
                    _, connection = await loop.create_connection(_Connection, host, int(port))
                began = time.perf_counter()
                in_flight += 1
                await connection.call(request)
            except (ConnectionError, OSError):
                return
            finally:
                in_flight -= 1
            if connection.status == 200 and (not stream or connection.tail.endswith(b"[DONE]\n\n")):
                finished_ids.append(_response_id(connection.head))
                latencies.append((time.perf_counter() - began) * 1000)

    async def killer() -> None:
        await asyncio.sleep(max(0.0, kill_at - time.monotonic()))
        open_calls = in_flight
        process.send_signal(signal.SIGKILL)
        killed.set()
        result["in_flight_at_kill"] = open_calls

    result: dict[str, Any] = {}
    started = time.monotonic()
    await asyncio.gather(killer(), *(worker(i) for i in range(args.concurrency)))
    result.update(
        finished=finished_ids,
        calls_per_s=len(finished_ids) / (time.monotonic() - started),
        p50_ms=statistics.median(latencies) if latencies else None,
    )
    return result


def _response_id(head: bytes) -> str:
    """The ``id`` of a JSON body or of the first SSE event."""
    text = head.decode("utf-8", "replace")
    start = text.index('"id":"') + 6
    return text[start : text.index('"', start)]


def _one_mode(durable: bool, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        db_path = tmp / "crash.db"
        upstream_port, proxy_port = free_port(), free_port()
        upstream = subprocess.Popen([*FAKE_VLLM, str(upstream_port)])
        env = tokentrail_env(
            f"http://127.0.0.1:{upstream_port}",
            f"sqlite:///{db_path}",
            proxy_port,
            tmp,
            TOKENTRAIL_DURABLE="true" if durable else "false",
        )
        url = f"http://127.0.0.1:{proxy_port}"
        command = TOKENTRAIL_SERVE
        try:
            wait_http(f"http://127.0.0.1:{upstream_port}/health", upstream)
            proxy = subprocess.Popen(command, env=env)
            wait_http(url + "/tokentrail/health", proxy)
            result = asyncio.run(_load_until_killed(url, proxy, args))
            proxy.wait(30)
            db = sqlite3.connect(db_path)
            stored = {row[0] for row in db.execute("SELECT response_id FROM llm_calls")}
            rows = db.execute("SELECT count(*) FROM llm_calls").fetchone()[0]
            db.close()
            # Restart on the same file: it must open, migrate nothing, and hold no half-written call.
            restarted = subprocess.Popen(command, env=env)
            wait_http(url + "/tokentrail/health", restarted)
            restarted.terminate()
            restarted.wait(30)
            db = sqlite3.connect(db_path)
            integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
            orphans = db.execute(
                "SELECT count(*) FROM llm_calls c WHERE c.outcome = 'ok' "
                "AND NOT EXISTS (SELECT 1 FROM completions p WHERE p.call_id = c.id)"
            ).fetchone()[0]
            db.close()
        finally:
            upstream.terminate()
            upstream.wait(30)
    finished = result["finished"]
    lost = [i for i in finished if i not in stored]
    return {
        "durable": durable,
        "finished_at_client": len(finished),
        "rows": rows,
        "lost": len(lost),
        "in_flight_at_kill": result["in_flight_at_kill"],
        "calls_per_s": result["calls_per_s"],
        "p50_ms": result["p50_ms"],
        "integrity_check": integrity,
        "ok_calls_without_completions": orphans,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="load before the kill")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    failed = False
    results = [_one_mode(durable, args) for durable in (False, True)]
    for r in results:
        print(
            f"durable={str(r['durable']).lower():<5} calls/s {r['calls_per_s']:7.0f}  "
            f"p50 {r['p50_ms']:6.2f} ms  finished at the client {r['finished_at_client']:6d}  "
            f"rows {r['rows']:6d}  lost {r['lost']:4d}  (in flight at the kill: {r['in_flight_at_kill']}); "
            f"after restart: integrity {r['integrity_check']}, "
            f"ok calls without completions {r['ok_calls_without_completions']}"
        )
        failed |= r["integrity_check"] != "ok" or r["ok_calls_without_completions"] != 0
        failed |= r["durable"] and r["lost"] != 0
    plain, durable = results
    print(
        f"cost of durable mode: {durable['calls_per_s'] / plain['calls_per_s']:.2f}x the calls/s, "
        f"{durable['p50_ms'] - plain['p50_ms']:+.2f} ms p50"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
