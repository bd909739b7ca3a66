"""A fast fake vLLM for the faults a real vLLM cannot be made to show on demand.

It speaks vLLM 0.32's wire format (field order and compact JSON as in ``tests/vllm_samples/``, which
``tests/vllm_samples/capture.py`` captures from the real vLLM).
The ``x-fake`` request header picks a behaviour:

* (none): a normal completion; ``max_tokens`` tokens, ``return_token_ids`` and ``include_usage``
  honoured, streaming or not, ``n`` choices.
* ``sample:<name>``: replay the response of that sample file byte for byte.
* ``die-mid-stream``: two chunks, then the connection is cut.
* ``hang``: no answer at all until the client goes away.
* ``hang-stream``: headers and the first chunk, then nothing until the client goes away.
* ``status:<code>``: an OpenAI-shaped error with that status.
* ``garbage``: a 200 with a body that is neither JSON nor SSE.
* ``redirect``: a 307 to another host.
* ``gate``: wait until the test opens ``FakeUpstream.gate``, then answer normally.
* ``big:<bytes>``: a normal completion whose token texts are padded to about that many bytes in all.
* ``gate-stream``: a stream that sends two tokens, then waits until the test opens ``gate``; a
  ``POST /pause?mode=abort`` meanwhile ends it as vLLM ends an aborted request: ``abort_ending``
  ``chunk`` (a last chunk with finish reason ``abort``), ``unfinished`` (``[DONE]`` with no finish
  reason, as vLLM 0.32 ends a request aborted before its first token) or ``cut`` (the connection closed).

vLLM's RL control plane is there too: ``GET /weight_info``, ``POST /update_weight_version``,
``POST /pause`` and ``POST /resume`` (recorded in ``control``).
* ``render``: a normal completion whose prompt IDs are rendered from the request (``render_prompt``),
  so a later call whose messages repeat an earlier one's extend its IDs exactly, and one that changes
  the history breaks the prefix; with ``logprobs`` it returns one logprob per generated token.
``POST /detokenize`` answers ``{"prompt": piece(id)}`` for one ID (``token_piece``).
Any other path answers with the headers and body it received, as JSON (``/echo``).
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SAMPLES = Path(__file__).resolve().parent / "vllm_samples"
PROMPT_IDS = [1, 2673, 205, 63, 1129, 567, 273, 271, 2, 205, 1, 3633, 621, 797, 205]
ROLE_IDS = {"system": 3, "user": 4, "assistant": 5, "tool": 6}
CHAR_BASE = 1000  # render mode: a character c is token CHAR_BASE + ord(c)


def _text_ids(text: str) -> list[int]:
    """A generated answer ("t100t107...") back into its IDs; any other text one ID per character."""
    parts = text.split("t")[1:] if text.startswith("t") else []
    if parts and all(p.isdigit() for p in parts):
        return [int(p) for p in parts]
    return [CHAR_BASE + min(ord(c), 0xFFFF) for c in text]


def render_prompt(request: dict[str, Any]) -> list[int]:
    """A toy chat template: each message is its role's ID and its content's IDs, then the assistant's
    role ID (the generation prompt); a text completion's prompt is its characters."""
    if "messages" not in request:
        return _text_ids(str(request.get("prompt", "")))
    ids: list[int] = []
    for message in request["messages"]:
        ids.append(ROLE_IDS.get(message.get("role"), 7))
        content = message.get("content")
        ids += _text_ids(content if isinstance(content, str) else json.dumps(content))
    return [*ids, ROLE_IDS["assistant"]]


def token_piece(token_id: int) -> str:
    """What the fake's /detokenize says one ID is."""
    roles = {v: k for k, v in ROLE_IDS.items()}
    if token_id in roles:
        return f"<|{roles[token_id]}|>"
    if token_id >= CHAR_BASE:
        return chr(token_id - CHAR_BASE)
    return f"t{token_id}" if token_id >= 100 else f"<{token_id}>"


def fake_logprob(token_id: int) -> float:
    return -round((token_id % 13) * 0.4, 3)


@dataclass
class Sample:
    """One captured request/response pair of the real vLLM."""

    name: str
    method: str
    path: str
    request: bytes
    status: int
    content_type: str
    response: bytes


def load_sample(name: str) -> Sample:
    text = (SAMPLES / f"{name}.txt").read_bytes()
    head, _, rest = text.partition(b"\n")
    _, _, method, path = head.decode().split(" ", 3)
    request, _, response_part = rest.partition(b"### RESPONSE ")
    status_line, _, response = response_part.partition(b"\n")
    status, _, tail = status_line.decode().partition(" content-type: ")
    content_type = tail.rsplit(" (", 1)[0]
    return Sample(name, method, path, request.rstrip(b"\n"), int(status), content_type, response)


