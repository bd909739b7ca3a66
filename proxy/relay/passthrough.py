"""A call TokenTrail does not record (every route but the two completion routes): forwarded as it is.

Method, path, query, body and headers go to vLLM unchanged (hop-by-hop headers aside), and vLLM's
status, headers and body come back unchanged, streamed as they arrive. Nothing is recorded. Only an
idempotent method may be sent again under the re-send rule (``call``): ``/v1/load_lora_adapter``,
``/pause`` and the like are never sent twice.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tokentrail.proxy.relay.call import (
    IDEMPOTENT_METHODS,
    CallState,
    ClientStalled,
    RelayContext,
    absorb_disconnect,
    cut_off,
    open_upstream,
    send_within,
    watch_client,
)
from tokentrail.proxy.relay.headers import strip_hop_by_hop, upstream_request_headers
from tokentrail.proxy.relay.responses import (
    body_message,
    proxy_failed,
    send_error,
    start_message,
    transport_error,
)
from tokentrail.proxy.rl.weights import is_control_path
from tokentrail.proxy.upstream.errors import UpstreamError

logger = logging.getLogger(__name__)


async def relay_passthrough(
    context: RelayContext,
    scope: dict[str, Any],
    receive: Any,
    send: Any,
    raw_path: bytes,
    body: bytes,
    trajectory_id: str | None,
) -> None:
    """Forward one call and its answer; errors before the answer are answered in the OpenAI shape."""
    state = CallState()
    watcher = watch_client(scope, receive, state)
    method: str = scope["method"]
    timeout_s = context.send_timeout_s
    try:
        headers = upstream_request_headers(scope["headers"], recorded=False)
        try:
            upstream = await open_upstream(
                context,
                scope,
                state,
                method,
                raw_path,
                headers,
                body,
                trajectory_id,
                resend_if_stale=method in IDEMPOTENT_METHODS,
            )
        except UpstreamError as exc:
            await send_error(send, transport_error(exc))
            return
        # a control call that changes or tells the policy version: its answer is kept to learn it
        path = raw_path.decode("latin-1")
        rl = context.rl
        answer: list[bytes] | None = [] if rl is not None and is_control_path(path) else None
        try:
            state.response_started = True
            await send(start_message(upstream.status_code, strip_hop_by_hop(upstream.raw_headers)))
            async for chunk in upstream.iter_raw():
                if answer is not None:
                    answer.append(chunk)
                await send_within(send, body_message(chunk, more=True), timeout_s)
            state.response_done = True
            if answer is not None and rl is not None and state.target is not None:
                learned = b"".join(answer)
                await rl.observed(state.target.url, method, path, body, upstream.status_code, learned)
            await send(body_message(b"", more=False))
        except UpstreamError as exc:
            logger.warning(
                "path=<%s>, error=<%s> | upstream failed mid-response", scope["path"], type(exc).__name__
            )
        except ClientStalled:
            logger.warning(
                "path=<%s>, send_timeout_s=<%s> | client stopped reading; cut off", scope["path"], timeout_s
            )
            cut_off(scope)
    except asyncio.CancelledError:
        if not absorb_disconnect(state):
            raise
    except Exception as exc:  # a bug of ours: never a stack trace to the client or the log
        logger.error("path=<%s>, error=<%s> | proxy error while relaying", scope["path"], type(exc).__name__)
        logger.debug("path=<%s> | proxy error details", scope["path"], exc_info=exc)
        if not state.response_started:
            await send_error(send, proxy_failed())
    finally:
        watcher.cancel()
        await state.close_upstream()
        state.release_target()
