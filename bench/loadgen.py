"""A closed-loop HTTP load generator: ``concurrency`` workers, each on its own keep-alive connection,
each sending its next call as soon as the previous one ended.

Why not httpx or aiohttp here: the load generator shares a core with the fake upstream and must not be
the limit. Each connection is a raw asyncio protocol with httptools' C parser (the one uvicorn uses),
which reads chunked streams too. Reports calls/s, latency p50/p90/p99, time to first body byte (for
streams: the first SSE event, vLLM's role chunk with the prompt's token IDs) and errors as JSON.

Run: ``python bench/loadgen.py --url http://127.0.0.1:8080 --concurrency 16 --duration 5 [--stream]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httptools


def chat_body(prompt_tokens: int, max_tokens: int, stream: bool, *, n: int = 1) -> dict[str, Any]:
    """A chat request whose prompt is about ``prompt_tokens`` tokens for the fake upstream."""
    body: dict[str, Any] = {
        "model": "fake",
        "messages": [{"role": "user", "content": "word " * max(0, (prompt_tokens - 8) * 4 // 5)}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if n > 1:
        body["n"] = n
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def completion_body(prompt_tokens: int, max_tokens: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "fake",
        "prompt": "word " * max(1, prompt_tokens * 4 // 5),
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


@dataclass
class Result:
    calls: int = 0  # measured calls that ended with a 200 and a whole body
    errors: int = 0
    total_sent: int = 0  # every call, warm-up included (what the proxy should have recorded)
    total_ok: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "errors": self.errors,
            "total_sent": self.total_sent,
            "total_ok": self.total_ok,
            "seconds": self.seconds,
            "calls_per_s": self.calls / self.seconds if self.seconds else 0.0,
            "p50_ms": percentile(self.latencies_ms, 0.50),
            "p90_ms": percentile(self.latencies_ms, 0.90),
            "p99_ms": percentile(self.latencies_ms, 0.99),
            "ttft_p50_ms": percentile(self.ttft_ms, 0.50),
            "ttft_p99_ms": percentile(self.ttft_ms, 0.99),
            "error_samples": self.error_samples[:5],
        }


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Connection(asyncio.Protocol):
    """One keep-alive connection; ``call`` sends a request and waits for the whole response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[None] | None = None
        self.first_body_at: float | None = None
        self.tail = b""
        self.head = b""  # the first bytes of the body (the response id is in them)
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("connection closed"))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.done is not None and not self.done.done():
                self.done.set_exception(exc)

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        if self.first_body_at is None:
            self.first_body_at = time.perf_counter()
        if len(self.head) < 256:
            self.head += body[: 256 - len(self.head)]
        self.tail = (self.tail + body)[-32:]

    def on_message_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if not self.parser.should_keep_alive() and self.transport is not None:
            self.transport.close()
            self.transport = None
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    async def call(self, request: bytes) -> None:
        assert self.transport is not None
        self.done = asyncio.get_running_loop().create_future()
        self.first_body_at = None
        self.tail = b""
        self.head = b""
        self.transport.write(request)
        await self.done


def build_request(url: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    host = urlsplit(url).netloc
    lines = [f"POST {path} HTTP/1.1", f"host: {host}", "content-type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def run_load(
    url: str,
    path: str,
    body: dict[str, Any],
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    stream: bool,
    headers: dict[str, str] | None = None,
    trajectory_prefix: str | None = None,
) -> Result:
    """Closed loop for ``warmup_s + duration_s``; only calls that start after the warm-up count."""
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    payload = json.dumps(body).encode()
    result = Result()
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    async def worker(index: int) -> None:
        worker_headers = dict(headers or {})
        if trajectory_prefix is not None:
            worker_headers["x-trajectory-id"] = f"{trajectory_prefix}-{index}"
        request = build_request(url, path, payload, worker_headers)
        connection: _Connection | None = None
        while True:
            began = time.perf_counter()
            if began >= stop_at:
                break
            if connection is None or connection.transport is None:
                _, connection = await loop.create_connection(
                    _Connection, parts.hostname or "127.0.0.1", parts.port or 80
                )
            result.total_sent += 1
            try:
                await connection.call(request)
                ok = connection.status == 200 and (not stream or connection.tail.endswith(b"[DONE]\n\n"))
                if not ok:
                    reason = f"status {connection.status}, tail {connection.tail!r}"
            except (ConnectionError, OSError, httptools.HttpParserError) as exc:
                ok = False
                reason = f"{type(exc).__name__}: {exc}"
                connection = None
            ended = time.perf_counter()
            if ok:
                result.total_ok += 1
            if began < measure_from:
                continue
            if ok:
                result.calls += 1
                result.latencies_ms.append((ended - began) * 1000)
                if connection is not None and connection.first_body_at is not None:
                    result.ttft_ms.append((connection.first_body_at - began) * 1000)
            else:
                result.errors += 1
                result.error_samples.append(reason)
        if connection is not None and connection.transport is not None:
            connection.transport.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    result.seconds = min(time.perf_counter(), stop_at) - measure_from
    return result


def use_uvloop() -> None:
    """uvloop's event loop where it is installed (it comes with uvicorn[standard])."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--route", choices=["chat", "completions"], default="chat")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds before measuring")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--prompt-tokens", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--token-delay-ms", type=float, default=None, help="asks the fake upstream")
    parser.add_argument("--trajectory-prefix", default=None, help="X-Trajectory-Id = PREFIX-<worker>")
    parser.add_argument("--model", default="fake")
    args = parser.parse_args()
    use_uvloop()
    if args.route == "chat":
        body = chat_body(args.prompt_tokens, args.max_tokens, args.stream, n=args.n)
        path = "/v1/chat/completions"
    else:
        body = completion_body(args.prompt_tokens, args.max_tokens, args.stream)
        path = "/v1/completions"
    body["model"] = args.model
    headers = {}
    if args.token_delay_ms is not None:
        headers["x-fake-token-delay-ms"] = str(args.token_delay_ms)
    result = asyncio.run(
        run_load(
            args.url.rstrip("/"),
            path,
            body,
            concurrency=args.concurrency,
            duration_s=args.duration,
            warmup_s=args.warmup,
            stream=args.stream,
            headers=headers,
            trajectory_prefix=args.trajectory_prefix,
        )
    )
    json.dump(result.summary(), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
