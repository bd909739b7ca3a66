"""``create_app(settings)``: TokenTrail's own FastAPI routes in front of the relay, and their lifespan.

Paths under ``/tokentrail/`` go to FastAPI (health, docs); every other path goes to the plain-ASGI
relay, which forwards it to vLLM. The lifespan opens the database, the writer and the one shared
upstream client, and on shutdown waits for open calls, then drains the writer.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import Engine

from tokentrail.proxy import __version__
from tokentrail.proxy.api import health, trajectories
from tokentrail.proxy.api.trajectories import bearer_matches
from tokentrail.proxy.errors import openai_error_body
from tokentrail.proxy.recording.telemetry import CallSpans, tracer_provider_from_environment
from tokentrail.proxy.recording.writer import GATHER_S, RecordWriter
from tokentrail.proxy.relay.asgi import Relay
from tokentrail.proxy.server.own_headers import WithOwnHeaders, own_headers
from tokentrail.proxy.server.workers import worker_spool_path
from tokentrail.proxy.settings import Settings
from tokentrail.proxy.storage.engine import make_engine
from tokentrail.proxy.upstream.balancer import UpstreamBalancer
from tokentrail.proxy.upstream.client import UpstreamClient, ignored_proxy_variables

logger = logging.getLogger(__name__)

OWN_PREFIX = "/tokentrail/"
API_PREFIX = "/tokentrail/v1"
_DRAIN_AFTER_SHUTDOWN_S = 10.0


def upstream_client(settings: Settings) -> UpstreamClient:
    """The one client to vLLM: no total deadline, no redirects, a keep-alive below vLLM's own."""
    return UpstreamClient(
        connect_timeout_s=settings.upstream_connect_timeout,
        read_timeout_s=settings.upstream_read_timeout,
        max_connections=settings.upstream_max_connections,
        keepalive_s=settings.upstream_keepalive_expiry,
    )


@dataclass
class Runtime:
    """What lives from startup to shutdown; the routes reach it through ``app.state.runtime``."""

    settings: Settings
    engine: Engine
    writer: RecordWriter
    relay: Relay
    worker: int | None = None  # the worker's slot under ``serve --workers N``


class TokenTrailApp:
    """Sends ``/tokentrail/...`` and lifespan events to FastAPI, everything else to the relay."""

    def __init__(self, api: FastAPI) -> None:
        self.api = api
        self._own = WithOwnHeaders(api)  # TokenTrail's own answers carry uvicorn's date and server

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not scope["path"].startswith(OWN_PREFIX):
            runtime: Runtime | None = getattr(self.api.state, "runtime", None)
            if runtime is None:
                await _not_ready(send)
                return
            await runtime.relay(scope, receive, send)
            return
        if scope["type"] == "http" and scope["path"].startswith(API_PREFIX):
            runtime = getattr(self.api.state, "runtime", None)
            key = None if runtime is None else runtime.settings.api_key
            # Before FastAPI reads anything: a caller without the key learns nothing, not even
            # whether its body or parameters would have been valid.
            if key is not None and not bearer_matches(scope["headers"], key.get_secret_value()):
                await _unauthorized(send)
                return
        try:
            await self._own(scope, receive, send)
        except Exception as exc:  # already answered 500 by Starlette; keep the trace out of the log
            logger.error(
                "path=<%s>, error=<%s> | TokenTrail route failed", scope.get("path"), type(exc).__name__
            )
            logger.debug("path=<%s> | TokenTrail route failure details", scope.get("path"), exc_info=exc)


