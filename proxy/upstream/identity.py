"""What each upstream serves: model, tokenizer, default chat template and vLLM version, for certificates.

Learned once per upstream (a background task at start, asked again until it answers, as vLLM may come
up after TokenTrail): ``GET /version``, ``GET /v1/models`` (each served name and its ``root``), and for
each model two small ``POST /tokenize`` requests whose token IDs fingerprint what vLLM does not name:
the tokenizer (a fixed probe text) and the default chat template (a fixed probe conversation, with
the generation prompt). Two servers that tokenize and render the probes alike get the same
fingerprints; a changed tokenizer or template almost surely changes them.

A record takes the identity of its upstream and model when it is sealed (``of``): a plain dict read,
nothing on the request path waits for it. Calls before the upstream answered have none, and so
do upstreams that answer ``/v1/models`` with an error (one that needs an API key: TokenTrail sends none).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from typing import Any

from tokentrail.proxy import jsonio
from tokentrail.proxy.upstream.client import UpstreamClient, UpstreamError

logger = logging.getLogger(__name__)

PROBE_TEXT = "TokenTrail probe: Ünïcode 123 4567 \t  spaces\n\n and 😀 <tag> [x]"
PROBE_MESSAGES = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "U2"},
]
_TIMEOUT_S = 10.0
_MAX_MODELS = 16
_MAX_TEXT = 256


def fingerprint(ids: Any) -> str | None:
    """A short hash of a token ID list (None when it is not one)."""
    if not isinstance(ids, list):
        return None
    return hashlib.sha256(jsonio.dumps_text(ids).encode()).hexdigest()[:16]


def _text(value: Any) -> str | None:
    return value[:_MAX_TEXT] if isinstance(value, str) and value.isprintable() else None


class UpstreamIdentities:
    """The identities learned so far: upstream URL -> model name -> fields (event loop writes, the
    relay reads; a whole dict is replaced at once)."""

    def __init__(self, client: UpstreamClient, upstreams: Sequence[str]) -> None:
        self._client = client
        self._upstreams = list(upstreams)
        self._known: dict[str, dict[str, dict[str, str | None]]] = {}
        self._relearning: set[asyncio.Task[None]] = set()

    def of(self, upstream: str | None, model: str | None) -> dict[str, str | None] | None:
        """The identity of ``model`` on ``upstream`` (the only model when ``model`` is not named or
        not served under that name), or None when not learned."""
        models = self._known.get(upstream or "")
        if not models:
            return None
        if model in models:
            return models[model]
        return next(iter(models.values())) if len(models) == 1 else None

    def upstream_back(self, upstream: str) -> None:
        """``upstream`` answered again after it was down (maybe restarted with another model or
        vLLM): forgotten, and asked again in the background until it answers."""
        self._known.pop(upstream, None)
        task = asyncio.get_running_loop().create_task(self.learn_until_known([upstream]))
        self._relearning.add(task)
        task.add_done_callback(self._relearning.discard)

    async def stop(self) -> None:
        """Cancel the learning started by ``upstream_back`` (the client is about to close)."""
        for task in list(self._relearning):
            task.cancel()
        await asyncio.gather(*self._relearning, return_exceptions=True)

    async def learn_until_known(self, upstreams: Sequence[str] | None = None, retry_s: float = 2.0) -> None:
        """Ask every upstream (or those given) until each has answered."""
        pending = list(self._upstreams if upstreams is None else upstreams)
        while pending:
            answers = await asyncio.gather(*(self.learn(url) for url in pending))
            pending = [url for url, ok in zip(pending, answers, strict=True) if not ok]
            if pending:
                await asyncio.sleep(retry_s)

    async def learn(self, upstream: str) -> bool:
        """Ask ``upstream`` now; whether it answered."""
        try:
            version = await self._get(upstream, "GET", "/version", None)
            listed = await self._get(upstream, "GET", "/v1/models", None)
        except UpstreamError as exc:
            logger.info("upstream=<%s>, error=<%s> | identity not learned yet", upstream, type(exc).__name__)
            return False
        cards = listed.get("data") if isinstance(listed, dict) else None
        if not isinstance(cards, list):  # it answered, but not as vLLM does: nothing to learn
            logger.info("upstream=<%s> | /v1/models gave no model list; identity not learned", upstream)
            return True
        vllm_version = _text(version.get("version")) if isinstance(version, dict) else None
        models: dict[str, dict[str, str | None]] = {}
        for card in cards[:_MAX_MODELS]:
            name = _text(card.get("id")) if isinstance(card, dict) else None
            if name is None:
                continue
            try:
                tokenized = await self._get(
                    upstream, "POST", "/tokenize", {"model": name, "prompt": PROBE_TEXT}
                )
                rendered = await self._get(
                    upstream,
                    "POST",
                    "/tokenize",
                    {"model": name, "messages": PROBE_MESSAGES, "add_generation_prompt": True},
                )
            except UpstreamError:
                return False
            models[name] = {
                "model": name,
                "model_root": _text(card.get("root")),
                "tokenizer": fingerprint(tokenized.get("tokens") if isinstance(tokenized, dict) else None),
                "template": fingerprint(rendered.get("tokens") if isinstance(rendered, dict) else None),
                "vllm_version": vllm_version,
            }
        self._known[upstream] = models
        logger.info(
            "upstream=<%s>, models=<%s>, vllm=<%s> | identity learned", upstream, list(models), vllm_version
        )
        return True

    async def _get(self, upstream: str, method: str, path: str, body: Any) -> Any:
        """The JSON of a 200 answer; None for another status or a body that is not JSON."""
        payload = b"" if body is None else jsonio.dumps_text(body).encode()
        headers = [(b"content-type", b"application/json")] if body is not None else []
        response = await self._client.send(method, upstream + path, headers, payload, timeout_s=_TIMEOUT_S)
        try:
            data = b"".join([chunk async for chunk in response.iter_raw()])
        finally:
            await response.aclose()
        if response.status_code != 200:
            return None
        try:
            return jsonio.loads(data)
        except (ValueError, UnicodeDecodeError):
            return None
