"""Pure functions and small state machines that read vLLM's wire format; no I/O.

Three jobs, all on bytes the relay already has in hand:

* ``prepare_request``: remember what the client asked for and set ``return_token_ids: true``.
* ``ResponseCapture``: collect prompt/generated token IDs, logprobs, finish reasons, usage and the
  assembled message from a JSON body or from SSE events, then judge the record's integrity.
* ``StreamTap``: split a raw SSE byte stream into events (TCP reads split events anywhere) and, when
  the client did not ask for token IDs, give back exactly what vLLM would have sent without the flag.

Restoring the flag-less response works on bytes, not by re-serialising: vLLM writes
``"token_ids":[...]`` / ``"prompt_token_ids":[...]`` where it would write ``null`` without the flag, and
streams a chunk with an empty delta only because the flag asked for that token's ID
(``chat_completion/serving.py``: ``delta_message is None`` -> ``continue`` unless return_token_ids).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tokentrail.proxy import jsonio
from tokentrail.proxy.recording.records import (
    CallRecord,
    ChoiceRecord,
    Integrity,
    Outcome,
    ended_by_vllm_abort,
)

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
RECORDED_ROUTES = frozenset({CHAT_ROUTE, COMPLETIONS_ROUTE})
# The fields of a chat request besides its messages that change what the chat template renders:
# calls that differ in one are not one conversation (trajectory/continuation.py), nor one certificate.
RENDER_FIELDS = ("tools", "chat_template", "chat_template_kwargs", "documents", "add_special_tokens")

# A key can only stand right after "{" or "," outside a JSON string: inside one every '"' is escaped.
_TOKEN_IDS_ARRAY = re.compile(rb'([{,]\s*"(?:prompt_)?token_ids"\s*:\s*)\[[^\]]*\]')
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_SECRET_KEYS = frozenset({"api_key", "apikey", "authorization"})
# A chat answer's prompt IDs: in JSON text an unescaped quote cannot be inside a string, so this is
# the key wherever it is found. Events shorter than _LONG_EVENT are parsed whole (it costs nothing).
_PROMPT_IDS_KEY = b'"prompt_token_ids":['
_LONG_EVENT = 4096


@dataclass(frozen=True, slots=True)
class ClientAsk:
    """What the client asked vLLM for, before the proxy touched the request."""

    token_ids: bool = False
    logprobs: bool = False
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    flag_added: bool = False  # the proxy sent return_token_ids: true on the client's behalf


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """The body to send upstream and what to remember about the client's own request."""

    body: bytes
    ask: ClientAsk
    request: dict[str, Any] | None
    model: str | None


def prepare_request(route: str, body: bytes) -> PreparedRequest:
    """Parse a completion request and ask vLLM for token IDs unless that would change its answer.

    A body that is not a JSON object goes upstream unchanged, so the client gets vLLM's own error.
    ``echo`` is left alone: vLLM echoes an empty prompt text when ``return_token_ids`` is set.
    """
    try:
        parsed = jsonio.loads(body)
    except (ValueError, UnicodeDecodeError):
        return PreparedRequest(body, ClientAsk(), None, None)
    if not isinstance(parsed, dict):
        return PreparedRequest(body, ClientAsk(), None, None)
    stream_options = parsed.get("stream_options")
    include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
    logprobs = parsed.get("logprobs")
    asked_logprobs = bool(logprobs) if route == CHAT_ROUTE else logprobs is not None
    n = parsed.get("n")
    asked_ids = parsed.get("return_token_ids") is True
    add_flag = not asked_ids and not parsed.get("echo")
    ask = ClientAsk(
        token_ids=asked_ids,
        logprobs=asked_logprobs,
        stream=parsed.get("stream") is True,
        include_usage=include_usage,
        n=n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1,
        flag_added=add_flag,
    )
    stored = {k: v for k, v in parsed.items() if k.lower() not in _SECRET_KEYS}
    model = parsed.get("model")
    if add_flag:
        body = _with_token_ids_flag(body, parsed)
    return PreparedRequest(body, ask, stored, model if isinstance(model, str) else None)


def _with_token_ids_flag(body: bytes, parsed: dict[str, Any]) -> bytes:
    """The body with ``"return_token_ids":true``, keeping the client's bytes where possible.

    When the key is absent the flag goes in right after the opening brace (no re-serialisation of a
    possibly large request); when the client set it to something else, the body is rewritten, since a
    duplicate key's meaning depends on the parser.
    """
    if "return_token_ids" not in parsed:
        start = body.find(b"{")
        return (
            body[: start + 1]
            + (b'"return_token_ids":true,' if parsed else b'"return_token_ids":true')
            + body[start + 1 :]
        )
    parsed = {**parsed, "return_token_ids": True}
    return jsonio.dumps_text(parsed).encode()


