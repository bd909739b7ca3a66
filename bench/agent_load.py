"""Agent-shaped load: ``--agents`` concurrent agents, each a ``--turns``-turn chat that re-sends its whole
history every turn, as a tool-calling agent does.

Each agent has its own keep-alive connection and its own trajectory (``X-Trajectory-Id: PREFIX-<n>``).
Every turn POSTs a streamed ``/v1/chat/completions`` with ``"return_token_ids": true`` (as TokenTrail's
clients send) and usage; its messages are a system prompt shared by all agents and the agent's first
user message (``--first-prompt-tokens`` with the template, for ``fake_vllm.py --agent-mode``'s
tokenizer: one token per word), then for each earlier turn the assistant reply exactly as it came
back (the streamed content joined) and a tool result of ``--tool-result-tokens`` words (sent as a user
message). Prompts grow by the reply and the tool result each turn: with the defaults from 1,000
tokens to about 15,000 at turn 30. ``conversation`` builds the same messages for a checker.

Reports as JSON, in ``loadgen.py``'s shape: calls/s over the whole run (no warm-up: every turn counts),
whole-call latency p50/p90/p99, and as ``ttft`` the first-token latency (from sending a request to the
first streamed content token, after vLLM's role chunk with the prompt IDs) p50/p99, and errors. An
agent whose call fails stops there (its later turns cannot be built).

Run: ``python bench/agent_load.py --url http://127.0.0.1:8000 --agents 64 --turns 30``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from loadgen import Result, _Connection, build_request, use_uvloop

PATH = "/v1/chat/completions"
_TEMPLATE_TOKENS = 13  # fake_chat's ChatML: 5 per message (system, user), 3 for the generation prompt
# A streamed token's delta (vLLM's role chunk says '{"role":"assistant","content":""}' instead).
_TOKEN_DELTA = b'"delta":{"content":'
_ROLE_CHUNK = b'"delta":{"role":"assistant","content":""}'


@dataclass(frozen=True)
class Shape:
    """What every agent's conversation looks like."""

    first_prompt_tokens: int = 1000
    reply_tokens: int = 200
    tool_result_tokens: int = 274
    model: str = "fake"

    def first_messages(self, agent: int) -> list[dict[str, str]]:
        """The system prompt (two thirds, the same for every agent) and the agent's first user message."""
        words = max(2, self.first_prompt_tokens - _TEMPLATE_TOKENS)
        system = " ".join(f"s{j}" for j in range(words * 2 // 3))
        task = " ".join(f"a{agent}u{j}" for j in range(words - words * 2 // 3))
        return [{"role": "system", "content": system}, {"role": "user", "content": task}]

    def tool_result(self, agent: int, turn: int) -> dict[str, str]:
        seed = agent * 7919 + turn * 104729
        words = (f"r{(seed + j * 31) % 1000003}" for j in range(self.tool_result_tokens))
        return {"role": "user", "content": " ".join(words)}

    def body(self, messages_json: list[str]) -> bytes:
        """The request body, from the messages already serialised (an agent appends, never re-dumps)."""
        return (
            f'{{"model":{json.dumps(self.model)},"messages":[{",".join(messages_json)}],'
            f'"max_tokens":{self.reply_tokens},"temperature":0,"stream":true,'
            f'"stream_options":{{"include_usage":true}},"return_token_ids":true}}'
        ).encode()


def streamed_content(body: bytes) -> str:
    """The content deltas of an SSE chat stream, joined."""
    parts = []
    for event in body.split(b"\n\n"):
        if not event.startswith(b"data: {") or _ROLE_CHUNK in event:
            continue
        for choice in json.loads(event[6:]).get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                parts.append(content)
    return "".join(parts)


class _AgentConnection(_Connection):
    """A keep-alive connection that keeps the whole body and notes when the first token came."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[bytes] = []
        self.first_token_at: float | None = None
        self._carry = b""

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self.chunks.append(body)
        if self.first_token_at is None:
            if _TOKEN_DELTA in self._carry + body:  # (a marker may straddle two reads)
                self.first_token_at = time.perf_counter()
            else:
                self._carry = body[1 - len(_TOKEN_DELTA) :]

    async def call(self, request: bytes) -> None:
        self.chunks = []
        self.first_token_at = None
        self._carry = b""
        await super().call(request)


async def run_agents(
    url: str, shape: Shape, *, agents: int, turns: int, trajectory_prefix: str, delay_ms: float | None
) -> Result:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    result = Result()
    headers = {} if delay_ms is None else {"x-fake-token-delay-ms": str(delay_ms)}

    async def agent(index: int) -> None:
        agent_headers = {**headers, "x-trajectory-id": f"{trajectory_prefix}-{index}"}
        messages = [json.dumps(m) for m in shape.first_messages(index)]
        _, connection = await loop.create_connection(_AgentConnection, host, port)
        try:
            for turn in range(turns):
                request = build_request(url, PATH, shape.body(messages), agent_headers)
                began = time.perf_counter()
                result.total_sent += 1
                try:
                    await connection.call(request)
                    ok = connection.status == 200 and connection.tail.endswith(b"[DONE]\n\n")
                    reason = f"status {connection.status}, tail {connection.tail!r}"
                except (ConnectionError, OSError) as exc:
                    ok, reason = False, f"{type(exc).__name__}: {exc}"
                ended = time.perf_counter()
                if not ok:
                    result.errors += 1
                    result.error_samples.append(f"agent {index} turn {turn}: {reason}")
                    return
                result.calls += 1
                result.total_ok += 1
                result.latencies_ms.append((ended - began) * 1000)
                if connection.first_token_at is not None:
                    result.ttft_ms.append((connection.first_token_at - began) * 1000)
                reply = streamed_content(b"".join(connection.chunks))
                messages.append(json.dumps({"role": "assistant", "content": reply}))
                messages.append(json.dumps(shape.tool_result(index, turn)))
        finally:
            if connection.transport is not None:
                connection.transport.close()

    started = time.perf_counter()
    await asyncio.gather(*(agent(i) for i in range(agents)))
    result.seconds = time.perf_counter() - started
    return result


def add_shape_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--agents", type=int, default=64, help="concurrent agents (default 64)")
    parser.add_argument("--turns", type=int, default=30, help="calls per agent (default 30)")
    parser.add_argument(
        "--first-prompt-tokens", type=int, default=1000, help="system + first user message (default 1000)"
    )
    parser.add_argument(
        "--reply-tokens", type=int, default=200, help="max_tokens of each reply (default 200)"
    )
    parser.add_argument(
        "--tool-result-tokens",
        type=int,
        default=274,
        help="words of the tool result after each reply (default 274: turn 30's prompt is ~15,000 tokens)",
    )
    parser.add_argument("--delay-ms", type=float, default=2.0, help="the fake's ms per token (default 2)")


def shape_of(args: argparse.Namespace) -> Shape:
    return Shape(args.first_prompt_tokens, args.reply_tokens, args.tool_result_tokens, args.model)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    add_shape_options(parser)
    parser.add_argument("--trajectory-prefix", default="agent", help="X-Trajectory-Id = PREFIX-<agent>")
    parser.add_argument("--model", default="fake")
    args = parser.parse_args()
    use_uvloop()
    result = asyncio.run(
        run_agents(
            args.url.rstrip("/"),
            shape_of(args),
            agents=args.agents,
            turns=args.turns,
            trajectory_prefix=args.trajectory_prefix,
            delay_ms=args.delay_ms,
        )
    )
    json.dump(result.summary(), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
