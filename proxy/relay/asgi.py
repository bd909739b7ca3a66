"""The relay's ASGI entry: every path that is not TokenTrail's own comes here and goes to vLLM.

Plain ASGI rather than a FastAPI route, for three reasons the pitfalls notes give: the relay must own
``receive`` to notice a client that hangs up *before* vLLM's first byte (Starlette only listens while
it streams), it must close the upstream response deterministically whatever ends the call, and it
is the hot path, so it should not pay for routing, dependency injection or response classes.

Here a call is admitted (the concurrency cap), its body read and its trajectory routed; then it is
either a recorded call (``recorded_call``: exactly one ``CallRecord`` each) or a pass-through
(``passthrough``). What both share is in ``call``, their own error answers in ``responses``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tokentrail.proxy.errors import ProxyRequestError, TooManyCallsError
from tokentrail.proxy.recording.capture import RECORDED_ROUTES
from tokentrail.proxy.recording.telemetry import CallSpans
from tokentrail.proxy.recording.writer import RecordSink
from tokentrail.proxy.relay.call import RelayContext
from tokentrail.proxy.relay.passthrough import relay_passthrough
from tokentrail.proxy.relay.recorded_call import RecordedCall
from tokentrail.proxy.relay.request_body import ClientGone, read_body
from tokentrail.proxy.relay.responses import send_error
from tokentrail.proxy.relay.routing import parse_rl_headers, parse_tags_header, route_path
from tokentrail.proxy.rl.loop import RlLoop
from tokentrail.proxy.server.uvicorn_hooks import hooks_of
from tokentrail.proxy.token_in.planner import TokenIn
from tokentrail.proxy.upstream.balancer import UpstreamBalancer
from tokentrail.proxy.upstream.client import UpstreamClient
from tokentrail.proxy.upstream.identity import UpstreamIdentities

Scope = dict[str, Any]


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
        balancer: UpstreamBalancer,
        client: UpstreamClient,
        sink: RecordSink,
        spans: CallSpans | None = None,
        *,
        max_body_bytes: int = 100 * 2**20,
        max_concurrent_calls: int | None = None,
        durable: bool = False,
        client_body_timeout_s: float = 60.0,
        client_send_timeout_s: float = 60.0,
        token_in: TokenIn | None = None,
        rl: RlLoop | None = None,
        identities: UpstreamIdentities | None = None,
    ) -> None:
        self.context = RelayContext(
            balancer,
            client,
            sink,
            spans,
            durable,
            client_send_timeout_s,
            token_in=token_in,
            rl=rl,
            identities=identities,
        )
        self.token_in = token_in
        self.rl = rl
        self.client_body_timeout_s = client_body_timeout_s
        self.max_body_bytes = max_body_bytes
        self.max_concurrent_calls = max_concurrent_calls
        self.balancer = balancer
        self.client = client
        self.sink = sink
        self.in_flight = InFlight()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if self.max_concurrent_calls is not None and self.in_flight.count >= self.max_concurrent_calls:
            error = TooManyCallsError(f"more than {self.max_concurrent_calls} calls are open; retry shortly")
            await send_error(send, error)
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
            body = await read_body(
                receive, headers, self.max_body_bytes, self.client_body_timeout_s, hooks_of(scope)
            )
        except ProxyRequestError as exc:
            await send_error(send, exc)
            return
        except ClientGone:
            return
        path = routed.raw_path.decode("latin-1")
        if scope["method"] == "POST" and path in RECORDED_ROUTES:
            if not self.sink.accepting:
                error = TooManyCallsError("the record spool is full; calls are refused until it drains")
                await send_error(send, error)
                return
            call = RecordedCall(
                self.context, scope, send, path, routed.trajectory_id, body, received_at, tags, rl_headers
            )
            await call.run(receive)
        else:
            await relay_passthrough(
                self.context, scope, receive, send, routed.raw_path, body, routed.trajectory_id
            )


__all__ = ["InFlight", "Relay"]
