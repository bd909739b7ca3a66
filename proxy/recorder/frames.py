"""What relays and the recorder say to each other over the recorder's Unix socket.

A frame is a 4-byte big-endian length, one byte of kind, then the payload. Binary framing, not JSON
lines: a record's payload is up to megabytes of JSON (15,000 prompt IDs, logprobs), and finding a
length is free where finding a newline is a scan of every byte.

From a relay:

* ``A`` a call arrived: ``call_id<TAB>trajectory_id`` (named trajectories only). The recorder numbers
  a trajectory's calls in the order these reach it: the host's arrival order, whichever worker took
  each call.
* ``R`` a call's record (JSON, below); ``E`` the same, sent again after the recorder restarted or
  from the relay's spool: it may be written already, and the recorder writes it only if it is not.
* ``S`` an arrived call whose record will not come here (the relay spooled it): ``call_id``.
* ``W`` a record whose answer the relay did not read (``capture.RawAnswer``): a 4-byte length, the
  record's JSON, then vLLM's answer as it came; the recorder reads it. ``X`` the same, sent again.

From the recorder:

* ``K`` acknowledgements: ``call_id<TAB>1<TAB>integrity`` once the record is committed or kept in
  the recorder's spool (safe either way), ``call_id<TAB>0<TAB>integrity`` when it could not be kept;
  several per frame, one per line. The integrity is the record's as judged, for the relay's figures.

A record's JSON is ``orjson``'s rendering of the ``CallRecord`` dataclass in C, with the prompt IDs
vLLM sent embedded as the bytes they came in (``orjson.Fragment``): the relay never parses them.
"""

from __future__ import annotations

import struct
from typing import Any

import orjson

from tokentrail.proxy import jsonio
from tokentrail.proxy.recording.capture import ClientAsk, RawAnswer, read_raw_answer
from tokentrail.proxy.recording.records import CallRecord
from tokentrail.proxy.recording.spool import record_from_row, record_to_line

ARRIVED = b"A"
SKIPPED = b"S"
RECORD = b"R"
RECORD_AGAIN = b"E"
RAW_RECORD = b"W"
RAW_RECORD_AGAIN = b"X"
ACKS = b"K"
RECORD_KINDS = {RECORD: (False, False), RECORD_AGAIN: (False, True), RAW_RECORD: (True, False)}
RECORD_KINDS[RAW_RECORD_AGAIN] = (True, True)  # kind -> (raw, again)

_HEAD = struct.Struct(">IB")
_JSON_LENGTH = struct.Struct(">I")
HEAD_BYTES = _HEAD.size
MAX_FRAME = 1 << 30  # a record is at most the request body limit plus its answer


Pieces = tuple[bytes, ...]
"""A payload as the pieces it is made of: written with ``writelines``, never joined into a copy."""


def frame(kind: bytes, *pieces: bytes) -> Pieces:
    """A frame as the pieces to write: its head, then ``pieces`` as they are (a record of an agent's
    call is 150 KB: joining it would copy it once more per call on the relay's event loop)."""
    return (_HEAD.pack(sum(map(len, pieces)) + 1, kind[0]), *pieces)


class FrameReader:
    """Cuts the frames out of a byte stream that TCP-like reads split anywhere."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """(kind, payload) of every frame completed by ``data``; ``ValueError`` for a frame too large."""
        buffer = self._buffer
        buffer += data
        frames: list[tuple[bytes, bytes]] = []
        start = 0
        while len(buffer) - start >= HEAD_BYTES:
            length, kind = _HEAD.unpack_from(buffer, start)
            if length > MAX_FRAME or length < 1:
                raise ValueError(f"a frame of {length} bytes")
            end = start + 4 + length
            if len(buffer) < end:
                break
            with memoryview(buffer) as view:  # one copy out of the buffer, not two
                frames.append((bytes((kind,)), bytes(view[start + HEAD_BYTES : end])))
            start = end
        if start:
            del buffer[:start]
        return frames


def record_kind(raw: bool, again: bool) -> bytes:
    return (RAW_RECORD_AGAIN if again else RAW_RECORD) if raw else (RECORD_AGAIN if again else RECORD)


def _default(value: Any) -> Any:
    if isinstance(value, bytes):  # the prompt IDs' JSON text: embedded as it came
        return orjson.Fragment(value)
    if isinstance(value, RawAnswer):  # its bytes follow the JSON
        return {"stream": value.stream, "chat": value.chat, "ask": value.ask}
    if callable(value):  # on_stored: the relay's own
        return None
    raise TypeError


def encode_record(record: CallRecord) -> tuple[bool, Pieces]:
    """(whether the answer is raw, the payload's pieces): the record's JSON, made in C, and the raw
    answer after it. What orjson refuses (an integer past 64 bits in the request) goes the spool's
    way (the standard library, the answer read first)."""
    try:
        text = orjson.dumps(record, default=_default)
    except TypeError:
        return False, (record_to_line(record, "").encode(),)
    answer = record.answer
    if answer is None:
        return False, (text,)
    return True, (_JSON_LENGTH.pack(len(text)), text, answer.data)


def decode_record(payload: bytes | str, *, raw: bool = False) -> CallRecord:
    """The record of a payload (``raw``: of a ``W``/``X`` frame, its answer read) or of a spool line;
    ``ValueError``/``TypeError``/``KeyError`` when it is not one."""
    answer = None
    if raw:
        data = payload.encode() if isinstance(payload, str) else payload
        (length,) = _JSON_LENGTH.unpack_from(data)
        payload, answer = data[4 : 4 + length], data[4 + length :]
    row = jsonio.loads(payload)
    if not isinstance(row, dict):
        raise ValueError("a record is a JSON object")
    record = record_from_row(row)
    ids = row.get("prompt_ids_text")
    if isinstance(ids, list) and record.prompt_token_ids is None:
        record.prompt_token_ids = ids  # counted against usage by load_prompt_ids (prompt_count_unchecked)
    how = row.get("answer")
    if answer is not None and isinstance(how, dict):
        ask = ClientAsk(**how["ask"])
        record.answer = RawAnswer(answer, bool(how["stream"]), bool(how["chat"]), ask)
        read_raw_answer(record)
    return record


def encode_acks(acks: list[tuple[str, bool, str]]) -> Pieces:
    lines = "\n".join(f"{call_id}\t{int(ok)}\t{integrity}" for call_id, ok, integrity in acks)
    return frame(ACKS, lines.encode())


def decode_acks(payload: bytes) -> list[tuple[str, bool, str]]:
    acks = []
    for line in payload.decode().split("\n"):
        call_id, ok, integrity = line.split("\t")
        acks.append((call_id, ok == "1", integrity))
    return acks