def strip_token_ids(payload: bytes) -> bytes:
    """Turn every ``"token_ids":[...]``/``"prompt_token_ids":[...]`` into ``null``, as without the flag.

    The regex runs only from the byte before each ``token_ids"`` that ``bytes.find`` locates: a
    scan of the whole payload by the regex engine tried a match at every ``{`` and ``,`` and was a
    measurable part of the relay's time on large responses.
    """
    pieces: list[bytes] = []
    done = 0
    search = 0
    while True:
        found = payload.find(b'token_ids"', search)
        if found < 0:
            break
        search = found + 10
        start = found - 1 if payload[found - 1 : found] == b'"' else found - 8  # '"' or '"prompt_'
        compact = (  # vLLM's own form, ,"token_ids":[ with no spaces: no regex needed
            payload[start : start + 1] == b'"'
            and payload[start - 1 : start] in (b",", b"{")
            and payload[found + 10 : found + 12] == b":["
        )
        end = payload.find(b"]", found + 12) if compact else -1
        if end >= 0:
            pieces.append(payload[done : found + 11])
            pieces.append(b"null")
            done = search = end + 1
            continue
        key_start = _last_non_space(payload, start - 1)
        if key_start < done:
            continue
        match = _TOKEN_IDS_ARRAY.match(payload, key_start)
        if match is None:
            continue
        pieces.append(payload[done : match.end(1)])
        pieces.append(b"null")
        done = search = match.end()
    if not pieces:
        return payload
    pieces.append(payload[done:])
    return b"".join(pieces)


def _last_non_space(payload: bytes, index: int) -> int:
    """The index of the last non-whitespace byte at or before ``index`` (-1 when none)."""
    while index >= 0 and payload[index] in b" \t\r\n":
        index -= 1
    return index


def _completion_logprob_entries(logprobs: dict[str, Any]) -> list[Any]:
    """Completions give parallel arrays; store one entry per token like chat does."""
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    entries: list[Any] = []
    for i, token in enumerate(tokens):
        entry: dict[str, Any] = {"token": token, "logprob": values[i] if i < len(values) else None}
        if i < len(tops):
            entry["top_logprobs"] = tops[i]
        entries.append(entry)
    return entries


