"""Added latency of one non-streaming call: N sequential calls direct and through TokenTrail, same run.

Usage: python bench/latency.py --upstream http://127.0.0.1:8001 [--calls 200] [--max-tokens 8]

Starts ``tokentrail serve`` on a free port with a temporary SQLite database, then alternates calls
(direct, proxied, direct, ...) so that both see the same vLLM at the same moment, and prints the
median and p90 of each and of the difference. Checks that every proxied call was recorded.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_healthy(url: str, process: subprocess.Popen[bytes], limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("tokentrail serve exited during startup")
        try:
            if httpx.get(url + "/tokentrail/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise SystemExit("tokentrail serve did not become healthy")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--upstream", required=True, help="vLLM base URL, e.g. http://127.0.0.1:8001")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    upstream = args.upstream.rstrip("/").removesuffix("/v1")
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
    }
    with tempfile.TemporaryDirectory() as tmp:
        db_url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        port = _free_port()
        env = dict(
            os.environ,
            TOKENTRAIL_UPSTREAM=upstream,
            TOKENTRAIL_DB=db_url,
            TOKENTRAIL_PORT=str(port),
            TOKENTRAIL_LOG_LEVEL="warning",
            TOKENTRAIL_FALLBACK_PATH=str(Path(tmp) / "fallback.jsonl"),
        )
        process = subprocess.Popen([sys.executable, "-m", "tokentrail.proxy.cli", "serve"], env=env)
        proxy = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(proxy, process)
            direct_ms: list[float] = []
            proxied_ms: list[float] = []
            with httpx.Client(timeout=60) as direct, httpx.Client(timeout=60) as through:
                for client, base in ((direct, upstream), (through, proxy)):  # warm up both paths
                    client.post(base + "/v1/chat/completions", json=body).raise_for_status()
                for _ in range(args.calls):
                    for client, base, sink in ((direct, upstream, direct_ms), (through, proxy, proxied_ms)):
                        start = time.perf_counter()
                        client.post(
                            base + "/v1/chat/completions", json=body, headers={"X-Trajectory-Id": "bench"}
                        ).raise_for_status()
                        sink.append((time.perf_counter() - start) * 1000)
        finally:
            process.terminate()
            process.wait(60)
        engine = create_engine(db_url)
        with engine.connect() as connection:
            recorded = connection.execute(text("SELECT count(*) FROM llm_calls")).scalar_one()
        engine.dispose()
    added = [p - d for p, d in zip(proxied_ms, direct_ms, strict=True)]
    print(f"calls per path: {args.calls} sequential, non-streaming, max_tokens={args.max_tokens}")
    print(f"{'path':<12}{'p50 ms':>10}{'p90 ms':>10}")
    for name, values in (("direct", direct_ms), ("tokentrail", proxied_ms), ("added", added)):
        print(f"{name:<12}{statistics.median(values):>10.2f}{_percentile(values, 0.9):>10.2f}")
    print(f"median added latency: {statistics.median(proxied_ms) - statistics.median(direct_ms):.2f} ms")
    print(f"records: {recorded} of {args.calls + 1} proxied calls")
    return 0 if recorded == args.calls + 1 else 1


if __name__ == "__main__":
    sys.exit(main())
