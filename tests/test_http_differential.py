"""The upstream connection's state machine against h11, the oracle: generated HTTP/1.1 responses (valid
and broken; Content-Length, chunked with extensions and trailers, close-delimited, interim 1xx, stray
bytes after the end) are fed to both, split at random points and at every byte, and must get the
same verdict (error, complete, still waiting), status, headers, body, trailers and reusability.

Known differences: empty lines (CR/LF only) that follow a complete answer *in the same read* are
skipped by llhttp, so that connection may be reused (h11 would not reuse it; harmless: no answer can
hide in blank lines; any other byte, or CR/LF in a later read, breaks the connection); likewise for
empty lines between an interim 1xx answer and the next head. A ``101`` is
not generated: h11 waits past it as an interim answer, TokenTrail refuses it (tested apart).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokentrail.proxy.upstream.connection import MAX_RESPONSE_HEAD_BYTES, Connection, Origin, State

ORIGIN = Origin("http://upstream", "upstream", 80, b"upstream", None)


class FakeTransport:
    """Just enough of an asyncio transport for the connection to write to and close."""

    def __init__(self) -> None:
        self.written = b""
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str) -> Any:
        return None


@dataclass(frozen=True)
class Verdict:
    kind: str  # "error", "complete" or "waiting"
    status: int = 0
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    trailers: tuple[tuple[bytes, bytes], ...] = ()
    reusable: bool = False
    blank_lines_after: bool = False  # (oracle) only CR/LF bytes followed the end: see the module doc


def _normal(headers: Any) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((bytes(n).lower(), bytes(v).strip(b" \t")) for n, v in headers)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()  # only for its clock: nothing runs on it
    yield loop
    loop.close()


def ours(loop: asyncio.AbstractEventLoop, method: bytes, pieces: list[bytes], eof: bool) -> Verdict:
    connection = Connection(loop, ORIGIN)
    transport = FakeTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    connection.start(method, b"", b"")
    body = b""
    for piece in pieces:
        if transport.closing:  # a closed transport delivers nothing more
            break
        connection.data_received(piece)
        if connection.chunks:
            body += connection.take()
    if eof or transport.closing:
        connection.connection_lost(None)
    if connection.chunks:
        body += connection.take()
    if connection.error is not None:
        return Verdict("error")
    if connection.state is not State.DONE:
        return Verdict("waiting")
    return Verdict(
        "complete",
        connection.status,
        _normal(connection.headers),
        body,
        _normal(connection.trailers),
        connection.reusable and not connection.closed,
    )


def oracle(method: bytes, pieces: list[bytes], eof: bool) -> Verdict:
    client = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD_BYTES)
    client.send(h11.Request(method=method, target="/", headers=[("Host", "upstream")]))
    client.send(h11.EndOfMessage())
    status, headers, body, trailers, ended = 0, (), b"", (), False
    try:
        for piece in [*pieces, *([b""] if eof else [])]:
            client.receive_data(piece)
            while True:
                event = client.next_event()
                if event in (h11.NEED_DATA, h11.PAUSED) or isinstance(event, h11.ConnectionClosed):
                    break
                if isinstance(event, h11.Response):
                    status, headers = event.status_code, _normal(event.headers)
                elif isinstance(event, h11.Data):
                    body += bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    trailers, ended = _normal(event.headers), True
            if ended and client.trailing_data[0]:
                break  # bytes after the end: never parsed (the connection is not reused)
    except h11.RemoteProtocolError:
        if not ended:
            return Verdict("error")
        return Verdict("complete", status, headers, body, trailers, False)  # stray bytes after the end
    if not ended:
        return Verdict("waiting")
    stray, closed = client.trailing_data
    reusable = client.their_state is h11.DONE and not stray and not closed and not eof
    blank = bool(stray) and not bytes(stray).strip(b"\r\n") and not closed and not eof
    return Verdict("complete", status, headers, body, trailers, reusable, blank)


# ---- generated responses ----

TOKENS = st.sampled_from([b"x-a", b"X-Request-Id", b"content-type", b"set-cookie", b"vary", b"etag"])
VALUES = st.binary(min_size=0, max_size=12).map(
    lambda v: bytes(c for c in v if 0x21 <= c <= 0x7E) or b"v"
) | st.sampled_from([b"a b", b"text/event-stream", b" padded ", b"\tx"])
HEADERS = st.lists(st.tuples(TOKENS, VALUES), max_size=4)


def _head(version: bytes, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return version + b" %d " % status + reason + b"\r\n" + lines + b"\r\n"


@st.composite
def chunked(draw: st.DrawFn, body: bytes) -> bytes:
    out = b""
    rest = body
    while rest:
        size = draw(st.integers(1, len(rest)))
        piece, rest = rest[:size], rest[size:]
        hex_size = draw(st.sampled_from(["%x", "%X", "0%x"])) % size
        extension = draw(st.sampled_from([b"", b";a=b", b';name="q v"', b";x"]))
        out += hex_size.encode() + extension + b"\r\n" + piece + b"\r\n"
    trailers = draw(st.lists(st.tuples(TOKENS, VALUES), max_size=2))
    out += b"0" + draw(st.sampled_from([b"", b";end"])) + b"\r\n"
    out += b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n"
    return out


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, bytes, bool, bool]:
    """(method, response bytes, whether the server closes the connection after them, whether the
    bytes were mutated at random after being built)."""
    method = draw(st.sampled_from([b"GET", b"POST"]))
    out = b""
    for _ in range(draw(st.integers(0, 2))):  # interim answers
        out += _head(b"HTTP/1.1", draw(st.sampled_from([100, 102, 103])), b"Info", draw(HEADERS))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    status = draw(st.sampled_from([200, 200, 201, 204, 304, 400, 404, 422, 500]))
    reason = draw(st.sampled_from([b"OK", b"", b"Some Reason"]))
    headers = [(n, v) for n, v in draw(HEADERS)]
    connection = draw(st.sampled_from([None, b"close", b"keep-alive"]))
    if connection is not None:
        headers.append((b"connection", connection))
    body = draw(st.binary(max_size=48))
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    bodyless = status in (204, 304)
    if bodyless:
        body = b""
    if framing == "length":
        headers.append((b"content-length", b"%d" % len(body)))
        payload = body
    elif framing == "chunked":
        headers.append((b"transfer-encoding", b"chunked"))
        payload = b"" if bodyless else draw(chunked(body))
    else:
        payload = body
    out += _head(version, status, reason, headers) + payload
    out += draw(st.sampled_from([b"", b"", b"X", b"\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]))
    broken = draw(st.sampled_from(["none", "none", "truncate", "flip", "insert"]))
    if broken == "truncate":
        out = out[: draw(st.integers(0, len(out)))]
    elif broken in ("flip", "insert"):
        at = draw(st.integers(0, len(out)))
        byte = draw(st.sampled_from([b"\x00", b"\n", b"\r", b":", b" ", b"z", b"9", b"\x7f"]))
        out = out[:at] + byte + out[at + (1 if broken == "flip" else 0) :]
    eof = framing == "close" or draw(st.booleans())
    return method, out, eof, broken in ("flip", "insert")


def _in_pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def _bare_cr_or_lf(data: bytes) -> bool:
    """A CR or LF that is not part of a CRLF."""
    return data.replace(b"\r\n", b"").translate(None, b"\r\n") != data.replace(b"\r\n", b"")


def _control_byte(data: bytes) -> bool:
    return any((b < 0x20 and b not in b"\t\r\n") or b == 0x7F for b in data)


_BLANK_AFTER_INTERIM = re.compile(rb"HTTP/1\.1 1\d\d[^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n[\r\n]")

SEEN: Counter[str] = Counter()  # what the run met, for the report at the end of the module


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(response=responses(), cuts=st.lists(st.integers(0, 10_000), max_size=6))
def test_the_connection_agrees_with_h11_on_generated_responses(
    loop: asyncio.AbstractEventLoop, response: tuple[bytes, bytes, bool, bool], cuts: list[int]
) -> None:
    agree_with_h11(loop, response, cuts)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(response=responses())
def test_the_connection_agrees_with_h11_byte_by_byte(
    loop: asyncio.AbstractEventLoop, response: tuple[bytes, bytes, bool, bool]
) -> None:
    agree_with_h11(loop, response, list(range(len(response[1]))))


def agree_with_h11(
    loop: asyncio.AbstractEventLoop, response: tuple[bytes, bytes, bool, bool], cuts: list[int]
) -> None:
    """The same verdict from both, given these cuts; where they may differ, the difference is
    counted in ``SEEN`` (and must be one of the known ones)."""
    method, data, eof, mutated = response
    pieces = _in_pieces(data, cuts)
    expected = oracle(method, pieces, eof)
    got = ours(loop, method, pieces, eof)
    SEEN["inputs"] += 1
    SEEN[f"h11 {expected.kind}"] += 1
    if got.kind == "error" and expected.kind != "error" and mutated:
        # Stricter than h11 on a corrupted input: safe (a proxy may refuse more, never accept more).
        if _bare_cr_or_lf(data):
            SEEN["stricter: a bare CR or LF, refused; h11 accepts it"] += 1
        elif _control_byte(data):
            SEEN["stricter: a control byte, refused; h11 accepts it"] += 1
        else:
            SEEN["stricter: other corruption (chunk extension, header syntax), refused; h11 accepts"] += 1
        return
    if got.kind == "error" and expected.kind == "waiting":  # llhttp judges a byte, h11 a whole line
        finished = oracle(method, [*pieces, b"\r\n\r\n"], eof=True)
        assert finished.kind == "error", (data, pieces, eof)
        SEEN["earlier: refused at the byte, h11 at the end of its line"] += 1
        return
    if expected.kind == "error" and got.kind == "complete" and _BLANK_AFTER_INTERIM.search(data):
        SEEN["lenient: CR/LF between an interim answer and the next head"] += 1  # (see module doc)
        return
    if expected.blank_lines_after:  # llhttp skips empty lines that come in the same read as the end
        SEEN["lenient: CR/LF after the end in the same read"] += got.reusable
        expected = dataclasses.replace(expected, reusable=got.reusable, blank_lines_after=False)
    assert got == expected, (data, pieces, eof)


FIXED = [
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    b"2;ext=1\r\nok\r\n0\r\nx-checksum: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: [DONE]\n\n",
]


@pytest.mark.parametrize("data", FIXED, ids=["length", "stray-after", "interim-chunked-trailers", "close"])
def test_every_split_of_known_answers_agrees_with_h11(loop: asyncio.AbstractEventLoop, data: bytes) -> None:
    for eof in (False, True):
        for at in range(len(data) + 1):
            pieces = [p for p in (data[:at], data[at:]) if p]
            assert ours(loop, b"GET", pieces, eof) == oracle(b"GET", pieces, eof), (at, eof)


def test_trailers_are_kept_apart_from_the_headers(loop: asyncio.AbstractEventLoop) -> None:
    verdict = ours(loop, b"GET", [FIXED[2]], False)
    assert verdict.headers == ((b"transfer-encoding", b"chunked"),)
    assert verdict.trailers == ((b"x-checksum", b"1"),)
    assert verdict.body == b"ok"


def test_a_101_is_refused_and_bytes_after_the_end_break_the_connection(
    loop: asyncio.AbstractEventLoop,
) -> None:
    upgrade = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
    assert ours(loop, b"GET", [upgrade], False).kind == "error"
    stray = ours(loop, b"GET", [FIXED[1]], False)
    assert stray.kind == "complete"
    assert stray.body == b"ok"
    assert not stray.reusable
    assert stray.headers == ((b"content-length", b"2"),), "the stray answer was parsed into this one"


def test_a_response_head_over_the_cap_is_refused_whole_or_in_pieces(loop: asyncio.AbstractEventLoop) -> None:
    big = b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * MAX_RESPONSE_HEAD_BYTES + b"\r\ncontent-length: 0\r\n\r\n"
    assert ours(loop, b"GET", [big], False).kind == "error"
    assert ours(loop, b"GET", [big[:20], big[20:]], False).kind == "error"
    assert ours(loop, b"GET", [big[: MAX_RESPONSE_HEAD_BYTES + 2]], False).kind == "error"  # incomplete


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    """What the generated inputs met (shown with ``pytest -s``)."""
    yield
    for what, count in sorted(SEEN.items()):
        print(f"differential: {what}: {count}")