class ResponseCapture:
    """Collects one call's token IDs and message from vLLM's response into a ``CallRecord``."""

    def __init__(self, record: CallRecord, ask: ClientAsk, chat: bool) -> None:
        self.record = record
        self.ask = ask
        self.chat = chat
        self.usage_seen = False
        self._choices: dict[int, ChoiceRecord] = {}
        self._completion_prompts: dict[int, list[int]] = {}

    def _choice(self, index: int) -> ChoiceRecord:
        choice = self._choices.get(index)
        if choice is None:
            choice = ChoiceRecord(index=index, message={"role": "assistant"} if self.chat else {})
            self._choices[index] = choice
        return choice

    def _take_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.usage_seen = True
            self.record.prompt_tokens = usage.get("prompt_tokens")
            self.record.completion_tokens = usage.get("completion_tokens")
            self.record.total_tokens = usage.get("total_tokens")

    def _take_common(self, obj: dict[str, Any]) -> None:
        record = self.record
        if record.response_id is None and isinstance(obj.get("id"), str):
            record.response_id = obj["id"]
        model = obj.get("model")
        if isinstance(model, str):
            record.model = model
        prompt_ids = obj.get("prompt_token_ids")
        if isinstance(prompt_ids, list) and record.prompt_token_ids is None:
            record.prompt_token_ids = prompt_ids
        usage = obj.get("usage")
        if usage is not None:
            self._take_usage(usage)
        error = obj.get("error")
        if isinstance(error, dict) and "choices" not in obj:
            record.error = str(error.get("message", error))[:2000]

    def _take_logprobs(self, choice: ChoiceRecord, logprobs: Any) -> None:
        if not isinstance(logprobs, dict):
            return
        entries = logprobs.get("content") if self.chat else _completion_logprob_entries(logprobs)
        if isinstance(entries, list):
            if choice.logprobs is None:
                choice.logprobs = []
            choice.logprobs.extend(entries)

    def _take_choice_end(self, choice: ChoiceRecord, raw: dict[str, Any]) -> None:
        finish_reason = raw.get("finish_reason")
        if finish_reason is not None:
            choice.finish_reason = finish_reason
            choice.stop_reason = raw.get("stop_reason")
        if not self.chat:
            prompt_ids = raw.get("prompt_token_ids")
            if isinstance(prompt_ids, list):
                self._completion_prompts.setdefault(choice.index, prompt_ids)

    def _take_choice(self, raw: Any) -> ChoiceRecord | None:
        """What whole responses and stream chunks share: the IDs, logprobs and finish of one choice
        (None for an entry that is not a choice)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("index"), int):
            return None
        choice = self._choice(raw["index"])
        ids = raw.get("token_ids")
        if isinstance(ids, list):
            choice.token_ids.extend(ids)
        logprobs = raw.get("logprobs")
        if logprobs is not None:
            self._take_logprobs(choice, logprobs)
        self._take_choice_end(choice, raw)
        return choice

    def feed_body(self, body: bytes) -> None:
        """Read a whole (non-streaming) JSON response."""
        try:
            obj = self.parse(body)
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(obj, dict):
            return
        self._take_common(obj)
        for raw in obj.get("choices") or ():
            choice = self._take_choice(raw)
            if choice is None:
                continue
            if not self.chat:
                choice.message = {"text": raw.get("text")}
            elif isinstance(raw.get("message"), dict):
                choice.message = _normalise_message(raw["message"])

    def parse(self, data: bytes) -> Any:
        """``data`` parsed, except a chat answer's long ``prompt_token_ids`` array: that is kept as
        text in the record (``CallRecord.load_prompt_ids``) and parsed off the event loop."""
        if len(data) < _LONG_EVENT or not self.chat:
            return jsonio.loads(data)
        start = data.find(_PROMPT_IDS_KEY)
        end = data.find(b"]", start) if start >= 0 else -1
        if end < 0:
            return jsonio.loads(data)
        start += len(_PROMPT_IDS_KEY) - 1  # at the "["
        obj = jsonio.loads(data[:start] + b"null" + data[end + 1 :])
        record = self.record
        if record.prompt_token_ids is None and record.prompt_ids_text is None:
            record.prompt_ids_text = data[start : end + 1]
        return obj

    def feed_event(self, obj: dict[str, Any]) -> None:
        """Read one parsed SSE chunk (a loop, not a shared generator: this runs for every token)."""
        self._take_common(obj)
        for raw in obj.get("choices") or ():
            choice = self._take_choice(raw)
            if choice is None:
                continue
            if not self.chat:
                text = raw.get("text")
                if isinstance(text, str):
                    choice.message["text"] = choice.message.get("text", "") + text
            else:
                delta = raw.get("delta")
                if isinstance(delta, dict) and delta:
                    _merge_delta(choice.message, delta)

    def generated_so_far(self) -> int:
        """Tokens generated so far (the longest choice): where a policy version change falls."""
        return max((len(c.token_ids) for c in self._choices.values()), default=0)

    def finish(self, completed: bool) -> None:
        """Put the choices on the record and judge its integrity (only for a finished call)."""
        record = self.record
        record.choices = [self._choices[i] for i in sorted(self._choices)]
        if not self.chat and self._completion_prompts:
            first = min(self._completion_prompts)
            if record.prompt_token_ids is None:
                record.prompt_token_ids = self._completion_prompts[first]
            if len(self._completion_prompts) > 1:
                for choice in record.choices:
                    prompt = self._completion_prompts.get(choice.index)
                    if prompt is not None:
                        choice.message["prompt_token_ids"] = prompt
        record.integrity = self._judge() if completed else Integrity.NOT_CHECKED

    def _judge(self) -> str:
        if not self.ask.token_ids and not self.ask.flag_added:
            return Integrity.NO_TOKEN_IDS
        record = self.record
        found: list[str] = []
        if not self.usage_seen:
            found.append(Integrity.NO_USAGE)
        elif self.chat and record.prompt_ids_text is not None and record.prompt_token_ids is None:
            record.prompt_count_unchecked = True  # judged when they are parsed (CallRecord.load_prompt_ids)
        elif self._prompt_count() != record.prompt_tokens:
            found.append(Integrity.PROMPT_IDS_MISMATCH)
        if self.usage_seen:
            generated = sum(len(c.token_ids) for c in record.choices)
            if generated != record.completion_tokens:
                found.append(Integrity.COMPLETION_IDS_MISMATCH)
        if self.ask.logprobs and any(
            c.logprobs is None or len(c.logprobs) != len(c.token_ids) for c in record.choices
        ):
            found.append(Integrity.LOGPROBS_MISMATCH)
        return ",".join(found) if found else Integrity.OK

    def _prompt_count(self) -> int | None:
        if self.chat or not self._completion_prompts:
            ids = self.record.prompt_token_ids
            return None if ids is None else len(ids)
        # Completions: one prompt per group of n choices (a list of prompts gives several groups).
        n = self.ask.n
        return sum(len(ids) for index, ids in self._completion_prompts.items() if index % n == 0)


def _normalise_message(message: dict[str, Any]) -> dict[str, Any]:
    """Keep the parts of an assistant message a trainer needs, in the same shape streams give."""
    kept: dict[str, Any] = {"role": message.get("role") or "assistant"}
    kept["content"] = message.get("content")
    reasoning = message.get("reasoning") or message.get("reasoning_content")
    if reasoning:
        kept["reasoning"] = reasoning
    if message.get("tool_calls"):
        kept["tool_calls"] = message["tool_calls"]
    return kept


def _merge_delta(message: dict[str, Any], delta: dict[str, Any]) -> None:
    """Fold one streamed delta into the assembled message (content, reasoning, tool calls)."""
    content = delta.get("content")
    if len(delta) == 1 and isinstance(content, str):  # most tokens: a piece of text, nothing else
        message["content"] = (message.get("content") or "") + content
        return
    if isinstance(delta.get("role"), str):
        message["role"] = delta["role"]
    if isinstance(content, str):
        message["content"] = (message.get("content") or "") + content
    else:
        message.setdefault("content", None)
    reasoning = delta.get("reasoning")
    if not isinstance(reasoning, str):
        reasoning = delta.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        message["reasoning"] = message.get("reasoning", "") + reasoning
    tool_deltas = delta.get("tool_calls")
    if isinstance(tool_deltas, list):
        calls: list[dict[str, Any]] = message.setdefault("tool_calls", [])
        for tool_delta in tool_deltas:
            if isinstance(tool_delta, dict):
                _merge_tool_call(calls, tool_delta)


def _merge_tool_call(calls: list[dict[str, Any]], tool_delta: dict[str, Any]) -> None:
    position = tool_delta.get("index")
    if not isinstance(position, int):
        position = len(calls)
    while len(calls) <= position:
        calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
    call = calls[position]
    if tool_delta.get("id"):
        call["id"] = tool_delta["id"]
    if tool_delta.get("type"):
        call["type"] = tool_delta["type"]
    function = tool_delta.get("function")
    if isinstance(function, dict):
        if isinstance(function.get("name"), str):
            call["function"]["name"] += function["name"]
        if isinstance(function.get("arguments"), str):
            call["function"]["arguments"] += function["arguments"]


def _blank_line(buffer: bytes, start: int) -> int:
    """Where the first ``\\n\\n`` at or after ``start`` begins, or -1. ``bytes.find`` of a two-byte
    needle scans about 1 ns a byte, of one byte memchr: 80x faster on the 90 KB event that carries
    15,000 prompt IDs (measured 75 vs 0.9 us), which was searched again at every read."""
    while True:
        newline = buffer.find(b"\n", start)
        if newline < 0 or newline + 1 >= len(buffer):
            return -1
        if buffer[newline + 1] == 0x0A:
            return newline
        start = newline + 1


def _event_data(event: bytes) -> bytes | None:
    """The joined ``data:`` lines of one SSE event, or None when it has none."""
    if event.startswith(b"data: ") and event.find(b"\n") == len(event) - 2 and b"\r" not in event:
        return event[6:-2]  # vLLM's form: one data line ending in a blank line
    parts = [
        line[5:].removeprefix(b" ")
        for line in event.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        if line.startswith(b"data:")
    ]
    return b"\n".join(parts) if parts else None


def _is_flag_only_chunk(obj: dict[str, Any]) -> bool:
    """A chat chunk vLLM sends only because return_token_ids was set (see module docstring)."""
    choices = obj.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return False
    choice = choices[0]
    return (
        choice.get("delta") == {}
        and choice.get("finish_reason") is None
        and choice.get("logprobs") is None
        and isinstance(choice.get("token_ids"), list)
    )


class StreamTap:
    """Feeds an SSE byte stream to a ``ResponseCapture`` and says what the client should receive.

    With ``strip`` false the client gets every upstream read unchanged and at once. With ``strip``
    true (the proxy added the flag) it gets complete events with the token-ID fields restored to
    ``null`` and without the chunks the flag alone caused.

    Without a capture (``capture`` None: the recorder process reads the answer, ``answer_bytes``)
    the reads are only kept, and an event is parsed only to tell a chunk the flag alone caused,
    which has an empty delta: an event without ``{}`` in it cannot be one.
    """

    def __init__(self, capture: ResponseCapture | None, strip: bool, *, chat: bool = True) -> None:
        self.capture = capture
        self.strip = strip
        self.chat = chat
        self._buffer = b""
        self._scanned = 0  # how far into the buffer no blank line can start
        self._reads: list[bytes] | None = [] if capture is None else None

    def answer_bytes(self) -> bytes:
        """Every byte vLLM sent so far, as it came (without a capture)."""
        return b"".join(self._reads or ())

    def feed(self, chunk: bytes) -> bytes:
        """Take one upstream read; return the bytes to send to the client now (maybe empty)."""
        if self._reads is not None:
            self._reads.append(chunk)
            if not self.strip:
                return chunk
        blank = _blank_line(chunk, 0)
        if blank >= 0 and blank == len(chunk) - 2 and not self._buffer and b"\r" not in chunk:
            # The usual read under streaming: exactly one whole event.
            keep = self._take_event(chunk)
            if not self.strip:
                return chunk
            return strip_token_ids(chunk) if keep else b""
        # Reads usually end at an event boundary: then the read itself is parsed, never copied.
        buffer = self._buffer + chunk if self._buffer else chunk
        out: list[bytes] = []
        start = 0
        plain_newlines = b"\r" not in buffer  # then an event ends at the first blank line: find it
        while True:
            if plain_newlines:
                blank = _blank_line(buffer, max(start, self._scanned))
                if blank < 0:
                    break
                end = blank + 2
            else:
                match = _EVENT_END.search(buffer, start)
                if match is None:
                    break
                end = match.end()
            event = buffer[start:end]
            start = end
            keep = self._take_event(event)
            if self.strip and keep:
                out.append(strip_token_ids(event))
        self._buffer = buffer[start:]
        # what is kept holds no blank line (but may end in half of one): the next read resumes there
        self._scanned = max(0, len(self._buffer) - 1)
        if not self.strip:
            return chunk
        return b"".join(out)

    def close(self) -> bytes:
        """The stream ended: whatever is left (an unterminated event) goes out as it came."""
        rest, self._buffer = self._buffer, b""
        if rest.strip():
            self._take_event(rest)
        return rest if self.strip else b""

    def _take_event(self, event: bytes) -> bool:
        """Parse one event into the capture; return False when the client must not see it."""
        data = _event_data(event)
        if data is None:
            return True
        if not data.startswith(b"{") and data.strip() == b"[DONE]":
            return True
        capture = self.capture
        if capture is None:  # (only with strip) parsed only when it can be a flag-only chunk
            return not (self.chat and b"{}" in data and _parses_to_flag_only_chunk(data))
        try:
            obj = capture.parse(data)
        except (ValueError, UnicodeDecodeError):
            return True
        if not isinstance(obj, dict):
            return True
        capture.feed_event(obj)
        return not (self.strip and capture.chat and _is_flag_only_chunk(obj))


def _parses_to_flag_only_chunk(data: bytes) -> bool:
    try:
        obj = jsonio.loads(data)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(obj, dict) and _is_flag_only_chunk(obj)


class RawAnswer:
    """vLLM's answer to a call as the relay passed it on without reading it (``CallRecord.answer``):
    the recorder process reads it (``read_raw_answer``). A plain class, not a dataclass: orjson would
    render a dataclass itself, bytes and all, where the recorder's frames put the bytes apart."""

    __slots__ = ("ask", "chat", "data", "stream")

    def __init__(self, data: bytes, stream: bool, chat: bool, ask: ClientAsk) -> None:
        self.data = data  # the JSON body, or the stream's bytes as they came
        self.stream = stream
        self.chat = chat
        self.ask = ask


def read_raw_answer(record: CallRecord) -> None:
    """Read ``record.answer`` into the record and finish it as the relay finishes a call it read:
    choices, usage, an error event making an ``ok`` call ``upstream_error``, the integrity; and, the
    RL loop's rule (``rl/loop.py``), a choice vLLM ended with ``abort`` makes the call ``aborted``."""
    answer = record.answer
    if answer is None:
        return
    record.answer = None
    relays_error = record.error  # how the relay saw the call end (a broken stream) outranks an event's
    capture = ResponseCapture(record, answer.ask, chat=answer.chat)
    if answer.stream:
        tap = StreamTap(capture, strip=False)
        tap.feed(answer.data)
        tap.close()
        if record.error is not None and record.outcome == Outcome.OK:
            record.outcome = Outcome.UPSTREAM_ERROR
    else:
        capture.feed_body(answer.data)
    if relays_error is not None:
        record.error = relays_error
    capture.finish(record.outcome == Outcome.OK)
    if ended_by_vllm_abort(record):
        record.outcome = Outcome.ABORTED
