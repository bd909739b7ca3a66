"""``create_app(settings)``: TokenTrail's own FastAPI routes in front of the relay, and their lifespan.

Paths under ``/tokentrail/`` go to FastAPI (health, metrics, the trajectory API, the viewer, docs); every
other path goes to the plain-ASGI relay, which forwards it to vLLM. The lifespan opens the database, the
writer (with the metrics' call counters watching its records) and the one shared upstream client, and
on shutdown waits for open calls, then drains the writer.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine

from tokentrail.proxy import __version__
from tokentrail.proxy.api import control, detokenize, health, metrics, trajectories
from tokentrail.proxy.api.detokenize import TokenPieces
from tokentrail.proxy.api.trajectories import bearer_matches
from tokentrail.proxy.errors import openai_error_body
from tokentrail.proxy.fleet.link import FleetLink
from tokentrail.proxy.fleet.replicas import ControlStore, ReplicaFleet
from tokentrail.proxy.metrics import snapshot
from tokentrail.proxy.metrics.exposition import make_registry
from tokentrail.proxy.recorder.assembly import make_writer
from tokentrail.proxy.recorder.keeper import RecorderKeeper
from tokentrail.proxy.recorder.link import RecorderLink
from tokentrail.proxy.recording.telemetry import CallSpans, tracer_provider_from_environment
from tokentrail.proxy.recording.writer import RecordWriter
from tokentrail.proxy.relay.asgi import Relay
from tokentrail.proxy.rl.loop import RlLoop
from tokentrail.proxy.server import worker_state
from tokentrail.proxy.server.own_headers import WithOwnHeaders, own_headers
from tokentrail.proxy.server.workers import spool_of
from tokentrail.proxy.settings import Settings
from tokentrail.proxy.storage.engine import make_engine
from tokentrail.proxy.storage.retention import Retention
from tokentrail.proxy.token_in.planner import TokenIn
from tokentrail.proxy.ui import routes as ui
from tokentrail.proxy.upstream.balancer import UpstreamBalancer
from tokentrail.proxy.upstream.client import ignored_proxy_variables
from tokentrail.proxy.upstream.configured import upstream_client
from tokentrail.proxy.upstream.identity import UpstreamIdentities

logger = logging.getLogger(__name__)

OWN_PREFIX = "/tokentrail/"
API_PREFIX = "/tokentrail/v1"
METRICS_PATH = "/tokentrail/metrics"
_DRAIN_AFTER_SHUTDOWN_S = 10.0


@dataclass
class Runtime:
    """What lives from startup to shutdown; the routes reach it through ``app.state.runtime``."""

    settings: Settings
    engine: Engine
    writer: RecordWriter | RecorderLink  # this process's writer thread, or its link to the recorder
    relay: Relay
    worker: int | None = None  # the worker's slot under ``serve --workers N``
    metrics_registry: CollectorRegistry | None = None
    token_pieces: TokenPieces | None = None  # the viewer's decoded tokens
    last_counts: Any = None  # the metric counts last read from the database (served while it is down)
    retention: Retention | None = None  # TOKENTRAIL_RETENTION_DAYS (the first worker only)


class TokenTrailApp:
    """Sends ``/tokentrail/...`` and lifespan events to FastAPI, everything else to the relay."""

    def __init__(self, api: FastAPI, *, metrics_require_key: bool = False) -> None:
        self.api = api
        self.metrics_require_key = metrics_require_key
        self._own = WithOwnHeaders(api)  # TokenTrail's own answers carry uvicorn's date and server

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not scope["path"].startswith(OWN_PREFIX):
            runtime: Runtime | None = getattr(self.api.state, "runtime", None)
            if runtime is None:
                await _not_ready(send)
                return
            key = runtime.settings.api_key
            if (
                key is not None
                and _controls_vllm(scope)
                and not bearer_matches(scope["headers"], key.get_secret_value())
            ):
                await _unauthorized(send)  # the RL control plane is as guarded as TokenTrail's own
                return
            await runtime.relay(scope, receive, send)
            return
        if scope["type"] == "http" and self._guarded(scope["path"]):
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

    def _guarded(self, path: str) -> bool:
        """Whether ``path`` needs the API key (when one is set): the trajectory API, and the metrics
        when TOKENTRAIL_METRICS_REQUIRE_KEY says so."""
        if path.startswith(API_PREFIX):
            return True
        return path == METRICS_PATH and self.metrics_require_key


# vLLM's routes that pause, abort or change the served weights (VLLM_SERVER_DEV_MODE=1): with an API key
# set they need it, like /tokentrail/v1/pause, so an agent or its tools cannot stop the fleet or
# rewrite the versions that the records carry.
VLLM_CONTROL_PATHS = frozenset(
    {
        "/pause",
        "/resume",
        "/update_weight_version",
        "/finish_weight_update",
        "/start_weight_update",
        "/update_weights",
        "/init_weight_transfer_engine",
        "/sleep",
        "/wake_up",
        "/collective_rpc",
    }
)


def _controls_vllm(scope: dict[str, Any]) -> bool:
    path: str = scope["path"]
    if path.startswith("/t/"):  # the /t/<id> prefix is removed before forwarding
        rest = path.find("/", 3)
        path = "/" if rest == -1 else path[rest:]
    return path in VLLM_CONTROL_PATHS


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
    settings: Settings,
    tracer_provider: TracerProvider | None = None,
    worker: int | None = None,
    fleet_socket: Path | None = None,
    recorder_socket: Path | None = None,
) -> TokenTrailApp:
    """Build the proxy for ``settings``; the database must already be migrated.

    ``tracer_provider`` turns on spans (tests pass one); without it the OTEL_* variables decide.
    ``worker``: this process's slot when it is one of several (``serve --workers``);
    ``fleet_socket``: then where the supervisor's control plane listens (``proxy/fleet/``);
    ``recorder_socket``: then where the host's recorder process listens (``TOKENTRAIL_RECORDER=process``;
    a single proxy starts its own).
    """
    provider = tracer_provider or tracer_provider_from_environment(os.environ)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.db, settings.db_busy_timeout_ms)
        keeper: RecorderKeeper | None = None
        writer: RecordWriter | RecorderLink
        if settings.recorder == "process":
            socket_path = recorder_socket
            if socket_path is None:  # a single proxy: its own recorder
                keeper = RecorderKeeper({**os.environ, **settings.environment()})
                keeper.start()
                socket_path = keeper.path
            writer = RecorderLink(
                socket_path,
                spool_of(settings, worker or 0),
                max_unacked=settings.writer_queue_size,
                wait_s=settings.recorder_wait_s,
                spool_max_bytes=settings.spool_max_bytes,
                reject_when_spool_full=settings.spool_full == "reject",
            )
            await writer.start()
        else:
            writer = make_writer(settings, engine, spool_of(settings, worker or 0))
            writer.start()
        for name in ignored_proxy_variables(os.environ):
            logger.warning("variable=<%s> | set, but not used: TokenTrail connects to vLLM directly", name)
        client = upstream_client(settings)
        balancer = UpstreamBalancer(settings.upstreams)
        rl_loop = RlLoop(
            balancer, client, settings.pause_max_wait_s, learn_versions=settings.learn_weight_versions
        )
        identities = UpstreamIdentities(client, [u.url for u in balancer.upstreams])
        token_in = TokenIn(
            enabled=settings.token_in,
            engine=engine,
            client=client,
            upstream_of=lambda trajectory_id: balancer.pick(trajectory_id).url,
            memory_trajectories=settings.token_in_memory_trajectories,
            wait_s=settings.token_in_wait_s,
            tokenize_timeout_s=settings.token_in_tokenize_timeout_s,
            stand_in=settings.token_in_stand_in,
            check_first=settings.token_in_check_first,
            check_every=settings.token_in_check_every,
        )
        if settings.learn_weight_versions:  # (the RL loop relearns its versions itself)
            balancer.on_back.append(identities.upstream_back)
        balancer.on_back.append(token_in.upstream_back)
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
            rl=rl_loop,
            token_in=token_in,
            identities=identities,
        )
        fleet: FleetLink | None = None
        replicas: ReplicaFleet | None = None
        versions: asyncio.Task[None] | None = None
        if fleet_socket is not None:  # pause, resume and versions are the supervisor's to decide
            fleet = FleetLink(fleet_socket, rl_loop)
            await fleet.start()
        else:  # a restarted proxy knows the version (vLLM may come up after it: asked until it answers)
            if settings.fleet_control_in_database:  # and so do the other replicas on the database
                replicas = ReplicaFleet(rl_loop.local_control, ControlStore(engine))
                await replicas.start()
            versions = asyncio.create_task(rl_loop.local_control.learn_versions_until_known())
        learning = (
            asyncio.create_task(identities.learn_until_known()) if settings.learn_weight_versions else None
        )
        watcher = (
            asyncio.create_task(balancer.watch(client, settings.upstream_health_interval_s))
            if len(balancer.upstreams) > 1
            else None
        )
        runtime = Runtime(settings, engine, writer, relay, worker)
        if settings.retention_days is not None and not worker:
            runtime.retention = Retention(engine, settings.retention_days)
            runtime.retention.start()
        runtime.token_pieces = TokenPieces(settings.detokenize_concurrency)
        runtime.metrics_registry = make_registry(lambda: snapshot.all_values(runtime))
        app.state.runtime = runtime
        publisher = (
            None
            if worker is None
            else asyncio.create_task(worker_state.publish_every(runtime, (health.publish, snapshot.publish)))
        )
        logger.info("upstream=<%s>, db=<%s> | TokenTrail ready", settings.upstream, _safe_url(settings.db))
        try:
            yield
        finally:
            if not await relay.in_flight.wait_idle(_DRAIN_AFTER_SHUTDOWN_S):
                logger.error("in_flight=<%d> | calls still open at shutdown", relay.in_flight.count)
            app.state.runtime = None
            for task in (watcher, publisher, versions, learning):
                if task is not None:
                    task.cancel()
            if fleet is not None:
                await fleet.aclose()
            if replicas is not None:
                await replicas.stop()
            await identities.stop()
            await client.aclose()
            if runtime.retention is not None:
                await asyncio.to_thread(runtime.retention.close)
            if isinstance(writer, RecorderLink):
                await writer.close(settings.graceful_shutdown_s)
                if keeper is not None:
                    await asyncio.to_thread(keeper.stop, settings.graceful_shutdown_s)
            else:
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
    api.include_router(metrics.router)
    api.include_router(trajectories.router)
    api.include_router(control.router)
    api.include_router(detokenize.router)
    if settings.viewer:
        api.include_router(ui.router)
    api.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    api.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    api.add_exception_handler(Exception, _internal_error)
    if provider is not None:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(api, tracer_provider=provider)
    return TokenTrailApp(api, metrics_require_key=settings.metrics_require_key)


_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    409: "ConflictError",
    422: "BadRequestError",
    503: "ServiceUnavailableError",
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
