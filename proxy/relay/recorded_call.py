"""A recorded call (``POST /v1/chat/completions`` and ``/v1/completions``), from request to record.

Read ``RecordedCall.run`` top to bottom for the whole life of one call:

1. the request is prepared (``return_token_ids`` added unless it would change vLLM's answer) and its
   ``CallRecord`` made;
2. the request goes to vLLM (``_open``, under the re-send rule of ``call``);
3. the answer is relayed, as one body (``_relay_body``) or as a stream (``_relay_stream``), and fed
   to the ``ResponseCapture`` on the way;
4. whatever ends the call, it ends in one ``except`` clause of ``run`` that names the outcome
   (``_end``), and the record is sealed exactly once (``seal``): finished, handed to the writer and,
   in durable mode, stored before the answer's last bytes go out. Once sealed the record belongs to
   the writer: its outcome is never changed after that.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from tokentrail.proxy.errors import PausedTooLongError
from tokentrail.proxy.ids import new_id
from tokentrail.proxy.recording.capture import (
    CHAT_ROUTE,
    RawAnswer,
    ResponseCapture,
    StreamTap,
    prepare_request,
    read_raw_answer,
    strip_token_ids,
)
from tokentrail.proxy.recording.records import CallRecord, Outcome
from tokentrail.proxy.relay.call import (
    CallState,
    ClientStalled,
    RelayContext,
    absorb_disconnect,
    cut_off,
    drain_within,
    open_upstream,
    send_within,
    watch_client,
)
from tokentrail.proxy.relay.headers import strip_hop_by_hop, upstream_request_headers
from tokentrail.proxy.relay.responses import (
    body_message,
    error_message,
    error_text,
    proxy_failed,
    send_error,
    start_message,
    transport_error,
    transport_outcome,
)
from tokentrail.proxy.relay.routing import RlHeaders, generated_trajectory_id
from tokentrail.proxy.rl.weights import RunningCall
from tokentrail.proxy.server.uvicorn_hooks import hooks_of
from tokentrail.proxy.upstream.balancer import Upstream
from tokentrail.proxy.upstream.client import UpstreamResponse
from tokentrail.proxy.upstream.errors import UpstreamError

logger = logging.getLogger(__name__)

_VALIDATION_STATUSES = frozenset({400, 422})
# What in a 400/422 says the added flag may have shaped it (see RecordedCall._open).
_FLAG_SHAPED = (b"return_token_ids", b"validation error")
_NO_LENGTH = frozenset({b"content-length"})


class _HeldTooLong(Exception):
    """The call waited at the pause gate past ``TOKENTRAIL_PAUSE_MAX_WAIT_S``."""


class RecordedCall:
    """One recorded call: relays it and produces exactly one ``CallRecord``."""

    def __init__(
        self,
        context: RelayContext,
        scope: dict[str, Any],
        send: Any,
        route: str,
        trajectory_id: str | None,
        body: bytes,
        received_at: float,
        tags: dict[str, str] | None,
        rl_headers: RlHeaders | None = None,
    ) -> None:
        self.context = context
        self.scope = scope
        self.send = send
        self.route = route
        self.original = body
        prepared = prepare_request(route, body)
        self.body = prepared.body
        self.strip = prepared.body is not body  # the proxy added the flag: its effects are undone
        call_id = new_id()
        if trajectory_id is None:
            record = CallRecord(call_id, generated_trajectory_id(), route, received_at)
        else:
            ordinal = context.sink.arrive(call_id, trajectory_id)
            record = CallRecord(call_id, trajectory_id, route, received_at, seq=ordinal)
        record.tags = tags
        record.group_id = None if rl_headers is None else rl_headers.group_id
        record.request = prepared.request
        record.model = prepared.model
        record.stream = prepared.ask.stream
        self.record = record
        self.capture = ResponseCapture(record, prepared.ask, chat=route == CHAT_ROUTE)
        # With the recorder process, vLLM's answer is passed on unread and read there, unless
        # something here needs it when the call ends (``_keep_answer_unread``).
        self.raw = context.sink.reads_answers
        self.tap: StreamTap | None = None
        self.state = CallState()
        self.running: RunningCall | None = None  # the RL loop's view of this call while it runs
        policy = None if rl_headers is None else rl_headers.policy_version
        if context.rl is not None:
            self.state.on_target = lambda upstream: self._sent_to(upstream, policy)
        elif policy is not None:
            record.weight_version = policy
        self.sealed = False

    async def run(self, receive: Any) -> None:
        """The call's whole life; every way it can end is one ``except`` clause here."""
        state = self.state
        watcher = watch_client(self.scope, receive, state)
        try:
            if self.context.rl is not None and self.context.rl.gate.paused:  # (no coroutine otherwise)
                await self._pass_the_gate()
            upstream, body = await self._open()
            self.record.status_code = upstream.status_code
            if upstream.status_code == 200 and upstream.content_type.startswith("text/event-stream"):
                await self._relay_stream(upstream)
            else:
                await self._relay_body(upstream, body)
        except _HeldTooLong:
            rl = self.context.rl
            assert rl is not None
            self._end(Outcome.PAUSED, "held past TOKENTRAIL_PAUSE_MAX_WAIT_S while training was paused")
            self.record.status_code = 503
            await self.seal()
            await send_error(self.send, PausedTooLongError(rl.pause_max_wait_s))
        except UpstreamError as exc:
            self._end(transport_outcome(exc), error_text(exc))
            if state.response_started:  # the status is out: the stream ends abruptly, as vLLM's would
                await self.seal()
            else:
                error = transport_error(exc)
                self.record.status_code = error.status_code
                await self.seal()
                await send_error(self.send, error)
        except ClientStalled:
            timeout_s = self.context.send_timeout_s
            self._end(Outcome.CLIENT_TOO_SLOW, f"the client took nothing for {timeout_s:g} s; cut off")
            cut_off(self.scope)
        except asyncio.CancelledError:
            if absorb_disconnect(state):
                self._end(Outcome.CLIENT_DISCONNECTED)
            else:
                self._end(Outcome.PROXY_SHUTDOWN)
                raise
        except Exception as exc:  # a bug of ours: record it, answer 502 without details
            logger.error(
                "call_id=<%s>, error=<%s> | proxy error while relaying",
                self.record.call_id,
                type(exc).__name__,
            )
            logger.debug("call_id=<%s> | proxy error details", self.record.call_id, exc_info=exc)
            self._end(Outcome.PROXY_ERROR, f"proxy error: {type(exc).__name__}")
            if not state.response_started:
                await send_error(self.send, proxy_failed())
        finally:
            watcher.cancel()
            await state.close_upstream()
            await self.seal(wait=False)  # (no-op when sealed before the last bytes, as it should be)
            state.release_target()

    async def _pass_the_gate(self) -> None:
        """Wait while the fleet is paused (only then: no coroutine per call on the hot path);
        ``_HeldTooLong`` past ``TOKENTRAIL_PAUSE_MAX_WAIT_S``."""
        rl = self.context.rl
        if rl is not None and rl.gate.paused and not await rl.admit():
            raise _HeldTooLong

    def _end(self, outcome: Outcome, error: str | None = None) -> None:
        """Name how the call ended; ignored once the record is sealed (it is the writer's then)."""
        if self.sealed:
            return
        self.record.outcome = outcome
        if error is not None:
            self.record.error = error

    async def seal(self, *, wait: bool = True) -> None:
        """Finish the record and hand it to the writer, once: right before the answer's last bytes
        go out, or when the call ends without them. Durable mode with ``wait``: until it is stored."""
        if self.sealed:
            return
        self.sealed = True
        record = self.record
        stored: asyncio.Future[bool] | None = None
        if self.context.durable and wait:
            loop = asyncio.get_running_loop()
            stored = loop.create_future()
            future = stored

            def notify(ok: bool) -> None:  # called from the writer thread
                loop.call_soon_threadsafe(_settle, future, ok)

            record.on_stored = notify
        if self.state.target is not None:
            record.upstream = self.state.target.url
        if self.context.identities is not None:  # for the call's certificate (recording/certificate.py)
            record.upstream_identity = self.context.identities.of(record.upstream, record.model)
        record.finished_at = time.time()
        if self.raw:
            if self.tap is not None:
                answer = self.tap.answer_bytes()
                record.answer = RawAnswer(answer, True, self.capture.chat, self.capture.ask)
            if not self._keep_answer_unread():
                read_raw_answer(record)  # read here after all: the same reading the recorder does
            generated = max((len(c.token_ids) for c in record.choices), default=0)
        else:
            self.capture.finish(record.outcome == Outcome.OK)
            generated = self.capture.generated_so_far()
        if self.running is not None and self.context.rl is not None:
            self.context.rl.end(self.running, generated)
        if self.context.token_in is not None:  # token-in: keep the call for its trajectory's next one
            self.context.token_in.finished(record)
        if self.context.spans is not None:  # the span carries the IDs: parsed now, integrity final
            record.load_prompt_ids()
            self.context.spans.record(record, self.scope["headers"])
        logger.info(
            "call_id=<%s>, trajectory=<%s>, route=<%s>, status=<%s>, outcome=<%s>, integrity=<%s%s> "
            "| recorded",
            record.call_id,
            record.trajectory_id,
            self.route,
            record.status_code,
            record.outcome,
            record.integrity,
            " (prompt IDs counted when written)" if record.prompt_count_unchecked else "",
        )
        # From here on the record is the writer's alone (records.py: load_prompt_ids)
        self.context.sink.submit(record)
        if stored is not None:
            await stored

    def _keep_answer_unread(self) -> bool:
        """Whether nothing here needs the answer read once the call ends: no span, no token-in for
        the call or its trajectory, no version change while it ran and no abort pause."""
        context = self.context
        if context.spans is not None:
            return False
        if context.token_in is not None and context.token_in.reads_replies(
            self.scope["headers"], self.record
        ):
            return False
        return self.running is None or context.rl is None or not context.rl.reads_answer(self.running)

    def _generated_so_far(self) -> int:
        """Tokens generated so far (the RL loop asks when the version changes while the call runs)."""
        if self.tap is None or not self.raw:
            return self.capture.generated_so_far()
        counted = ResponseCapture(
            CallRecord("", "", self.route, 0.0), self.capture.ask, chat=self.capture.chat
        )
        StreamTap(counted, strip=False).feed(self.tap.answer_bytes())  # (a cut event is not counted)
        return counted.generated_so_far()

    async def _open(self) -> tuple[UpstreamResponse, bytes | None]:
        """Send the call to vLLM; the response, and its body when it had to be read here.

        When the proxy added ``return_token_ids`` and vLLM rejects the request as invalid (400/422),
        the error is read. If the flag can have shaped it (the error names the flag, or it is a
        request-validation error, whose message describes the request: "input: '<dict of 2 items>'"),
        the client's own bytes are sent instead, so the client gets the error vLLM gives its own
        request, word for word. Any other error (max_tokens too large, prompt too long, unknown tool)
        comes from the request's meaning, which the flag does not change: it stands as it is, and
        nothing is sent twice.
        """
        response = await self._open_token_in()
        if response is not None:
            return response, None
        response = await self._send(self.body)
        if not self.strip or response.status_code not in _VALIDATION_STATUSES:
            return response, None
        body = await self._read_whole(response)
        if not any(marker in body for marker in _FLAG_SHAPED):
            return response, body
        await self.state.close_upstream()
        self.strip = False
        return await self._send(self.original), None

    async def _open_token_in(self) -> UpstreamResponse | None:
        """Token-in (``proxy/token_in/``): send the body with the trajectory's exact prompt IDs when
        the call continues it; None when it does not, or when vLLM refused that body (a 4xx, given
        before vLLM ran anything: the call's own body is then sent, once)."""
        token_in = self.context.token_in
        if token_in is None:
            return None
        rewritten = await token_in.rewrite(self.scope["headers"], self.record, self.body)
        # Building the prompt read the database and rendered through vLLM: a pause may have come
        # meanwhile, and this call is not yet one that a pause waits for. Checked again here, with
        # no await until the upstream is picked (and the RL loop counts the call as running).
        if self.context.rl is not None and self.context.rl.gate.paused:
            await self._pass_the_gate()
        if rewritten is None:
            return None
        response = await self._send(rewritten)
        if 400 <= response.status_code < 500:
            await self.state.close_upstream()
            self.state.upstream = None
            token_in.refused(self.record, response.status_code)
            return None
        return response

    def _sent_to(self, upstream: Upstream, policy: str | None) -> None:
        """The RL loop notes the policy version each attempt is sent under (the last one counts)."""
        rl = self.context.rl
        assert rl is not None
        if self.running is not None:
            rl.forget(self.running)
        self.running = rl.begin(self.record, upstream.url, policy, self._generated_so_far)

    async def _send(self, body: bytes) -> UpstreamResponse:
        headers = upstream_request_headers(self.scope["headers"], recorded=True)
        record = self.record
        trajectory_id = None if record.seq is None else record.trajectory_id  # generated ids: balance
        record.upstream_sent_at = time.time()  # the proxy's own time is the rest (metrics)
        return await open_upstream(
            self.context,
            self.scope,
            self.state,
            "POST",
            self.route.encode(),
            headers,
            body,
            trajectory_id,
            resend_if_stale=True,  # only ever when nothing of it can have been processed
        )

    async def _read_whole(self, upstream: UpstreamResponse) -> bytes:
        record = self.record
        chunks: list[bytes] = []
        async for chunk in upstream.iter_raw():
            if record.upstream_first_byte_at is None:
                record.upstream_first_byte_at = time.time()
            chunks.append(chunk)
        record.upstream_last_byte_at = time.time()
        return b"".join(chunks)

    async def _relay_body(self, upstream: UpstreamResponse, body: bytes | None) -> None:
        """A whole answer: read, captured, then sent as one write (head and body)."""
        if body is None:
            body = await self._read_whole(upstream)
        if upstream.status_code == 200:
            if self.raw:
                self.record.answer = RawAnswer(body, False, self.capture.chat, self.capture.ask)
            else:
                self.capture.feed_body(body)
            if self.strip:
                body = strip_token_ids(body)
        else:
            self._end(Outcome.UPSTREAM_ERROR, error_message(body))
        headers = strip_hop_by_hop(upstream.raw_headers, _NO_LENGTH)
        headers.append((b"content-length", str(len(body)).encode()))
        state, send = self.state, self.send
        state.response_started = True

        async def answer() -> None:
            await send(start_message(upstream.status_code, headers))
            await self.seal()
            state.response_done = True
            await send(body_message(body, more=False))

        hooks = hooks_of(self.scope)
        if hooks is None:
            await answer()
        else:
            await hooks.whole_response(answer)  # head and body in one write

    async def _relay_stream(self, upstream: UpstreamResponse) -> None:
        """A stream: each upstream read goes out as it arrives (straight from the upstream's read
        callback under TokenTrail's protocol), fed to the capture on the way."""
        record, state, send = self.record, self.state, self.send
        tap = StreamTap(None if self.raw else self.capture, self.strip, chat=self.capture.chat)
        self.tap = tap
        timeout_s = self.context.send_timeout_s
        state.response_started = True
        await send(start_message(upstream.status_code, strip_hop_by_hop(upstream.raw_headers, _NO_LENGTH)))
        hooks = hooks_of(self.scope)
        direct = None if hooks is None else hooks.direct_body(self.scope["method"])
        try:
            if direct is not None:

                def relay_chunk(chunk: bytes) -> bool:  # runs in the upstream's read callback
                    if record.upstream_first_byte_at is None:
                        record.upstream_first_byte_at = time.time()
                    out = tap.feed(chunk)
                    return direct.write(out) if out else True

                await upstream.pump(relay_chunk, drain_within(direct.drain, timeout_s))
            else:
                async for chunk in upstream.iter_raw():
                    if record.upstream_first_byte_at is None:
                        record.upstream_first_byte_at = time.time()
                    out = tap.feed(chunk)
                    if out:
                        await send_within(send, body_message(out, more=True), timeout_s)
        except UpstreamError:
            tap.close()  # what came before the break is kept
            raise
        record.upstream_last_byte_at = time.time()
        rest = tap.close()
        if record.error is not None:  # vLLM sent an error event
            self._end(Outcome.UPSTREAM_ERROR)
        await self.seal()
        state.response_done = True
        await send(body_message(rest, more=False))


def _settle(future: asyncio.Future[bool], stored: bool) -> None:
    if not future.done():
        future.set_result(stored)
