"""The reference point: a straightforward FastAPI + httpx passthrough, the way most proxies start.

Kept deliberately plain (one catch-all route, a default ``httpx.AsyncClient``, ``StreamingResponse``)
so the benchmark shows what TokenTrail's hot-path work buys. It records nothing.

Run: ``NAIVE_UPSTREAM=http://127.0.0.1:8100 uvicorn bench.naive_proxy:app --port 8200``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

UPSTREAM = os.environ.get("NAIVE_UPSTREAM", "http://127.0.0.1:8100")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.client = httpx.AsyncClient(base_url=UPSTREAM, timeout=None)  # noqa: S113 - streams may take minutes
    yield
    await app.state.client.aclose()


app = FastAPI(lifespan=lifespan)


@app.api_route("/{path:path}", methods=["GET", "POST"])
async def passthrough(path: str, request: Request) -> Response:
    client: httpx.AsyncClient = request.app.state.client
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
    upstream_request = client.build_request(
        request.method, "/" + path, headers=headers, content=await request.body()
    )
    upstream = await client.send(upstream_request, stream=True)
    out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        finally:
            await upstream.aclose()

    return StreamingResponse(body(), status_code=upstream.status_code, headers=out_headers)
