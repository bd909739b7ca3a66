"""Forwards one call to vLLM as a plain ASGI app: headers, body, streaming, disconnects, upstream errors.

Plain ASGI rather than a FastAPI route, for three reasons the pitfalls notes give: the relay must own
``receive`` to notice a client that hangs up *before* vLLM's first byte (Starlette only listens while
it streams), it must close the upstream response deterministically whatever ends the call, and it
is the hot path, so it should not pay for routing, dependency injection or response classes.

Each recorded call produces exactly one ``CallRecord``, handed to the writer in ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tokentrail.proxy import jsonio
from tokentrail.proxy.errors import (
    BodyTooLargeError,
    ClientTooSlowError,
    PausedTooLongError,
    ProxyRequestError,
    TooManyCallsError,
    UpstreamTimeoutError,
    UpstreamUnreachableError,
    openai_error_body,
)
from tokentrail.proxy.ids import new_id
from tokentrail.proxy.recording.capture import (
    CHAT_ROUTE,
    RECORDED_ROUTES,
    ResponseCapture,
    StreamTap,
    prepare_request,
    strip_token_ids,
)
from tokentrail.proxy.recording.records import CallRecord, Outcome
from tokentrail.proxy.recording.telemetry import CallSpans
from tokentrail.proxy.recording.writer import RecordSink
from tokentrail.proxy.relay.headers import strip_hop_by_hop, upstream_request_headers
from tokentrail.proxy.relay.routing import (
    RlHeaders,
    generated_trajectory_id,
    parse_rl_headers,
    parse_tags_header,
    route_path,
)
from tokentrail.proxy.rl.loop import RlLoop
from tokentrail.proxy.rl.weights import RunningCall, is_control_path
from tokentrail.proxy.server.uvicorn_hooks import RequestHooks, hooks_of
from tokentrail.proxy.token_in.planner import TokenIn
from tokentrail.proxy.upstream.balancer import Upstream, UpstreamPool
from tokentrail.proxy.upstream.client import (
    UpstreamClient,
    UpstreamClosedError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamReadTimeout,
    UpstreamResponse,
)

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]

_JSON_HEADERS = [(b"content-type", b"application/json")]
_MAX_ERROR_TEXT = 2000
_VALIDATION_STATUSES = frozenset({400, 422})


class _ClientGone(Exception):
    """The client disconnected while its request body was still arriving."""


@dataclass(slots=True)
class _CallState:
    """What the disconnect watcher and the relay share about one call."""

    task: asyncio.Task[Any] | None = None
    response_done: bool = False
    disconnected: bool = False
    response_started: bool = False
    upstream: UpstreamResponse | None = None
    target: Upstream | None = None  # the upstream this call uses (or last tried)
    counted: bool = False  # whether target.in_flight counts this call
    on_target: Callable[[Upstream], None] | None = None  # told which upstream each attempt goes to
    # Durable mode: awaited right before the response's last bytes go out (the flag: the call
    # completed normally); it hands the record to the writer and waits until it is stored.
    before_end: Callable[[bool], Awaitable[None]] | None = None

    async def end(self, completed: bool) -> None:
        if self.before_end is not None:
            await self.before_end(completed)

    def client_gone(self) -> None:
        """The client hung up: cancel the call, unless its response is already out."""
        if not self.response_done and self.task is not None:
            self.disconnected = True
            self.task.cancel()

    def take_target(self, upstream: Upstream) -> None:
        self.release_target()
        self.target = upstream
        upstream.in_flight += 1
        self.counted = True
        if self.on_target is not None:
            self.on_target(upstream)

    def release_target(self) -> None:
        """Lower the in-flight count of the upstream this call used (once)."""
        if self.target is not None and self.counted:
            self.target.in_flight -= 1
            self.counted = False


class _Watch(Protocol):
    def cancel(self) -> Any: ...


class _HookWatch:
    """Stops listening for the client hanging up (the protocol's callback)."""

    __slots__ = ("_hooks",)

    def __init__(self, hooks: RequestHooks) -> None:
        self._hooks = hooks

    def cancel(self) -> None:
        self._hooks.on_disconnect = None


class InFlight:
    """Counts open calls so shutdown can wait for them before draining the writer."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, limit_s: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), limit_s)
        except TimeoutError:
            return False
        return True


class Relay:
    """The ASGI app behind every path that is not TokenTrail's own."""

    def __init__(
        self,
        pool: UpstreamPool,
        client: UpstreamClient,
        sink: RecordSink,
        spans: CallSpans | None = None,
        *,
        max_body_bytes: int = 100 * 2**20,
        max_concurrent_calls: int | None = None,
        durable: bool = False,
        client_body_timeout_s: float = 60.0,
        rl: RlLoop | None = None,
        token_in: TokenIn | None = None,
    ) -> None:
        self.rl = rl
        self.token_in = token_in
        self.durable = durable
        self.client_body_timeout_s = client_body_timeout_s
        self.max_body_bytes = max_body_bytes
        self.max_concurrent_calls = max_concurrent_calls
        self.pool = pool
        self.client = client
        self.sink = sink
        self.spans = spans
        self.in_flight = InFlight()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if self.max_concurrent_calls is not None and self.in_flight.count >= self.max_concurrent_calls:
            await _send_error(
                send,
                TooManyCallsError(f"more than {self.max_concurrent_calls} calls are open; retry shortly"),
            )
            return
        self.in_flight.enter()
        try:
            await self._handle(scope, receive, send)
        finally:
            self.in_flight.leave()

    async def _handle(self, scope: Scope, receive: Any, send: Any) -> None:
        received_at = time.time()
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        try:
            routed = route_path(raw_path, headers)
            tags = parse_tags_header(headers)
            rl_headers = parse_rl_headers(headers)
            body = await _read_body(
                receive, headers, self.max_body_bytes, self.client_body_timeout_s, hooks_of(scope)
            )
        except ProxyRequestError as exc:
            await _send_error(send, exc)
            return
        except _ClientGone:
            return
        path = routed.raw_path.decode("latin-1")
        if scope["method"] == "POST" and path in RECORDED_ROUTES:
            if not self.sink.accepting:
                await _send_error(
                    send, TooManyCallsError("the record spool is full; calls are refused until it drains")
                )
                return
            await self._recorded_call(
                scope, receive, send, routed.trajectory_id, path, body, received_at, tags, rl_headers
            )
        else:
            await self._passthrough_call(scope, receive, send, routed.raw_path, body, routed.trajectory_id)

    # ---- shared plumbing ----

    async def _open(
        self,
        scope: Scope,
        state: _CallState,
        method: str,
        raw_path: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        trajectory_id: str | None,
    ) -> UpstreamResponse:
        """Send the request to the call's upstream; if it refuses the connection, or closes it before
        answering (a keep-alive connection it was shutting down), send it once more, to another
        upstream when there is one.

        ``state.target`` is the upstream last tried (its in-flight count raised until
        ``state.release_target()``), so a failure is recorded against the upstream that failed.
        """
        query: bytes = scope.get("query_string") or b""
        suffix = raw_path + (b"?" + query if query else b"")
        upstream = self.pool.pick(trajectory_id)
        for attempt in range(2):
            state.take_target(upstream)
            url = (upstream.url_bytes + suffix).decode("latin-1")
            try:
                return await self.client.send(method, url, headers, body)
            except (UpstreamConnectError, UpstreamClosedError) as exc:
                if isinstance(exc, UpstreamConnectError):
                    self.pool.mark_down(upstream, type(exc).__name__)
                elif not self.pool.has_alternative(upstream) and attempt == 0:
                    continue  # closed before answering: once more on the same upstream
                if attempt == 1 or not self.pool.has_alternative(upstream):
                    raise
                upstream = self.pool.pick(trajectory_id, exclude=upstream)
        raise AssertionError("unreachable")  # pragma: no cover

    def _watch(self, scope: Scope, receive: Any, state: _CallState) -> _Watch:
        """Cancel the call when the client hangs up (uvicorn's send() on a gone client is silent):
        told by TokenTrail's protocol where it runs, else by a task blocked in ``receive()``."""
        state.task = asyncio.current_task()
        hooks = hooks_of(scope)
        if hooks is not None:
            hooks.on_disconnect = state.client_gone
            if hooks.cycle.disconnected:  # gone already: cancelled at the call's first await
                state.client_gone()
            return _HookWatch(hooks)

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    state.client_gone()
                    return

        return asyncio.create_task(watch())

    # ---- pass-through ----

    async def _passthrough_call(
        self, scope: Scope, receive: Any, send: Any, raw_path: bytes, body: bytes, trajectory_id: str | None
    ) -> None:
        state = _CallState()
        watcher = self._watch(scope, receive, state)
        try:
            headers = upstream_request_headers(scope["headers"], recorded=False, body_changed=False)
            try:
                upstream = await self._open(
                    scope, state, scope["method"], raw_path, headers, body, trajectory_id
                )
            except UpstreamError as exc:
                await _send_error(send, _transport_error(exc))
                return
            # a control call that changes or tells the policy version: keep its answer to learn it
            path = raw_path.decode("latin-1")
            answer: list[bytes] | None = [] if self.rl is not None and is_control_path(path) else None
            try:
                state.response_started = True
                await send(_start(upstream.status_code, strip_hop_by_hop(upstream.raw_headers)))
                async for chunk in upstream.iter_raw():
                    if answer is not None:
                        answer.append(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                state.response_done = True
                if answer is not None and self.rl is not None and state.target is not None:
                    self.rl.weights.observe(
                        state.target.url, scope["method"], path, body, upstream.status_code, b"".join(answer)
                    )
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except UpstreamError as exc:
                logger.warning(
                    "path=<%s>, error=<%s> | upstream failed mid-response", scope["path"], type(exc).__name__
                )
            finally:
                await _close_quietly(upstream)
        except asyncio.CancelledError:
            if not _absorb_disconnect(state):
                raise
        except Exception as exc:  # a bug of ours: never a stack trace to the client or the log
            logger.error(
                "path=<%s>, error=<%s> | proxy error while relaying", scope["path"], type(exc).__name__
            )
            logger.debug("path=<%s> | proxy error details", scope["path"], exc_info=exc)
            if not state.response_started:
                await _send_error(send, UpstreamUnreachableError("the proxy failed to relay this call"))
        finally:
            watcher.cancel()
            state.release_target()

    # ---- recorded calls ----

    async def _recorded_call(
        self,
        scope: Scope,
        receive: Any,
        send: Any,
        trajectory_id: str | None,
        route: str,
        body: bytes,
        received_at: float,
        tags: dict[str, str] | None,
        rl_headers: RlHeaders,
    ) -> None:
        prepared = prepare_request(route, body)
        if trajectory_id is None:
            record = CallRecord(new_id(), generated_trajectory_id(), route, received_at)
        else:
            ordinal = self.sink.next_ordinal(trajectory_id)
            record = CallRecord(new_id(), trajectory_id, route, received_at, seq=ordinal)
        record.tags = tags
        record.group_id = rl_headers.group_id
        record.request = prepared.request
        record.model = prepared.model
        record.stream = prepared.ask.stream
        capture = ResponseCapture(record, prepared.ask, chat=route == CHAT_ROUTE)
        state = _CallState()
        sealed = False
        running: RunningCall | None = None
        rl = self.rl
        if rl is not None:

            def sent_to(upstream: Upstream) -> None:
                nonlocal running
                if running is not None:
                    rl.forget(running)
                running = rl.begin(record, upstream.url, rl_headers.policy_version, capture.generated_so_far)

            state.on_target = sent_to
        elif rl_headers.policy_version is not None:
            record.weight_version = rl_headers.policy_version

        def seal(completed: bool) -> None:
            """Finish the record and hand it to the writer (once)."""
            nonlocal sealed
            if sealed:
                return
            sealed = True
            if state.target is not None:
                record.upstream = state.target.url
            record.finished_at = time.time()
            capture.finish(completed and record.outcome == Outcome.OK)
            if running is not None and rl is not None:
                rl.end(running, capture.generated_so_far())
            if self.token_in is not None:  # token-in: keep the call for its trajectory's next one
                self.token_in.finished(record)
            self.sink.submit(record)
            if self.spans is not None:
                self.spans.record(record, scope["headers"])
            logger.info(
                "call_id=<%s>, trajectory=<%s>, route=<%s>, status=<%s>, outcome=<%s>, integrity=<%s> "
                "| recorded",
                record.call_id,
                record.trajectory_id,
                route,
                record.status_code,
                record.outcome,
                record.integrity,
            )

        if self.durable:

            async def stored_before_end(completed: bool) -> None:
                loop = asyncio.get_running_loop()
                stored: asyncio.Future[bool] = loop.create_future()

                def notify(ok: bool) -> None:  # called from the writer thread
                    loop.call_soon_threadsafe(_settle, stored, ok)

                record.on_stored = notify
                seal(completed)
                await stored

            state.before_end = stored_before_end
        watcher = self._watch(scope, receive, state)
        completed = False
        try:
            if rl is not None and not await rl.admit():
                record.outcome = Outcome.PAUSED
                record.status_code = 503
                record.error = "held past TOKENTRAIL_PAUSE_MAX_WAIT_S while training was paused"
                await _send_error(send, PausedTooLongError(rl.pause_max_wait_s))
                return
            completed = await self._exchange(scope, send, route, body, prepared.body, capture, state)
        except asyncio.CancelledError:
            if _absorb_disconnect(state):
                record.outcome = Outcome.CLIENT_DISCONNECTED
            else:
                record.outcome = Outcome.PROXY_SHUTDOWN
                raise
        except Exception as exc:  # a bug of ours: record it, answer 502 without details
            logger.error(
                "call_id=<%s>, error=<%s> | proxy error while relaying", record.call_id, type(exc).__name__
            )
            logger.debug("call_id=<%s> | proxy error details", record.call_id, exc_info=exc)
            record.outcome = Outcome.PROXY_ERROR
            record.error = f"proxy error: {type(exc).__name__}"
            if not state.response_started:
                await _send_error(send, UpstreamUnreachableError("the proxy failed to relay this call"))
        finally:
            watcher.cancel()
            if state.upstream is not None:
                await _close_quietly(state.upstream)
            seal(completed)
            state.release_target()

    async def _open_upstream(
        self,
        scope: Scope,
        route: str,
        body: bytes,
        record: CallRecord,
        state: _CallState,
        *,
        body_changed: bool,
    ) -> UpstreamResponse:
        headers = upstream_request_headers(scope["headers"], recorded=True, body_changed=body_changed)
        trajectory_id = None if record.seq is None else record.trajectory_id  # generated ids: balance
        response = await self._open(scope, state, "POST", route.encode(), headers, body, trajectory_id)
        state.upstream = response
        return response

    async def _open_token_in(
        self, scope: Scope, route: str, body: bytes, record: CallRecord, state: _CallState
    ) -> UpstreamResponse | None:
        """Token-in (``proxy/token_in/``): send the body with the trajectory's exact prompt IDs when
        the call continues it; None when it does not, or when vLLM refused that body (4xx: refused
        before running, so the caller sends its own body once)."""
        if self.token_in is None:
            return None
        rewritten = await self.token_in.rewrite(scope["headers"], record, body)
        if rewritten is None:
            return None
        upstream = await self._open_upstream(scope, route, rewritten, record, state, body_changed=True)
        if 400 <= upstream.status_code < 500:
            await upstream.aclose()
            self.token_in.refused(record, upstream.status_code)
            return None
        return upstream

    async def _exchange(
        self,
        scope: Scope,
        send: Any,
        route: str,
        original: bytes,
        body: bytes,
        capture: ResponseCapture,
        state: _CallState,
    ) -> bool:
        """Send the call upstream and relay the answer; True when vLLM finished it normally.

        When the proxy added ``return_token_ids`` and vLLM rejects the request as invalid, the
        client's own bytes are sent again, so it gets vLLM's error exactly (vLLM's validation
        messages count the request's fields).
        """
        record = capture.record
        changed = body is not original
        try:
            upstream = await self._open_token_in(scope, route, body, record, state)
            if upstream is None:
                upstream = await self._open_upstream(scope, route, body, record, state, body_changed=changed)
            if changed and upstream.status_code in _VALIDATION_STATUSES:
                await upstream.aclose()
                upstream = await self._open_upstream(
                    scope, route, original, record, state, body_changed=False
                )
                changed = False
        except UpstreamError as exc:
            error = _transport_error(exc)
            record.outcome = _transport_outcome(exc, response_started=False)
            record.status_code = error.status_code
            record.error = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_TEXT]
            await state.end(False)
            await _send_error(send, error)
            return False
        record.status_code = upstream.status_code
        content_type = upstream.content_type
        if upstream.status_code == 200 and content_type.startswith("text/event-stream"):
            return await self._relay_stream(scope, send, upstream, capture, state, strip=changed)
        return await self._relay_body(scope, send, upstream, capture, state, strip=changed)

    async def _relay_body(
        self,
        scope: Scope,
        send: Any,
        upstream: UpstreamResponse,
        capture: ResponseCapture,
        state: _CallState,
        strip: bool,
    ) -> bool:
        record = capture.record
        chunks: list[bytes] = []
        try:
            async for chunk in upstream.iter_raw():
                if record.upstream_first_byte_at is None:
                    record.upstream_first_byte_at = time.time()
                chunks.append(chunk)
        except UpstreamError as exc:
            error = _transport_error(exc)
            record.outcome = _transport_outcome(exc, response_started=True)
            record.error = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_TEXT]
            record.status_code = error.status_code
            await state.end(False)
            await _send_error(send, error)
            return False
        body = b"".join(chunks)
        ok = upstream.status_code == 200
        if ok:
            capture.feed_body(body)
            if strip:
                body = strip_token_ids(body)
        else:
            record.outcome = Outcome.UPSTREAM_ERROR
            record.error = _error_message(body)
        headers = strip_hop_by_hop(upstream.raw_headers, frozenset({b"content-length"}))
        headers.append((b"content-length", str(len(body)).encode()))
        state.response_started = True

        async def answer() -> None:
            await send(_start(upstream.status_code, headers))
            await state.end(ok)
            state.response_done = True
            await send({"type": "http.response.body", "body": body, "more_body": False})

        hooks = hooks_of(scope)
        if hooks is None:
            await answer()
        else:
            await hooks.whole_response(answer)  # head and body in one write
        return ok

    async def _relay_stream(
        self,
        scope: Scope,
        send: Any,
        upstream: UpstreamResponse,
        capture: ResponseCapture,
        state: _CallState,
        strip: bool,
    ) -> bool:
        record = capture.record
        tap = StreamTap(capture, strip)
        headers = strip_hop_by_hop(upstream.raw_headers, frozenset({b"content-length"}))
        state.response_started = True
        await send(_start(upstream.status_code, headers))
        hooks = hooks_of(scope)
        direct = None if hooks is None else hooks.direct_body(scope["method"])
        try:
            if direct is not None:

                def relay_chunk(chunk: bytes) -> bool:  # runs in the upstream's read callback
                    if record.upstream_first_byte_at is None:
                        record.upstream_first_byte_at = time.time()
                    out = tap.feed(chunk)
                    return direct.write(out) if out else True

                await upstream.pump(relay_chunk, direct.drain)
            else:
                async for chunk in upstream.iter_raw():
                    if record.upstream_first_byte_at is None:
                        record.upstream_first_byte_at = time.time()
                    out = tap.feed(chunk)
                    if out:
                        await send({"type": "http.response.body", "body": out, "more_body": True})
        except UpstreamError as exc:
            # The status is already sent: end the stream abruptly, as vLLM dying would have.
            record.outcome = _transport_outcome(exc, response_started=True)
            record.error = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_TEXT]
            tap.close()
            await state.end(False)
            return False
        rest = tap.close()
        if record.error is not None:
            record.outcome = Outcome.UPSTREAM_ERROR
        await state.end(record.outcome == Outcome.OK)
        state.response_done = True
        await send({"type": "http.response.body", "body": rest, "more_body": False})
        return record.outcome == Outcome.OK


