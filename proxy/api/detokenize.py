"""``POST /tokentrail/v1/detokenize``: the text of each token ID, through the upstream's ``/detokenize``.

The viewer shows a training sequence token by token. vLLM's ``/detokenize`` turns a list of IDs into
one string, so each distinct ID is asked for on its own, ``TOKENTRAIL_DETOKENIZE_CONCURRENCY`` at once
(3,066 IDs from the fake upstream: 8.9 s 16 at a time, 2.2 s 64 at a time), and the answer is cached
by (model, ID) for the life of the process: a trajectory of 20,000 tokens has a few thousand distinct
IDs, and the next trajectory of the same model mostly reuses them. An ID the upstream cannot decode
comes back as ``null`` (and is not cached, so it is tried again next time).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from tokentrail.proxy import jsonio
from tokentrail.proxy.api.trajectories import require_api_key
from tokentrail.proxy.upstream.client import UpstreamClient, UpstreamError

logger = logging.getLogger(__name__)

MAX_IDS = 100_000
CACHE_SIZE = 500_000  # (model, ID) pairs kept; a piece is a few bytes
TIMEOUT_S = 10.0

router = APIRouter(prefix="/tokentrail/v1", tags=["tokens"], dependencies=[Depends(require_api_key)])


class DetokenizeIn(BaseModel):
    token_ids: Annotated[list[int], Field(max_length=MAX_IDS, description="IDs to decode, each alone.")]
    model: str | None = Field(None, description="The model whose tokenizer to use (the calls' 'model').")


class DetokenizeOut(BaseModel):
    pieces: dict[str, str | None] = Field(description="Each distinct ID's text; null where it is unknown.")


class TokenPieces:
    """An LRU cache of token texts by (model, ID), filled from the upstream on a miss."""

    def __init__(self, concurrency: int, size: int = CACHE_SIZE) -> None:
        self._concurrency = concurrency  # requests to the upstream at once, per call of the route
        self._size = size
        self._cache: OrderedDict[tuple[str | None, int], str] = OrderedDict()

    async def pieces(
        self, client: UpstreamClient, upstream: str, model: str | None, token_ids: list[int]
    ) -> dict[int, str | None]:
        found: dict[int, str | None] = {}
        missing: list[int] = []
        for token_id in dict.fromkeys(token_ids):
            text = self._cache.get((model, token_id))
            if text is None:
                missing.append(token_id)
            else:
                self._cache.move_to_end((model, token_id))
                found[token_id] = text
        gate = asyncio.Semaphore(self._concurrency)

        async def one(token_id: int) -> None:
            async with gate:
                text = await _detokenize(client, upstream, model, token_id)
            found[token_id] = text
            if text is not None:
                self._cache[(model, token_id)] = text
                if len(self._cache) > self._size:
                    self._cache.popitem(last=False)

        await asyncio.gather(*(one(t) for t in missing))
        return found


async def _detokenize(client: UpstreamClient, upstream: str, model: str | None, token_id: int) -> str | None:
    body: dict[str, Any] = {"tokens": [token_id]}
    if model:
        body["model"] = model
    try:
        response = await client.send(
            "POST",
            upstream + "/detokenize",
            [(b"content-type", b"application/json")],
            jsonio.dumps_text(body).encode(),
            timeout_s=TIMEOUT_S,
        )
        try:
            raw = b"".join([chunk async for chunk in response.iter_raw()])
        finally:
            await response.aclose()
    except UpstreamError as exc:
        logger.warning("upstream=<%s>, error=<%s> | detokenize failed", upstream, type(exc).__name__)
        return None
    if response.status_code != 200:
        return None
    try:
        text = jsonio.loads(raw).get("prompt")
    except (ValueError, AttributeError):
        return None
    return text if isinstance(text, str) else None


@router.post("/detokenize", response_model=DetokenizeOut)
async def detokenize(request: Request, body: DetokenizeIn) -> DetokenizeOut:
    """The text of each token ID (cached; the upstream is asked once per distinct ID and model)."""
    runtime = request.app.state.runtime
    upstream = runtime.relay.balancer.pick(None).url
    found = await runtime.token_pieces.pieces(runtime.relay.client, upstream, body.model, body.token_ids)
    return DetokenizeOut(pieces={str(token_id): text for token_id, text in found.items()})