async def _unauthorized(send: Any) -> None:
    body = openai_error_body(
        "a valid 'Authorization: Bearer <TOKENTRAIL_API_KEY>' header is required", "AuthenticationError", 401
    )
    headers = [
        *own_headers(),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b"Bearer"),
    ]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _not_ready(send: Any) -> None:
    body = openai_error_body("TokenTrail is starting or stopping", "ServiceUnavailableError", 503)
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [*own_headers(), (b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_app(
    settings: Settings, tracer_provider: TracerProvider | None = None, worker: int | None = None
) -> TokenTrailApp:
    """Build the proxy for ``settings``; the database must already be migrated.

    ``tracer_provider`` turns on spans (tests pass one); without it the OTEL_* variables decide.
    ``worker``: this process's slot when it is one of several (``serve --workers``).
    """
    provider = tracer_provider or tracer_provider_from_environment(os.environ)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.db, settings.db_busy_timeout_ms)
        writer = RecordWriter(
            engine,
            queue_size=settings.writer_queue_size,
            batch_size=settings.writer_batch_size,
            retries=settings.writer_retries,
            fallback_path=worker_spool_path(settings.fallback_path, worker or 0),
            # Durable calls wait for their commit: write what is queued at once (records that arrive
            # meanwhile form the next batch) instead of gathering for a moment first.
            gather_s=0.0 if settings.durable else GATHER_S,
            spool_max_bytes=settings.spool_max_bytes,
            reject_when_spool_full=settings.spool_full == "reject",
        )
        writer.start()
        for name in ignored_proxy_variables(os.environ):
            logger.warning("variable=<%s> | set, but not used: TokenTrail connects to vLLM directly", name)
        client = upstream_client(settings)
        balancer = UpstreamBalancer(settings.upstreams)
        relay = Relay(
            balancer,
            client,
            writer,
            CallSpans(provider) if provider else None,
            max_body_bytes=settings.max_body_bytes,
            max_concurrent_calls=settings.max_concurrent_calls,
            durable=settings.durable,
            client_body_timeout_s=settings.client_body_timeout_s,
            client_send_timeout_s=settings.client_send_timeout_s,
        )
        watcher = (
            asyncio.create_task(balancer.watch(client, settings.upstream_health_interval_s))
            if len(balancer.upstreams) > 1
            else None
        )
        app.state.runtime = runtime = Runtime(settings, engine, writer, relay, worker)
        publisher = None if worker is None else asyncio.create_task(health.publish_every(runtime))
        logger.info("upstream=<%s>, db=<%s> | TokenTrail ready", settings.upstream, _safe_url(settings.db))
        try:
            yield
        finally:
            if not await relay.in_flight.wait_idle(_DRAIN_AFTER_SHUTDOWN_S):
                logger.error("in_flight=<%d> | calls still open at shutdown", relay.in_flight.count)
            app.state.runtime = None
            for task in (watcher, publisher):
                if task is not None:
                    task.cancel()
            await client.aclose()
            writer.close()
            engine.dispose()
            if provider is not None and tracer_provider is None:
                provider.shutdown()
            logger.info("written=<%d>, failed=<%d> | TokenTrail stopped", writer.written, writer.failed)

    api = FastAPI(
        title="TokenTrail",
        version=__version__,
        description="TokenTrail's own routes. Every other path is forwarded to vLLM unchanged.",
        docs_url="/tokentrail/docs",
        openapi_url="/tokentrail/openapi.json",
        redoc_url=None,
        lifespan=lifespan,
    )
    api.include_router(health.router)
    api.include_router(trajectories.router)
    api.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    api.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    api.add_exception_handler(Exception, _internal_error)
    if provider is not None:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(api, tracer_provider=provider)
    return TokenTrailApp(api)


_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    422: "BadRequestError",
}


def _error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    error = {"message": message, "type": _ERROR_TYPES.get(status, "Error"), "param": param, "code": status}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": error}, status_code=status, headers=headers)


async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
    """TokenTrail's own routes answer errors in the same OpenAI shape as the proxy."""
    return _error_response(exc.status_code, str(exc.detail))


async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
    return _error_response(500, "TokenTrail could not answer this request; see its log")


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in first.get("loc", ()))
    return _error_response(400, f"{param}: {first.get('msg')}", param or None)


def _safe_url(url: str) -> str:
    """The database URL without its password, for logs."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
