"""What every relayed call shares: its settings, its state, the watch on the client, and the one rule
for opening the upstream (when a request may be sent again).

The re-send rule, in one sentence: a request is sent again only when nothing of it can have been
processed (a reused keep-alive connection that failed before the request was fully written, or closed
without a byte of an answer within the stale-connection window), only to the same upstream, once, and
never for a pass-through call whose method is not idempotent; any other failure after the request went
out ends the call with 502 and outcome ``upstream_died``, never with a duplicate. A connection that
could not be made at all sent nothing, so that call may move to another healthy upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tokentrail.proxy.recording.telemetry import CallSpans
from tokentrail.proxy.recording.writer import RecordSink
from tokentrail.proxy.rl.loop import RlLoop
from tokentrail.proxy.server.uvicorn_hooks import RequestHooks, hooks_of
from tokentrail.proxy.token_in.planner import TokenIn
from tokentrail.proxy.upstream.balancer import Upstream, UpstreamBalancer
from tokentrail.proxy.upstream.client import UpstreamClient, UpstreamResponse
from tokentrail.proxy.upstream.errors import UpstreamConnectError, UpstreamError
from tokentrail.proxy.upstream.identity import UpstreamIdentities

Scope = dict[str, Any]
Message = dict[str, Any]

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})  # RFC 9110 9.2.2


class ClientStalled(Exception):
    """The client took nothing of the response for ``send_timeout_s``: it is cut off."""


@dataclass(frozen=True, slots=True)
class RelayContext:
    """What the relay's calls share for the life of the process."""

    balancer: UpstreamBalancer
    client: UpstreamClient
    sink: RecordSink
    spans: CallSpans | None
    durable: bool
    send_timeout_s: float
    token_in: TokenIn | None = None  # token-in (proxy/token_in/): exact prompt IDs for continuing calls
    rl: RlLoop | None = None  # the RL loop (proxy/rl/): pause gate, policy versions
    identities: UpstreamIdentities | None = None  # what each upstream serves (certificates)


@dataclass(slots=True)
class CallState:
    """What the disconnect watcher and the relay share about one call."""

    task: asyncio.Task[Any] | None = None
    response_done: bool = False
    disconnected: bool = False
    response_started: bool = False
    upstream: UpstreamResponse | None = None
    target: Upstream | None = None  # the upstream this call uses (or last tried)
    counted: bool = False  # whether target.in_flight counts this call
    on_target: Callable[[Upstream], None] | None = None  # told which upstream each attempt goes to

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

    async def close_upstream(self) -> None:
        """Give back (or close) the upstream response, whatever ended the call."""
        if self.upstream is not None:
            with contextlib.suppress(UpstreamError):
                await self.upstream.aclose()


class Watch(Protocol):
    def cancel(self) -> Any: ...


class _HookWatch:
    """Stops listening for the client hanging up (the protocol's callback)."""

    __slots__ = ("_hooks",)

    def __init__(self, hooks: RequestHooks) -> None:
        self._hooks = hooks

    def cancel(self) -> None:
        self._hooks.on_disconnect = None


def watch_client(scope: Scope, receive: Any, state: CallState) -> Watch:
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


def absorb_disconnect(state: CallState) -> bool:
    """After a cancel: True (and the cancel is absorbed) when it came from the client hanging up."""
    if not state.disconnected:
        return False
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    return True


async def open_upstream(
    context: RelayContext,
    scope: Scope,
    state: CallState,
    method: str,
    raw_path: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    trajectory_id: str | None,
    *,
    resend_if_stale: bool,
) -> UpstreamResponse:
    """Send the request to the call's upstream, under the re-send rule of this module's docstring.

    ``state.target`` is the upstream last tried (its in-flight count raised until
    ``state.release_target()``), so a failure is recorded against the upstream that failed. A
    connection refused (or timed out) marks its upstream down, unless the cause was this machine's
    own resources (``UpstreamConnectError.local``).
    """
    query: bytes = scope.get("query_string") or b""
    suffix = raw_path + (b"?" + query if query else b"")
    balancer = context.balancer
    upstream = balancer.pick(trajectory_id)
    for attempt in range(2):
        state.take_target(upstream)
        url = (upstream.url_bytes + suffix).decode("latin-1")
        try:
            response = await context.client.send(method, url, headers, body, resend_if_stale=resend_if_stale)
        except UpstreamConnectError as exc:  # nothing was sent: another upstream may take the call
            if exc.local:
                raise
            balancer.mark_down(upstream, type(exc).__name__)
            if attempt == 1 or not balancer.has_alternative(upstream):
                raise
            upstream = balancer.pick(trajectory_id, exclude=upstream)
            continue
        state.upstream = response
        balancer.answered(upstream)
        return response
    raise AssertionError("unreachable")  # pragma: no cover


async def send_within(send: Any, message: Message, timeout_s: float) -> None:
    """``send(message)``, or ``ClientStalled`` when the client takes nothing for ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            await send(message)
    except TimeoutError:
        raise ClientStalled from None


def drain_within(drain: Callable[[], Awaitable[None]], timeout_s: float) -> Callable[[], Awaitable[None]]:
    """``drain`` that gives up with ``ClientStalled`` after ``timeout_s`` without progress."""

    async def drain_or_stall() -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await drain()
        except TimeoutError:
            raise ClientStalled from None

    return drain_or_stall


def cut_off(scope: Scope) -> None:
    """Close a stalled client's connection (under plain uvicorn: uvicorn closes it when the relay
    returns with the response unfinished)."""
    hooks = hooks_of(scope)
    if hooks is not None:
        hooks.on_disconnect = None
        hooks.abort()