async def read_body(receive: Any) -> bytes:
    """A request's whole body, as an ASGI app receives it."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


def sample_names() -> list[str]:
    return sorted(p.stem for p in SAMPLES.glob("[0-9]*.txt"))


def sse_events(body: bytes) -> list[bytes]:
    """Split an SSE body into its events, each with its terminating blank line."""
    return [part + b"\n\n" for part in body.split(b"\n\n") if part.strip()]


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class FakeUpstream:
    """The ASGI app, plus what it saw."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    cancelled: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    hanging: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    gate: threading.Event = field(default_factory=threading.Event)
    # what the streamed completions handed to the server so far, and whether one was handed whole
    streamed_bytes: int = 0
    weight_version: str = "default"
    control: list[str] = field(default_factory=list)
    dev_mode: bool = True  # False: the control plane answers 404, as vLLM without VLLM_SERVER_DEV_MODE
    stream_finished: threading.Event = field(default_factory=threading.Event)
    aborted: bool = False  # a /pause?mode=abort came: gated streams end aborted
    abort_ending: str = "chunk"  # ... how: "chunk", "unfinished" or "cut" (see the module docstring)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        body = await read_body(receive)
        headers = {k.decode(): v.decode("latin-1") for k, v in scope["headers"]}
        self.requests.append({"path": scope["path"], "headers": headers, "body": body})
        mode = headers.get("x-fake", "")
        if mode == "gate":
            self.hanging.release()
            await asyncio.get_running_loop().run_in_executor(None, self.gate.wait, 60)
        if mode.startswith("sample:"):
            await self._replay(send, load_sample(mode[len("sample:") :]))
        elif mode == "hang":
            await self._hang(receive)
        elif mode.startswith("status:"):
            code = int(mode.split(":", 1)[1])
            error = {"error": {"message": "fake failure", "type": "Fake", "param": None, "code": code}}
            await _respond(send, code, b"application/json", _dump(error))
        elif mode == "garbage":
            await _respond(send, 200, b"application/json", b"\x00\xffnot json at all")
        elif mode == "redirect":
            await send(
                {
                    "type": "http.response.start",
                    "status": 307,
                    "headers": [(b"location", b"http://127.0.0.2:9/v1/chat/completions")],
                }
            )
            await send({"type": "http.response.body", "body": b""})
        elif scope["path"] in ("/weight_info", "/update_weight_version", "/pause", "/resume"):
            await self._control(scope, body, send)
        elif scope["path"] == "/detokenize":
            (token_id,) = json.loads(body)["tokens"]
            await _respond(send, 200, b"application/json", _dump({"prompt": token_piece(token_id)}))
        elif scope["path"] in ("/v1/chat/completions", "/v1/completions"):
            await self._complete(scope["path"], body, mode, send, receive)
        else:
            echo = {
                "method": scope["method"],
                "path": scope["path"],
                "query": scope["query_string"].decode(),
                "headers": headers,
                "body": body.decode("latin-1"),
            }
            await _respond(send, 200, b"application/json", _dump(echo))

    async def _control(self, scope: dict[str, Any], body: bytes, send: Any) -> None:
        query = scope["query_string"].decode()
        self.control.append(scope["path"] + ("?" + query if query else ""))
        if not self.dev_mode:
            await _respond(send, 404, b"application/json", _dump({"detail": "Not Found"}))
            return
        answer: dict[str, Any]
        if scope["path"] == "/weight_info":
            answer = {"weight_version": self.weight_version}
        elif scope["path"] == "/update_weight_version":
            self.weight_version = json.loads(body)["new_version"]
            answer = {"success": True, "new_version": self.weight_version}
        else:
            answer = {"status": "paused" if scope["path"] == "/pause" else "resumed"}
            if scope["path"] == "/pause" and "mode=abort" in query:
                self.aborted = True
                self.gate.set()
        await _respond(send, 200, b"application/json", _dump(answer))

    async def _end_aborted(self, send: Any, base: dict[str, Any], n: int) -> None:
        """What vLLM sends when a pause aborts a running stream (``abort_ending``)."""
        if self.abort_ending == "cut":
            return  # uvicorn closes the connection: the response never completes
        if self.abort_ending == "chunk":
            choices = [
                {"index": c, "delta": {}, "logprobs": None, "finish_reason": "abort"} for c in range(n)
            ]
            await _event(send, dict(base, choices=choices))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def _hang(self, receive: Any) -> None:
        self.hanging.release()
        while (await receive())["type"] != "http.disconnect":
            pass
        self.cancelled.release()

    async def _replay(self, send: Any, sample: Sample) -> None:
        headers = [(b"content-type", sample.content_type.encode())]
        if sample.content_type.startswith("text/event-stream"):
            await send({"type": "http.response.start", "status": sample.status, "headers": headers})
            for event in sse_events(sample.response):
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            await _respond(send, sample.status, sample.content_type.encode(), sample.response)

    async def _complete(self, path: str, body: bytes, mode: str, plain_send: Any, receive: Any) -> None:
        async def send(message: dict[str, Any]) -> None:
            # uvicorn's send waits while the proxy does not read (flow control), so this counts what
            # the proxy has been able to take, not what this app would like to send
            await plain_send(message)
            self.streamed_bytes += len(message.get("body", b""))

        try:
            request = json.loads(body)
            count = int(request.get("max_tokens") or 4)
            n = int(request.get("n") or 1)
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError):  # like vLLM: a 400, never a 500
            error = {
                "error": {"message": "invalid request", "type": "BadRequestError", "param": None, "code": 400}
            }
            await _respond(send, 400, b"application/json", _dump(error))
            return
        count, n = max(0, min(count, 64)), max(1, min(n, 4))
        chat = path == "/v1/chat/completions"
        ids = bool(request.get("return_token_ids"))
        prompt_ids = render_prompt(request) if mode == "render" else PROMPT_IDS
        with_logprobs = mode == "render" and chat and bool(request.get("logprobs"))
        usage = {
            "prompt_tokens": len(prompt_ids),
            "total_tokens": len(prompt_ids) + count * n,
            "completion_tokens": count * n,
        }
        tokens = [[100 + i * 7 + c for i in range(count)] for c in range(n)]
        # "big:N": pad every token's text so that the answer carries about N bytes in all.
        pad = "x" * (int(mode[4:]) // max(1, count * n)) if mode.startswith("big:") else ""
        if not request.get("stream"):
            choices = []
            for c in range(n):
                text = "".join(f"t{t}{pad}" for t in tokens[c])
                choice: dict[str, Any] = {"index": c}
                if chat:
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = text
                logprobs = None
                if with_logprobs:
                    logprobs = {"content": [_logprob_entry(t) for t in tokens[c]]}
                choice.update(
                    {
                        "logprobs": logprobs,
                        "finish_reason": "length",
                        "stop_reason": None,
                        "token_ids": tokens[c] if ids else None,
                    }
                )
                if not chat:
                    choice["prompt_token_ids"] = prompt_ids if ids else None
                choices.append(choice)
            response = {
                "id": "fake-1",
                "object": "chat.completion",
                "created": 1,
                "model": "tiny",
                "choices": choices,
                "usage": usage,
            }
            if chat:
                response["prompt_token_ids"] = prompt_ids if ids else None
            await _respond(send, 200, b"application/json", _dump(response))
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
            }
        )
        base = {"id": "fake-2", "object": "chat.completion.chunk", "created": 1, "model": "tiny"}
        first = dict(
            base,
            choices=[
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            prompt_token_ids=prompt_ids if ids else None,
        )
        await _event(send, first)
        if mode == "hang-stream":
            await self._hang(receive)
            return
        for i in range(count):
            if mode == "gate-stream" and i == 2:
                self.hanging.release()
                await asyncio.get_running_loop().run_in_executor(None, self.gate.wait, 60)
                if self.aborted:
                    await self._end_aborted(send, base, n)
                    return
            for c in range(n):
                last = i == count - 1
                chunk = dict(
                    base,
                    choices=[
                        {
                            "index": c,
                            "delta": {"content": f"t{tokens[c][i]}{pad}"},
                            "logprobs": {"content": [_logprob_entry(tokens[c][i])]}
                            if with_logprobs
                            else None,
                            "finish_reason": "length" if last else None,
                            "token_ids": [tokens[c][i]] if ids else None,
                        }
                    ],
                )
                await _event(send, chunk)
            if mode == "die-mid-stream" and i == 1:
                return  # uvicorn closes the connection: the response never completes
            if mode == "error-event" and i == 1:  # as vLLM's create_streaming_error_response
                error = {"object": "error", "message": "fake error mid-stream", "type": "Fake", "code": 500}
                await _event(send, {"error": error})
                break
        options = request.get("stream_options") or {}
        if options.get("include_usage"):
            await _event(send, dict(base, choices=[], usage=usage))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        self.stream_finished.set()


def _logprob_entry(token_id: int) -> dict[str, Any]:
    piece = token_piece(token_id)
    return {
        "token": piece,
        "logprob": fake_logprob(token_id),
        "bytes": list(piece.encode()),
        "top_logprobs": [],
    }


async def _event(send: Any, obj: dict[str, Any]) -> None:
    await send({"type": "http.response.body", "body": b"data: " + _dump(obj) + b"\n\n", "more_body": True})
    await asyncio.sleep(0)


async def _respond(send: Any, status: int, content_type: bytes, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type)],
        }
    )
    await send({"type": "http.response.body", "body": body})


app = FakeUpstream()  # `uvicorn tests.fake_upstream:app`: the stand-in vLLM of the container check