def _settle(future: asyncio.Future[bool], stored: bool) -> None:
    if not future.done():
        future.set_result(stored)


def _absorb_disconnect(state: _CallState) -> bool:
    """After a cancel: True (and the cancel is absorbed) when it came from the client hanging up."""
    if not state.disconnected:
        return False
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    return True


async def _close_quietly(response: UpstreamResponse) -> None:
    with contextlib.suppress(UpstreamError):
        await response.aclose()


def _transport_error(exc: UpstreamError) -> ProxyRequestError:
    if isinstance(exc, UpstreamReadTimeout):
        return UpstreamTimeoutError("the upstream vLLM server did not answer in time")
    return UpstreamUnreachableError("the upstream vLLM server could not be reached or closed the connection")


def _transport_outcome(exc: UpstreamError, *, response_started: bool) -> Outcome:
    if isinstance(exc, UpstreamReadTimeout):
        return Outcome.UPSTREAM_TIMEOUT
    if isinstance(exc, UpstreamConnectError) and not response_started:
        return Outcome.UPSTREAM_UNREACHABLE
    return Outcome.UPSTREAM_DIED


def _error_message(body: bytes) -> str:
    """The message of an OpenAI-shaped error body, or its text."""
    try:
        parsed = jsonio.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body[:_MAX_ERROR_TEXT].decode("utf-8", "replace")
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return str(parsed["error"].get("message"))[:_MAX_ERROR_TEXT]
    return body[:_MAX_ERROR_TEXT].decode("utf-8", "replace")


