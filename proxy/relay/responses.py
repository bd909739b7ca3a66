"""The answers the relay gives itself, and how a failed upstream call maps to an answer and an outcome.

Every error answer is written here once: the OpenAI error shape of ``errors.ProxyRequestError``,
with ``content-length`` and TokenTrail's own ``date`` and ``server`` (``server/own_headers``).
"""

from __future__ import annotations

from typing import Any

from tokentrail.proxy import jsonio
from tokentrail.proxy.errors import ProxyRequestError, UpstreamTimeoutError, UpstreamUnreachableError
from tokentrail.proxy.recording.records import Outcome
from tokentrail.proxy.server.own_headers import own_headers
from tokentrail.proxy.upstream.errors import UpstreamConnectError, UpstreamError, UpstreamReadTimeout

Message = dict[str, Any]

MAX_ERROR_TEXT = 2000
_JSON = (b"content-type", b"application/json")


def start_message(status: int, headers: list[tuple[bytes, bytes]]) -> Message:
    return {"type": "http.response.start", "status": status, "headers": headers}


def body_message(body: bytes, *, more: bool) -> Message:
    return {"type": "http.response.body", "body": body, "more_body": more}


async def send_error(send: Any, error: ProxyRequestError) -> None:
    """Answer ``error`` in the OpenAI shape (the whole answer: head and body)."""
    body = error.body()
    headers = [*own_headers(), _JSON, (b"content-length", str(len(body)).encode()), *error.headers]
    await send(start_message(error.status_code, headers))
    await send(body_message(body, more=False))


def proxy_failed() -> ProxyRequestError:
    """The answer for a bug of ours: a 502 without details (they go to the log at debug)."""
    return UpstreamUnreachableError("the proxy failed to relay this call")


def transport_error(exc: UpstreamError) -> ProxyRequestError:
    """The answer for a failed upstream call: 504 for silence, else 502."""
    if isinstance(exc, UpstreamReadTimeout):
        return UpstreamTimeoutError("the upstream vLLM server did not answer in time")
    return UpstreamUnreachableError("the upstream vLLM server could not be reached or closed the connection")


def transport_outcome(exc: UpstreamError) -> Outcome:
    """The record's outcome for a failed upstream call.

    No connection at all is ``upstream_unreachable``; a connection that closed or broke after the
    request went out is ``upstream_died``, whether or not an answer had begun.
    """
    if isinstance(exc, UpstreamReadTimeout):
        return Outcome.UPSTREAM_TIMEOUT
    if isinstance(exc, UpstreamConnectError):
        return Outcome.UPSTREAM_UNREACHABLE
    return Outcome.UPSTREAM_DIED


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_TEXT]


def error_message(body: bytes) -> str:
    """The message of an OpenAI-shaped error body, or its text."""
    try:
        parsed = jsonio.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body[:MAX_ERROR_TEXT].decode("utf-8", "replace")
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return str(parsed["error"].get("message"))[:MAX_ERROR_TEXT]
    return body[:MAX_ERROR_TEXT].decode("utf-8", "replace")
