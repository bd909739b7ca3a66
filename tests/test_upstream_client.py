"""The HTTP/1.1 client to vLLM against scripted upstreams on real sockets.

Each upstream here is a raw asyncio server that answers with exactly the bytes a test gives it, so
the cases a real vLLM never shows on demand can be made: bodies ended by the connection closing,
HEAD answers, interim 1xx answers, broken HTTP, answers cut off, silence, many connections, a
reader slower than the upstream.
"""

from __future__ import annotations

import asyncio
import errno
import os
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.raw_upstream import read_request as read_raw_request
from tokentrail.proxy.upstream.client import (
    UpstreamBrokenError,
    UpstreamClient,
    UpstreamClosedError,
    UpstreamConnectError,
    UpstreamReadTimeout,
    UpstreamResponse,
    UpstreamStaleConnection,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Upstream"], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


@dataclass
class Upstream:
    """A scripted server: counts connections, keeps what it was sent."""

    handler: Handler
    url: str = ""
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    requests: list[bytes] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_now -= 1
            writer.close()
            self.closed.set()


async def read_request(reader: asyncio.StreamReader, upstream: Upstream) -> bytes:
    """One request (head and Content-Length body) as sent; b"" when the connection ended."""
    request = await read_raw_request(reader)
    if request:
        upstream.requests.append(request)
    return request


def answering(*answers: bytes) -> Handler:
    """Each request on a connection gets the next answer; then the connection stays open."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        for answer in answers:
            if not await read_request(reader, upstream):
                return
            writer.write(answer)
            await writer.drain()
        await reader.read()

    return handler


def keep_answering(answer: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        while await read_request(reader, upstream):
            writer.write(answer)
            await writer.drain()

    return handler


async def with_upstream(
    handler: Handler, test: Callable[[Upstream, UpstreamClient], Awaitable[None]], **client_options: float
) -> Upstream:
    upstream = Upstream(handler)
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    options: dict[str, float | None] = {
        "connect_timeout_s": 5.0,
        "read_timeout_s": 10.0,
        "max_connections": None,
        "keepalive_s": 30.0,
    }
    options.update(client_options)
    client = UpstreamClient(**options)  # type: ignore[arg-type]
    try:
        await asyncio.wait_for(test(upstream, client), 30)
    finally:
        await client.aclose()
        server.close()
    return upstream


async def body_of(response: UpstreamResponse) -> bytes:
    chunks = [chunk async for chunk in response.iter_raw()]
    await response.aclose()
    return b"".join(chunks)


def run(coroutine: Awaitable[Upstream]) -> Upstream:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def test_request_goes_out_with_host_and_its_own_length_and_connections_are_reused() -> None:
    async def test(upstream: Upstream, client: UpstreamClient) -> None:
        for body in (b'{"a":1}', b"x" * 300_000):  # one write, and a head and body written apart
            headers = [(b"content-type", b"application/json"), (b"content-length", b"999")]
            response = await client.send("POST", upstream.url + "/v1/chat/completions?x=1", headers, body)
            assert response.status_code == 200
            assert response.content_type == "application/json"
            assert await body_of(response) == b"{}"
        get = await client.send("GET", upstream.url + "/health", [], b"")
        assert await body_of(get) == b"{}"

    upstream = run(with_upstream(keep_answering(OK), test))
    first, second, third = upstream.requests
    assert first.startswith(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: 127.0.0.1:")
    assert b"content-length: 7\r\n" in first
    assert b"999" not in first
    assert first.endswith(b'{"a":1}')
    assert b"content-length: 300000\r\n" in second
    assert second.endswith(b"x" * 300_000)
    assert third.startswith(b"GET /health HTTP/1.1\r\n")
    assert b"content-length" not in third
    assert upstream.connections == 1, "keep-alive connections are reused"


def test_a_body_ended_by_the_connection_closing_is_read_whole_and_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        await read_request(reader, upstream)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\npart one, ")
        await writer.drain()
        writer.write(b"part two")

    async def test(upstream: Upstream, client: UpstreamClient) -> None:
        for _ in range(2):
            response = await client.send("GET", upstream.url + "/", [], b"")
            assert await body_of(response) == b"part one, part two"

    assert run(with_upstream(handler, test)).connections == 2


def test_head_and_interim_answers() -> None:
    head_answer = b"HTTP/1.1 200 OK\r\ncontent-length: 12345\r\n\r\n"
    interim = b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + OK

    async def test(upstream: Upstream, client: UpstreamClient) -> None:
        head = await client.send("HEAD", upstream.url + "/", [], b"")
        assert head.status_code == 200
        assert await body_of(head) == b""
        response = await client.send("GET", upstream.url + "/", [], b"")
        assert response.status_code == 200
        assert (b"link", b"</a>") not in response.raw_headers
        assert await body_of(response) == b"{}"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        # A HEAD answer leaves the connection unusable for the client: the GET comes on a new one.
        await read_request(reader, upstream)
        writer.write(head_answer if upstream.connections == 1 else interim)
        await writer.drain()
        await reader.read()

    assert run(with_upstream(handler, test)).connections == 2


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"", UpstreamClosedError),  # closes without a word: a dropped keep-alive connection
        (b"NOT HTTP AT ALL\r\n\r\n", UpstreamBrokenError),
    ],
)
def test_no_answer_or_a_broken_one_is_an_error_at_send(answer: bytes, error: type[Exception]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        await read_request(reader, upstream)
        writer.write(answer)
        await writer.drain()

    async def test(upstream: Upstream, client: UpstreamClient) -> None:
        with pytest.raises(error):
            await client.send("POST", upstream.url + "/v1/completions", [], b"{}")
        assert client.open_connections == 0

    run(with_upstream(handler, test))


def test_an_answer_cut_off_mid_body_is_broken() -> None:
    cut = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b"

    async def test(upstream: Upstream, client: UpstreamClient) -> None:
        response = await client.send("GET", upstream.url + "/", [], b"")
        with pytest.raises(UpstreamBrokenError):
            await body_of(response)
        await response.aclose()
        assert client.open_connections == 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        await read_request(reader, upstream)
        writer.write(cut)
        await writer.drain()

    run(with_upstream(handler, test))


def test_silence_before_the_headers_or_between_chunks_is_a_read_timeout() -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        await read_request(reader, upstream)
        if upstream.connections == 2:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await writer.drain()
        await release.wait()

    async def test(upstream: Upstream, client: UpstreamClient) -> None:
        with pytest.raises(UpstreamReadTimeout):
            await client.send("GET", upstream.url + "/", [], b"")
        response = await client.send("GET", upstream.url + "/", [], b"")
        chunks = response.iter_raw()
        assert await chunks.__anext__() == b"hello"
        with pytest.raises(UpstreamReadTimeout):
            await chunks.__anext__()
        await response.aclose()
        assert client.open_connections == 0, "a timed-out connection is closed, not reused"
        with pytest.raises(UpstreamReadTimeout):  # a whole-exchange deadline (health probes)
            await client.send("GET", upstream.url + "/", [], b"", timeout_s=0.1)
        release.set()

    run(with_upstream(handler, test, read_timeout_s=0.3))


def test_a_refused_connection_is_a_connect_error() -> None:
    async def test() -> None:
        client = UpstreamClient(connect_timeout_s=2, read_timeout_s=2, max_connections=None, keepalive_s=4)
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(UpstreamConnectError):
            await client.send("GET", f"http://127.0.0.1:{port}/", [], b"")
        with pytest.raises(UpstreamConnectError):
            await client.send("GET", "ftp://127.0.0.1/", [], b"")
        await client.aclose()

    asyncio.run(test())


def test_the_connection_cap_makes_callers_wait_for_a_free_connection() -> None:
    async def test(upstream: Upstream, client: UpstreamClient) -> None:
        async def one() -> bytes:
            return await body_of(await client.send("GET", upstream.url + "/", [], b""))

        assert await asyncio.gather(*(one() for _ in range(12))) == [b"{}"] * 12

    upstream = run(with_upstream(keep_answering(OK), test, max_connections=2))
    assert upstream.most_open <= 2
    assert len(upstream.requests) == 12


def test_idle_connections_are_closed_after_the_keepalive_time() -> None:
    async def test(upstream: Upstream, client: UpstreamClient) -> None:
        await body_of(await client.send("GET", upstream.url + "/", [], b""))
        assert client.open_connections == 1
        await asyncio.wait_for(upstream.closed.wait(), 5)  # the client's sweep closed it
        assert client.open_connections == 0

    run(with_upstream(answering(OK), test, keepalive_s=0.2))


def test_reading_pauses_while_the_reader_is_behind() -> None:
    size = 64 * 2**20
    written = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        await read_request(reader, upstream)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size + b"z" * size)
        written.set()
        await writer.drain()

    async def test(upstream: Upstream, client: UpstreamClient) -> None:
        response = await client.send("GET", upstream.url + "/", [], b"")
        await written.wait()
        for _ in range(300):  # let the event loop deliver whatever the client reads (no reader yet)
            await asyncio.sleep(0)
        assert response._connection.buffered <= 2**20, "the client buffered past its high-water mark"
        received = 0
        async for chunk in response.iter_raw():
            received += len(chunk)
        await response.aclose()
        assert received == size

    run(with_upstream(handler, test))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (Debian's openssl)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.parametrize("trusted", [True, False])
def test_https_upstreams_are_verified(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, trusted: bool
) -> None:
    cert, key = certificate
    if trusted:
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the default context's trust store
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)

    async def test() -> None:
        upstream = Upstream(keep_answering(OK))
        server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0, ssl=tls)
        url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/health"
        client = UpstreamClient(connect_timeout_s=5, read_timeout_s=5, max_connections=None, keepalive_s=4)
        try:
            if trusted:
                assert await body_of(await client.send("GET", url, [], b"")) == b"{}"
                assert upstream.requests[0].startswith(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1:")
            else:
                with pytest.raises(UpstreamConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                    await client.send("GET", url, [], b"")
        finally:
            await client.aclose()
            server.close()

    asyncio.run(test())


def test_a_connection_paused_for_a_reader_that_left_reads_again_when_reused() -> None:
    async def test(upstream: Upstream, client: UpstreamClient) -> None:
        response = await client.send("GET", upstream.url + "/", [], b"")
        never = asyncio.get_running_loop().create_future()  # the reader never catches up

        async def drain() -> None:
            await never

        behind = asyncio.Event()

        def sink(chunk: bytes) -> bool:
            behind.set()
            return False  # "my reader is behind": reading from the upstream pauses

        pumping = asyncio.create_task(response.pump(sink, drain))
        await behind.wait()
        assert response._connection.reading_paused
        pumping.cancel()  # the client goes away; the answer had all arrived
        with pytest.raises(asyncio.CancelledError):
            await pumping
        await response.aclose()
        again = await client.send("GET", upstream.url + "/", [], b"")  # the same, reused connection
        assert await body_of(again) == b"{}"

    upstream = run(with_upstream(keep_answering(OK), test, read_timeout_s=2))
    assert upstream.connections == 1


@pytest.mark.parametrize("tail", [b"XYZ", b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", b"HTTP/1.1 2"])
def test_bytes_after_a_complete_answer_are_not_parsed_and_the_connection_is_not_reused(tail: bytes) -> None:
    async def test(upstream: Upstream, client: UpstreamClient) -> None:
        for _ in range(2):
            response = await client.send("GET", upstream.url + "/", [], b"")
            assert response.raw_headers == [(b"content-length", b"2")]
            assert await body_of(response) == b"ok"

    upstream = run(
        with_upstream(keep_answering(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok" + tail), test)
    )
    assert upstream.connections == 2, "a connection with stray bytes went back to the pool"


def test_a_101_is_an_error_and_is_not_sent_again() -> None:
    upgrade = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"

    async def test(upstream: Upstream, client: UpstreamClient) -> None:
        assert await body_of(await client.send("GET", upstream.url + "/", [], b"")) == b"{}"
        with pytest.raises(UpstreamBrokenError, match="101"):
            await client.send("GET", upstream.url + "/", [], b"")

    upstream = run(with_upstream(answering(OK, upgrade), test))
    assert len(upstream.requests) == 2


def test_a_stale_reused_connection_is_sent_again_once_only_when_allowed() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        if upstream.connections == 1:  # answer once, then drop the next request unread
            await read_request(reader, upstream)
            writer.write(OK)
            await writer.drain()
            await reader.read(1)
            return
        await keep_answering(OK)(reader, writer, upstream)

    async def test(upstream: Upstream, client: UpstreamClient) -> None:
        await body_of(await client.send("POST", upstream.url + "/", [], b"{}"))
        assert await body_of(await client.send("POST", upstream.url + "/", [], b"{}")) == b"{}"
        assert upstream.connections == 2

    run(with_upstream(handler, test, stale_window_s=30.0))

    async def refused(upstream: Upstream, client: UpstreamClient) -> None:
        await body_of(await client.send("POST", upstream.url + "/", [], b"{}"))
        with pytest.raises(UpstreamStaleConnection):
            await client.send("POST", upstream.url + "/", [], b"{}", resend_if_stale=False)
        assert upstream.connections == 1

    run(with_upstream(handler, refused, stale_window_s=30.0))


def test_a_close_after_the_stale_window_is_not_stale() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        await read_request(reader, upstream)
        writer.write(OK)
        await writer.drain()
        await read_request(reader, upstream)
        await asyncio.sleep(0.3)  # vLLM works on it (the scenario), then dies

    async def test(upstream: Upstream, client: UpstreamClient) -> None:
        await body_of(await client.send("POST", upstream.url + "/", [], b"{}"))
        with pytest.raises(UpstreamClosedError) as caught:
            await client.send("POST", upstream.url + "/", [], b"{}")
        assert not isinstance(caught.value, UpstreamStaleConnection)

    upstream = run(with_upstream(handler, test, stale_window_s=0.1))
    assert len(upstream.requests) == 2
    assert upstream.connections == 1


def test_the_connection_cap_serves_waiters_first_come_first_served() -> None:
    async def test(upstream: Upstream, client: UpstreamClient) -> None:
        first = await client.send("GET", upstream.url + "/", [], b"")  # holds the only connection
        order: list[str] = []

        async def call(name: str) -> None:
            response = await client.send("GET", upstream.url + "/", [], b"")
            order.append(name)
            await body_of(response)

        waiting = [asyncio.create_task(call("b")), asyncio.create_task(call("c"))]
        await asyncio.sleep(0)  # one step each: both run straight into the queue behind the cap
        assert len(client._waiters) == 2
        newcomer = asyncio.create_task(call("d"))  # runs right after the connection is released
        await body_of(first)
        await asyncio.gather(*waiting, newcomer)
        assert order == ["b", "c", "d"], "a newcomer took the connection ahead of the waiters"

    run(with_upstream(keep_answering(OK), test, max_connections=1))


@pytest.mark.parametrize(("code", "local"), [(errno.EMFILE, True), (errno.ECONNREFUSED, False)])
def test_connect_errors_say_whether_this_machine_is_at_fault(code: int, local: bool) -> None:
    async def test() -> None:
        client = UpstreamClient(connect_timeout_s=2, read_timeout_s=2, max_connections=None, keepalive_s=4)

        async def failing(*args: object, **kwargs: object) -> None:
            raise OSError(code, os.strerror(code))

        client._create_connection = failing  # type: ignore[method-assign]
        with pytest.raises(UpstreamConnectError) as caught:
            await client.send("GET", "http://127.0.0.1:9/", [], b"")
        assert caught.value.local is local
        await client.aclose()

    asyncio.run(test())
