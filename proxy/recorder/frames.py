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

From the recorder:

* ``K`` acknowledgements: ``call_id<TAB>1`` once the record is committed or kept in the recorder's
  spool (safe either way), ``call_id<TAB>0`` when it could not be kept; several per frame, one per line.

A record's JSON is ``orjson``'s rendering of the ``CallRecord`` dataclass in C, with the prompt IDs
vLLM sent embedded as the bytes they came in (``orjson.Fragment``): the relay never parses them.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import orjson

from tokentrail.proxy import jsonio
from tokentrail.proxy.recording.records import CallRecord, ChoiceRecord, Integrity, Outcome
from tokentrail.proxy.recording.spool import record_to_line

ARRIVED = b"A"
RECORD = b"R"
RECORD_AGAIN = b"E"
ACKS = b"K"

_HEAD = struct.Struct(">IB")
HEAD_BYTES = _HEAD.size
MAX_FRAME = 1 << 30  # a record is at most the request body limit plus its answer

_RECORD_FIELDS = {f.name for f in dataclasses.fields(CallRecord)} - {"on_stored", "prompt_ids_text"}
_CHOICE_FIELDS = {f.name for f in dataclasses.fields(ChoiceRecord)}


def frame(kind: bytes, payload: bytes) -> bytes:
    return _HEAD.pack(len(payload) + 1, kind[0]) + payload


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
            frames.append((bytes((kind,)), bytes(buffer[start + HEAD_BYTES : end])))
            start = end
        if start:
            del buffer[:start]
        return frames


def _default(value: Any) -> Any:
    if isinstance(value, bytes):  # the prompt IDs' JSON text: embedded as it came
        return orjson.Fragment(value)
    if callable(value):  # on_stored: the relay's own
        return None
    raise TypeError


def encode_record(record: CallRecord) -> bytes:
    """The record's JSON, made in C; what orjson refuses (an integer past 64 bits in the request)
    goes the spool's way (the standard library)."""
    try:
        return orjson.dumps(record, default=_default)
    except TypeError:
        return record_to_line(record, "").encode()


def decode_record(payload: bytes | str) -> CallRecord:
    """The record of a ``R``/``E`` payload or of a spool line (``ValueError``/``TypeError`` when it is
    not one)."""
    row = jsonio.loads(payload)
    if not isinstance(row, dict):
        raise ValueError("a record is a JSON object")
    fields = {k: v for k, v in row.items() if k in _RECORD_FIELDS}
    fields["choices"] = [
        ChoiceRecord(**{k: v for k, v in c.items() if k in _CHOICE_FIELDS})
        for c in fields.get("choices") or []
    ]
    fields["outcome"] = Outcome(fields.get("outcome", Outcome.OK))
    fields["integrity"] = str(fields.get("integrity", Integrity.NOT_CHECKED))
    record = CallRecord(**fields)
    ids = row.get("prompt_ids_text")
    if isinstance(ids, list) and record.prompt_token_ids is None:
        record.prompt_token_ids = ids  # counted against usage by load_prompt_ids (prompt_count_unchecked)
    return record


def encode_acks(acks: list[tuple[str, bool]]) -> bytes:
    return frame(ACKS, "\n".join(f"{call_id}\t{int(ok)}" for call_id, ok in acks).encode())


def decode_acks(payload: bytes) -> list[tuple[str, bool]]:
    acks = []
    for line in payload.decode().split("\n"):
        call_id, _, ok = line.partition("\t")
        acks.append((call_id, ok == "1"))
    return acks
