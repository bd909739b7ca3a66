"""Which request field carries token-in's prompt IDs to an upstream: learned once per upstream.

vLLM 0.32 takes them as ``"kv_transfer_params": {"prompt_token_ids": [...]}`` (vllm-project/vllm#48145,
experimental). vllm-project/vllm#55771 (open) makes ``"prompt_token_ids": [...]`` a first-class field of
chat requests. A vLLM that has it lists it in its OpenAPI schema (``GET /openapi.json``, under
``ChatCompletionRequest``); that schema is read once per upstream and the first-class field is used
where it is listed. Anything else (no schema, ``--disable-fastapi-docs``, an error) means today's
field, which every vLLM with token-in accepts. A transport failure is not remembered: the next call
asks again.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import Any

from tokentrail.proxy import jsonio
from tokentrail.proxy.upstream.client import UpstreamClient, UpstreamError

logger = logging.getLogger(__name__)

OPENAPI_PATH = "/openapi.json"
_MAX_SCHEMA_BYTES = 16 * 1024 * 1024


class PromptField(enum.StrEnum):
    FIRST_CLASS = "prompt_token_ids"  # vllm-project/vllm#55771
    KV_TRANSFER = "kv_transfer_params"  # vLLM 0.32: kv_transfer_params.prompt_token_ids


def lists_first_class_field(schema: Any) -> bool:
    """Whether an OpenAPI document's chat request has a ``prompt_token_ids`` property."""
    try:
        properties = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    except (KeyError, TypeError):
        return False
    return isinstance(properties, dict) and "prompt_token_ids" in properties


class PromptFieldDetector:
    """Asks each upstream once (concurrent first calls share the question)."""

    def __init__(self, client: UpstreamClient, timeout_s: float) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._known: dict[str, asyncio.Future[PromptField | None]] = {}

    def known(self, upstream_url: str) -> PromptField | None:
        """What was learned of ``upstream_url`` (None: not yet)."""
        future = self._known.get(upstream_url)
        return future.result() if future is not None and future.done() else None

    def forget(self, upstream_url: str) -> None:
        """The upstream came back (maybe another vLLM): asked again by its next token-in call."""
        future = self._known.get(upstream_url)
        if future is not None and future.done():
            del self._known[upstream_url]

    async def field(self, upstream_url: str, headers: list[tuple[bytes, bytes]]) -> PromptField:
        future = self._known.get(upstream_url)
        if future is None:
            future = self._known[upstream_url] = asyncio.get_running_loop().create_future()
            try:
                learned = await self._ask(upstream_url, headers)
            except BaseException:
                del self._known[upstream_url]
                future.set_result(None)
                raise
            if learned is None:  # could not ask: today's field for now, asked again next time
                del self._known[upstream_url]
            future.set_result(learned)
        found = await asyncio.shield(future)
        return PromptField.KV_TRANSFER if found is None else found

    async def _ask(self, upstream_url: str, headers: list[tuple[bytes, bytes]]) -> PromptField | None:
        try:
            response = await self._client.send(
                "GET", upstream_url + OPENAPI_PATH, list(headers), b"", timeout_s=self._timeout_s
            )
            try:
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.iter_raw():
                    size += len(chunk)
                    if size > _MAX_SCHEMA_BYTES:
                        break
                    chunks.append(chunk)
            finally:
                await response.aclose()
        except UpstreamError as exc:
            logger.info(
                "upstream=<%s>, error=<%s> | could not read the OpenAPI schema",
                upstream_url,
                type(exc).__name__,
            )
            return None
        field = PromptField.KV_TRANSFER
        if response.status_code == 200 and size <= _MAX_SCHEMA_BYTES:
            try:
                schema = jsonio.loads(b"".join(chunks))
            except (ValueError, UnicodeDecodeError):
                schema = None
            if lists_first_class_field(schema):
                field = PromptField.FIRST_CLASS
        logger.info("upstream=<%s>, field=<%s> | token-in prompt IDs field", upstream_url, field)
        return field
