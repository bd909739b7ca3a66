"""A fast fake vLLM for benchmarks: vLLM 0.32's wire format from a raw asyncio protocol.

Why raw asyncio: the upstream must never be what a benchmark measures. A Starlette app serves about
6,000 calls/s on one core here; this serves several times that, so the proxy under test is the limit.

What it speaks (byte layout as in ``tests/vllm_samples/``, captured from the real vLLM):

* ``POST /v1/chat/completions`` and ``POST /v1/completions``, streaming (chunked SSE, ``[DONE]``) and
  not; ``return_token_ids`` gives ID lists where vLLM gives them and ``null`` otherwise;
  ``stream_options.include_usage`` adds the usage chunk; ``n`` choices; ``max_tokens`` tokens.
* ``POST /tokenize`` (``messages`` or ``prompt``), in vLLM's shape: ``{"count", "max_model_len",
  "tokens", "token_strs"}``; the IDs are ``fake_chat``'s (what ``--agent-mode`` renders).
* ``GET /health`` (200, empty) and ``GET /v1/models``.
* ``GET /fake/tokenize-stats``: what it was asked to tokenize (``TokenizeStats``): ``/tokenize``
  requests and their bytes, and the bytes of chat calls it rendered itself (no prompt IDs given),
  each by the turn of the chat call they served; a ``POST`` there starts them again.

Deterministic token IDs so a benchmark can check what a proxy stored: the prompt has
``prompt_token_count(body)`` IDs ``prompt_id(i)``, and choice ``j`` generates ``generated_id(i, j)``.
The prompt length follows the request's text (about 4 characters per token), so a long agent prompt
gives the large first chunk a real server would.

Per-token delay: ``--token-delay-ms``, or per request the header ``x-fake-token-delay-ms``; streams
sleep between tokens, non-streaming calls once for all of them.

``--agent-mode`` (for ``bench/agents.py``): chat calls are answered by ``fake_chat``'s model instead:
the prompt IDs are the ChatML rendering of the messages (or, when the body carries
``kv_transfer_params.prompt_token_ids`` as TokenTrail's token-in sends, exactly those IDs: taken as
the body's own text, not parsed and written back, so that a prompt sent as IDs costs the fake no more
than one sent as text, whose tokenizer is a table lookup), the reply
text and its IDs a deterministic function of the messages. Streams are paced by the clock: token ``i``
is due ``(i + 1) * delay`` after the first chunk and every token due is written at each wake-up, so a
busy core delays tokens but does not slow the model down, as on a GPU.

Run: ``python bench/fake_vllm.py --port 8100 [--token-delay-ms 0] [--agent-mode]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import fake_chat

FINGERPRINT = "vllm-0.32.0-fake"
VOCAB = 32000
_HEADER_END = b"\r\n\r\n"


def prompt_id(i: int) -> int:
    return (i * 31 + 7) % VOCAB


def generated_id(i: int, choice: int) -> int:
    return (1000 + i * 7 + choice * 13) % VOCAB


def prompt_token_count(route: str, body: dict[str, Any]) -> int:
    """About one token per 4 characters of prompt text, plus the chat template's few."""
    if route == "/v1/completions":
        prompt = body.get("prompt")
        return max(1, len(prompt) // 4) if isinstance(prompt, str) else 1
    chars = 0
    for message in body.get("messages") or []:
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            chars += len(message["content"])
    return 8 + chars // 4


_prompt_cache: dict[int, str] = {}


def _prompt_ids_json(count: int) -> str:
    cached = _prompt_cache.get(count)
    if cached is None:
        cached = "[" + ",".join(str(prompt_id(i)) for i in range(count)) + "]"
        if len(_prompt_cache) < 256:
            _prompt_cache[count] = cached
    return cached


def _word(token_id: int) -> str:
    return f" t{token_id}"


class _Call:
    """One parsed completion request and the pieces of its answer."""

    def __init__(
        self,
        route: str,
        body: dict[str, Any],
        serial: int,
        agent_mode: bool = False,
        given_json: str | None = None,
    ) -> None:
        self.chat = route == "/v1/chat/completions"
        self.stream = body.get("stream") is True
        self.ids = body.get("return_token_ids") is True
        options = body.get("stream_options")
        self.usage = isinstance(options, dict) and options.get("include_usage") is True
        n = body.get("n")
        self.n = n if isinstance(n, int) and n > 0 else 1
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16
        self.max_tokens = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else 16
        self.model = json.dumps(body.get("model") or "fake")
        self.prompt_count = prompt_token_count(route, body)
        self.prompt_json: str | None = None  # agent mode: the prompt's IDs, else prompt_id(0..count-1)
        self.reply: fake_chat.Reply | None = None  # agent mode: the text and IDs of every choice
        messages = body.get("messages")
        if agent_mode and self.chat and isinstance(messages, list):
            self.prompt_count, self.prompt_json = _agent_prompt(body, messages, given_json)
            self.reply = fake_chat.reply(messages, self.max_tokens)
        kind = "chat.completion.chunk" if self.stream else "chat.completion"
        self.head = (
            f'{{"id":"{"chatcmpl" if self.chat else "cmpl"}-{serial:016x}","object":'
            f'"{kind if self.chat else "text_completion"}","created":{int(time.time())},"model":{self.model}'
        )

    def _prompt_ids(self) -> str:
        if not self.ids:
            return "null"
        return self.prompt_json if self.prompt_json is not None else _prompt_ids_json(self.prompt_count)

    def _generated(self, choice: int) -> list[int]:
        if self.reply is not None:
            return list(self.reply.ids)
        return [generated_id(i, choice) for i in range(self.max_tokens)]

    def _piece(self, i: int, choice: int) -> tuple[int, str]:
        """Generated token ``i`` of ``choice``: its ID and its text."""
        if self.reply is not None:
            return self.reply.ids[i], self.reply.pieces[i]
        token = generated_id(i, choice)
        return token, _word(token)

    def _usage(self) -> str:
        completion = self.n * self.max_tokens
        return (
            f'{{"prompt_tokens":{self.prompt_count},"total_tokens":{self.prompt_count + completion},'
            f'"completion_tokens":{completion}'
        )

    def whole(self) -> bytes:
        choices = []
        for j in range(self.n):
            generated = self._generated(j)
            if self.reply is not None:
                text = json.dumps(self.reply.text)
            else:
                text = json.dumps("".join(_word(t) for t in generated))
            ids = "[" + ",".join(map(str, generated)) + "]" if self.ids else "null"
            if self.chat:
                choices.append(
                    f'{{"index":{j},"message":{{"role":"assistant","content":{text},"refusal":null,'
                    f'"annotations":null,"audio":null,"function_call":null,"reasoning":null}},'
                    f'"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":{ids},'
                    f'"routed_experts":null}}'
                )
            else:
                choices.append(
                    f'{{"index":{j},"text":{text},"logprobs":null,"finish_reason":"length",'
                    f'"stop_reason":null,"token_ids":{ids},"prompt_logprobs":null,'
                    f'"prompt_token_ids":{self._prompt_ids()},"routed_experts":null}}'
                )
        usage = self._usage() + ',"prompt_tokens_details":null,"completion_tokens_details":null}'
        tail = (
            f',"prompt_logprobs":null,"prompt_token_ids":{self._prompt_ids()},"prompt_text":null'
            if self.chat
            else ""
        )
        return (
            f'{self.head},"choices":[{",".join(choices)}],"service_tier":null,'
            f'"system_fingerprint":"{FINGERPRINT}","usage":{usage}{tail},'
            f'"kv_transfer_params":null,"ec_transfer_params":null,"metrics":null}}'
        ).encode()

    def first_events(self) -> list[bytes]:
        """Chat streams open with one role chunk per choice carrying the prompt IDs."""
        if not self.chat:
            return []
        return [
            _event(
                f'{self.head},"choices":[{{"index":{j},"delta":{{"role":"assistant","content":""}},'
                f'"logprobs":null,"finish_reason":null}}],"prompt_token_ids":{self._prompt_ids()},'
                f'"prompt_text":null}}'
            )
            for j in range(self.n)
        ]

    def token_event(self, i: int, choice: int) -> bytes:
        token, piece = self._piece(i, choice)
        ids = f"[{token}]" if self.ids else "null"
        last = i == self.max_tokens - 1
        text = json.dumps(piece)
        if self.chat:
            finish = '"finish_reason":"length","stop_reason":null' if last else '"finish_reason":null'
            return _event(
                f'{self.head},"choices":[{{"index":{choice},"delta":{{"content":{text}}},'
                f'"logprobs":null,{finish},"token_ids":{ids}}}]}}'
            )
        prompt = self._prompt_ids() if i == 0 else "null"
        finish = '"length"' if last else "null"
        return _event(
            f'{self.head},"choices":[{{"index":{choice},"text":{text},"logprobs":null,'
            f'"finish_reason":{finish},"stop_reason":null,"prompt_token_ids":{prompt},"token_ids":{ids}}}]}}'
        )

    def last_events(self) -> list[bytes]:
        events = []
        if self.usage:
            events.append(
                _event(
                    f'{self.head},"choices":[],"usage":{self._usage()}}},'
                    f'"system_fingerprint":"{FINGERPRINT}"}}'
                )
            )
        events.append(b"data: [DONE]\n\n")
        return events


_IDS_KEY = b'"prompt_token_ids":['


def split_prompt_ids(raw: bytes) -> tuple[bytes, str | None]:
    """A chat body with its ``kv_transfer_params.prompt_token_ids`` list cut out (``[0]`` in its place)
    and that list's JSON text, or the body as it is and None. Parsing 15,000 IDs and writing them
    back cost the fake 1.7 ms a call, four times what the same prompt costs it as text: under 64
    agents whose calls come together, that made the fake the queue a benchmark measured."""
    kv = raw.find(b'"kv_transfer_params":{')
    start = raw.find(_IDS_KEY, kv) if kv >= 0 else -1
    end = raw.find(b"]", start) if start >= 0 else -1
    if end < 0:
        return raw, None
    first = start + len(_IDS_KEY) - 1
    return raw[:first] + b"[0]" + raw[end + 1 :], raw[first : end + 1].decode()


def _agent_prompt(
    body: dict[str, Any], messages: list[Any], given_json: str | None = None
) -> tuple[int, str]:
    """(count, JSON list) of an agent-mode chat call's prompt IDs: token-in's, or the rendering."""
    if given_json is not None and given_json != "[]":
        return given_json.count(",") + 1, given_json.replace(" ", "")
    kv = body.get("kv_transfer_params")
    given = kv.get("prompt_token_ids") if isinstance(kv, dict) else None
    if isinstance(given, list) and given:
        return len(given), "[" + ",".join(map(str, given)) + "]"
    return fake_chat.rendered_json(messages)


class TokenizeStats:
    """Bytes this fake tokenized, by the turn of the chat call they were for (1: a trajectory's first).

    A ``/tokenize`` request is held under its last message: token-in renders the history up to the
    previous call's reply (held under that reply), and that history, or a stand-in one, with the new
    messages (held under the last new message). A chat call claims what is held under its last
    message and under its last reply; its turn is its count of assistant messages + 1. Replies and
    tool results in agent mode are a function of the messages, so different agents' do not collide.
    Requests no chat call claims (the template's end-of-turn probes, a stand-in history rendered
    alone, which token-in keeps) stay ``unattributed``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.pending: dict[str, list[int]] = {}  # reply -> [requests, bytes]
        self.by_turn: dict[
            int, list[int]
        ] = {}  # turn -> [calls, tokenize requests, tokenize bytes, chat bytes]

    def tokenized(self, body: dict[str, Any], size: int) -> None:
        key = _last_message(body.get("messages"))
        held = self.pending.setdefault(key, [0, 0])
        held[0] += 1
        held[1] += size

    def chat(self, body: dict[str, Any], size: int, rendered: bool) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return
        turn = 1 + sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant")
        row = self.by_turn.setdefault(turn, [0, 0, 0, 0])
        requests = tokenized = 0
        if turn > 1:
            for key in {_last_message(messages), _last_message(messages, "assistant")}:
                held = self.pending.pop(key, [0, 0])
                requests += held[0]
                tokenized += held[1]
        row[0] += 1
        row[1] += requests
        row[2] += tokenized
        row[3] += size if rendered else 0

    def as_json(self) -> bytes:
        unattributed = [sum(v[0] for v in self.pending.values()), sum(v[1] for v in self.pending.values())]
        return json.dumps({"by_turn": self.by_turn, "unattributed": unattributed}).encode()


def _last_message(messages: Any, role: str | None = None) -> str:
    """The last message (of ``role``), as a key."""
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and role in (None, message.get("role")):
                return json.dumps([message.get("role"), message.get("content")])
    return ""


STATS = TokenizeStats()


def _tokenize(body: dict[str, Any]) -> bytes:
    """vLLM's ``/tokenize`` answer for ``messages`` (rendered) or ``prompt`` (encoded)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        count, tokens = fake_chat.rendered_json(
            messages, body.get("add_generation_prompt", True) is not False
        )
    else:
        ids = fake_chat.encode(str(body.get("prompt") or ""))
        count, tokens = len(ids), "[" + ",".join(map(str, ids)) + "]"
    return f'{{"count":{count},"max_model_len":65536,"tokens":{tokens},"token_strs":null}}'.encode()