def _start(status: int, headers: list[tuple[bytes, bytes]]) -> Message:
    return {"type": "http.response.start", "status": status, "headers": headers}


async def _send_error(send: Any, error: ProxyRequestError) -> None:
    body = error.body()
    head = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode()), *error.headers]
    await send(_start(error.status_code, head))
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _too_large(limit: int) -> BodyTooLargeError:
    return BodyTooLargeError(f"the request body is larger than the limit of {limit} bytes")


async def _read_body(
    receive: Any,
    headers: list[tuple[bytes, bytes]],
    limit: int,
    silence_s: float,
    hooks: RequestHooks | None = None,
) -> bytes:
    """The whole request body; ``BodyTooLargeError`` as soon as it is known to pass ``limit``,
    ``ClientTooSlowError`` when the client sends nothing for ``silence_s`` seconds."""
    for name, value in headers:
        if name.lower() == b"content-length" and value.strip().isdigit() and int(value) > limit:
            raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            if hooks is not None and hooks.body_complete:
                message = await receive()  # all there: it cannot wait, so no timer for it
            else:
                async with asyncio.timeout(silence_s):
                    message = await receive()
        except TimeoutError:
            raise ClientTooSlowError(f"the request body stalled for more than {silence_s:g} s") from None
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


__all__ = ["InFlight", "Relay", "openai_error_body"]