def _event(payload: str) -> bytes:
    return b"data: " + payload.encode() + b"\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _response_head(status: int, content_type: bytes, length: int | None) -> bytes:
    framing = b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length
    reason = b"OK" if status == 200 else b"Error"
    return (
        b"HTTP/1.1 %d %s\r\ndate: Thu, 01 Jan 2026 00:00:00 GMT\r\nserver: uvicorn\r\n%s\r\n"
        b"content-type: %s\r\n\r\n" % (status, reason, framing, content_type)
    )


_JSON = b"application/json"
_SSE = b"text/event-stream; charset=utf-8"
_MODELS = b'{"object":"list","data":[{"id":"fake","object":"model","owned_by":"vllm","max_model_len":65536}]}'


class FakeVllmProtocol(asyncio.Protocol):
    """One client connection: HTTP/1.1 keep-alive, one request at a time."""

    serial = 0

    def __init__(self, default_delay_s: float, agent_mode: bool = False) -> None:
        self.default_delay_s = default_delay_s
        self.agent_mode = agent_mode
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.paused = False
        self.drained: asyncio.Event = asyncio.Event()
        self.drained.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def pause_writing(self) -> None:
        self.drained.clear()

    def resume_writing(self) -> None:
        self.drained.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.drained.set()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._next_request()

    def _next_request(self) -> None:
        while not self.busy and self._one_request():
            pass

    def _one_request(self) -> bool:
        """Handle the first complete request in the buffer; False when none is complete yet."""
        end = self.buffer.find(_HEADER_END)
        if end < 0:
            return False
        head = self.buffer[:end].decode("latin-1").split("\r\n")
        method, target, _ = head[0].split(" ", 2)
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        if len(self.buffer) < end + 4 + length:
            return False
        body = self.buffer[end + 4 : end + 4 + length]
        self.buffer = self.buffer[end + 4 + length :]
        delay_header = headers.get("x-fake-token-delay-ms")
        delay_s = float(delay_header) / 1000 if delay_header else self.default_delay_s
        self._handle(method, target.split("?", 1)[0], body, delay_s)
        return True

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _handle(self, method: str, path: str, body: bytes, delay_s: float) -> None:
        if method == "GET" and path == "/health":
            self._write(_response_head(200, _JSON, 0))
        elif method == "GET" and path == "/v1/models":
            self._write(_response_head(200, _JSON, len(_MODELS)) + _MODELS)
        elif path == "/fake/tokenize-stats":
            if method == "POST":
                STATS.reset()
            payload = STATS.as_json()
            self._write(_response_head(200, _JSON, len(payload)) + payload)
        elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions", "/tokenize"):
            given_json = None
            size = len(body)
            if self.agent_mode and path == "/v1/chat/completions":
                body, given_json = split_prompt_ids(body)
            try:
                parsed = json.loads(body)
                assert isinstance(parsed, dict)
            except (ValueError, AssertionError):
                error = b'{"error":{"message":"bad JSON","type":"BadRequestError","param":null,"code":400}}'
                self._write(_response_head(400, _JSON, len(error)) + error)
                return
            if path == "/tokenize":
                STATS.tokenized(parsed, len(body))
                payload = _tokenize(parsed)
                self._write(_response_head(200, _JSON, len(payload)) + payload)
                return
            FakeVllmProtocol.serial += 1
            if path == "/v1/chat/completions":
                kv = parsed.get("kv_transfer_params")
                given = parsed.get("prompt_token_ids") or (
                    kv.get("prompt_token_ids") if isinstance(kv, dict) else None
                )
                STATS.chat(parsed, size, rendered=not given)
            call = _Call(path, parsed, FakeVllmProtocol.serial, self.agent_mode, given_json)
            if call.stream:
                if delay_s > 0:
                    self.busy = True
                    paced = self._clock_paced_stream if self.agent_mode else self._paced_stream
                    asyncio.get_running_loop().create_task(paced(call, delay_s))
                else:
                    events = call.first_events()
                    for i in range(call.max_tokens):
                        events.extend(call.token_event(i, j) for j in range(call.n))
                    events.extend(call.last_events())
                    self._write(
                        _response_head(200, _SSE, None) + b"".join(map(_chunk, events)) + b"0\r\n\r\n"
                    )
            elif delay_s > 0:
                self.busy = True
                asyncio.get_running_loop().create_task(self._paced_whole(call, delay_s))
            else:
                payload = call.whole()
                self._write(_response_head(200, _JSON, len(payload)) + payload)
        else:
            error = b'{"detail":"Not Found"}'
            self._write(_response_head(404, _JSON, len(error)) + error)

    async def _paced_stream(self, call: _Call, delay_s: float) -> None:
        self._write(_response_head(200, _SSE, None) + b"".join(map(_chunk, call.first_events())))
        for i in range(call.max_tokens):
            await asyncio.sleep(delay_s)
            if self.transport is None:
                return
            await self.drained.wait()
            self._write(b"".join(_chunk(call.token_event(i, j)) for j in range(call.n)))
        self._write(b"".join(map(_chunk, call.last_events())) + b"0\r\n\r\n")
        self._done()

    async def _clock_paced_stream(self, call: _Call, delay_s: float) -> None:
        """As ``_paced_stream``, but token ``i`` is due ``(i + 1) * delay_s`` after the first chunk,
        and each wake-up writes every token that is due: the model's speed does not depend on how
        busy this core is."""
        loop = asyncio.get_running_loop()
        self._write(_response_head(200, _SSE, None) + b"".join(map(_chunk, call.first_events())))
        start = loop.time()
        sent = 0
        while sent < call.max_tokens:
            due = min(call.max_tokens, int((loop.time() - start) / delay_s))
            if due <= sent:
                await asyncio.sleep(start + (sent + 1) * delay_s - loop.time())
                continue
            if self.transport is None:
                return
            await self.drained.wait()
            self._write(
                b"".join(_chunk(call.token_event(i, j)) for i in range(sent, due) for j in range(call.n))
            )
            sent = due
        self._write(b"".join(map(_chunk, call.last_events())) + b"0\r\n\r\n")
        self._done()

    async def _paced_whole(self, call: _Call, delay_s: float) -> None:
        await asyncio.sleep(delay_s * call.max_tokens)
        payload = call.whole()
        self._write(_response_head(200, _JSON, len(payload)) + payload)
        self._done()

    def _done(self) -> None:
        self.busy = False
        self._next_request()


async def serve(host: str, port: int, delay_s: float, agent_mode: bool = False) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FakeVllmProtocol(delay_s, agent_mode), host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--token-delay-ms", type=float, default=0.0)
    parser.add_argument(
        "--agent-mode",
        action="store_true",
        help="chat calls: ChatML-rendered prompt IDs, deterministic replies, clock-paced streams",
    )
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        pass
    asyncio.run(serve(args.host, args.port, args.token_delay_ms / 1000, args.agent_mode))


if __name__ == "__main__":
    main()
