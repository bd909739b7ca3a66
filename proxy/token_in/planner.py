"""Token-in: a chat call that continues the previous call of its trajectory gets that call's exact IDs.

The relay asks ``TokenIn.rewrite`` for the body to send (``None``: send its own), tells
``refused`` when vLLM answered the rewritten body with a 4xx (the relay then sends its own body once;
vLLM refused before running anything, so nothing ran twice), and hands every finished record to
``finished``. The body carries the IDs in the field the upstream takes (``prompt_field``): the
first-class ``"prompt_token_ids": [...]`` where vLLM has it (vllm-project/vllm#55771), else
``"kv_transfer_params": {"prompt_token_ids": [...]}``: vLLM 0.32 then uses exactly those IDs as the
prompt, while ``messages`` still drive tool and reasoning parsing
(``vllm/renderers/online_renderer.py::_reused_prompt_token_ids``). The answer vLLM gives has the same
shape either way (``kv_transfer_params`` is ``null`` in both), so nothing is changed on the way back.

On by default with ``TOKENTRAIL_TOKEN_IN=true``; a request header ``X-TokenTrail-Token-In: true|false``
decides for one call. Whenever the call cannot be continued exactly, it goes upstream as it would
without token-in and ``llm_calls.token_in_fallback`` says why.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from tokentrail.proxy import jsonio
from tokentrail.proxy.recording.capture import CHAT_ROUTE
from tokentrail.proxy.recording.records import CallRecord
from tokentrail.proxy.storage.stored_calls import StoredFormError
from tokentrail.proxy.token_in.prompt import BuildFailed, PromptBuilder, TemplateTrust
from tokentrail.proxy.token_in.prompt_field import PromptField, PromptFieldDetector
from tokentrail.proxy.trajectory.continuation import (
    Continuation,
    Reason,
    answered_by_a_later_call,
    best_continuation,
    has_non_text_content,
    holds_a_reply,
    suffix_has_reply,
)
from tokentrail.proxy.trajectory.drift import past_call
from tokentrail.proxy.trajectory.memory import (
    CALLS_PER_TRAJECTORY,
    OpenCall,
    TrajectoryMemory,
    load_recent_calls,
)
from tokentrail.proxy.upstream.client import UpstreamClient

logger = logging.getLogger(__name__)

TOKEN_IN_HEADER = b"x-tokentrail-token-in"
_YES = frozenset({b"true", b"1", b"yes", b"on"})
_NO = frozenset({b"false", b"0", b"no", b"off"})


class Fallback:
    """Reasons beyond ``messages.Reason`` (the request or vLLM stands in the way)."""

    NO_TRAJECTORY = "no_trajectory_id"
    ECHO = "echo"
    CLIENT_KV_PARAMS = "client_kv_transfer_params"
    CLIENT_PROMPT_IDS = "client_prompt_token_ids"  # the client sent its own (first-class field)
    NON_TEXT = "non_text_content"
    OPTIONS_UNSUPPORTED = "options_unsupported"  # continue_final_message, add_generation_prompt false
    CONCURRENT = "concurrent_same_base"  # another open call is built on the same previous call
    UPSTREAM_REFUSED = "upstream_refused"  # vLLM answered the token-in request with a 4xx
    UPSTREAM_IGNORED = "upstream_ignored_ids"  # vLLM's prompt IDs are not the ones sent
    DATABASE_ERROR = "database_error"  # the trajectory's previous calls could not be read
    REPLY_NOT_RECORDED = "reply_not_recorded"  # a reply in the history no recorded call gave (in time)
    PROXY_ERROR = "proxy_error"


_KV_KEY = b'"kv_transfer_params"'
_RECORD_POLL_S = 0.05  # how often a call whose previous turn is not yet recorded reads the database again
_IDS_KEY = b'"prompt_token_ids"'


def token_in_wanted(headers: list[tuple[bytes, bytes]], default: bool) -> bool:
    """The call's ``X-TokenTrail-Token-In`` header, else ``default``."""
    for name, value in headers:
        if name.lower() == TOKEN_IN_HEADER:
            lowered = value.strip().lower()
            if lowered in _YES:
                return True
            if lowered in _NO:
                return False
    return default


def _unsupported(request: dict[str, Any]) -> str | None:
    if request.get("echo"):
        return Fallback.ECHO
    if request.get("kv_transfer_params") is not None:
        return Fallback.CLIENT_KV_PARAMS
    if request.get("prompt_token_ids") is not None:
        return Fallback.CLIENT_PROMPT_IDS
    if has_non_text_content(request["messages"]):
        return Fallback.NON_TEXT
    if request.get("continue_final_message") or request.get("add_generation_prompt") is False:
        return Fallback.OPTIONS_UNSUPPORTED
    if request.get("documents") is not None:
        return Fallback.OPTIONS_UNSUPPORTED
    return None


def with_prompt_ids(
    body: bytes,
    prompt_ids: list[int],
    field: PromptField = PromptField.KV_TRANSFER,
    ids_text: bytes | None = None,
) -> bytes:
    """``body`` (a JSON object whose ``field`` is absent or null) with the prompt IDs (``ids_text``:
    already as JSON) added first, in ``field``. An explicit ``null`` of that field is removed first:
    with two keys, vLLM reads the last one, the null, and would ignore the IDs."""
    key = _KV_KEY if field == PromptField.KV_TRANSFER else _IDS_KEY
    if key in body:  # rare (or only inside a message's text): the body is rewritten without it
        parsed = jsonio.loads(body)
        if isinstance(parsed, dict) and parsed.pop(str(field), None) is None:
            body = jsonio.dumps_text(parsed).encode()
    start = body.find(b"{")
    ids = jsonio.dumps_text(prompt_ids).encode() if ids_text is None else ids_text
    if field == PromptField.KV_TRANSFER:
        added = b'"kv_transfer_params":{"prompt_token_ids":' + ids + b"}"
    else:
        added = b'"prompt_token_ids":' + ids
    rest = body[start + 1 :]
    separator = b"," if rest.strip() != b"}" else b""
    return body[: start + 1] + added + separator + rest


class TokenIn:
    """Plans each chat call's prompt; holds the trajectories' recent calls (see ``trajectory/memory.py``)."""

    def __init__(
        self,
        *,
        enabled: bool,
        engine: Engine,
        client: UpstreamClient,
        upstream_of: Callable[[str], str],
        memory_trajectories: int,
        wait_s: float,
        tokenize_timeout_s: float,
        stand_in: bool = True,
        check_first: int = 8,
        check_every: int = 100,
    ) -> None:
        self.enabled = enabled
        self._engine = engine
        self._upstream_of = upstream_of
        self._memory = TrajectoryMemory(memory_trajectories)
        self._builder = PromptBuilder(
            client, tokenize_timeout_s, stand_in=stand_in, check_first=check_first, check_every=check_every
        )
        self._fields = PromptFieldDetector(client, tokenize_timeout_s)
        self._wait_s = wait_s
        # open calls: (the trajectory's view of it, the prompt IDs sent and their JSON, once built)
        self._open: dict[str, tuple[OpenCall, list[int] | None, bytes | None]] = {}

    async def rewrite(
        self, headers: list[tuple[bytes, bytes]], record: CallRecord, body: bytes
    ) -> bytes | None:
        """The body to send upstream in token-in mode, or None to send ``body`` as it is."""
        if not token_in_wanted(headers, self.enabled):
            return None
        try:
            prompt_ids, field = await self._plan(headers, record)
        except BuildFailed as exc:
            logger.info(
                "call_id=<%s>, reason=<%s>, detail=<%s> | token-in fell back",
                record.call_id,
                exc.reason,
                exc.detail,
            )
            self._fall_back(record, exc.reason)
            return None
        except Exception as exc:  # a bug of ours must not fail the call: it goes on without token-in
            logger.error("call_id=<%s>, error=<%s> | token-in failed", record.call_id, type(exc).__name__)
            logger.debug("call_id=<%s> | token-in failure details", record.call_id, exc_info=exc)
            self._fall_back(record, Fallback.PROXY_ERROR)
            return None
        opened, _, _ = self._open[record.call_id]
        ids_text = jsonio.dumps_text(prompt_ids).encode()  # once: sent, then compared with vLLM's
        self._open[record.call_id] = (opened, prompt_ids, ids_text)
        record.token_in = True
        return with_prompt_ids(body, prompt_ids, field, ids_text)

    def upstream_back(self, upstream_url: str) -> None:
        """An upstream answered again after it was down: it may have restarted with another model,
        template or vLLM, so what was learned of it is learned again."""
        self._builder.forget(upstream_url)
        self._fields.forget(upstream_url)

    def templates(self) -> dict[str, TemplateTrust]:
        """What was learned per template of the stand-in history (see ``prompt``)."""
        return self._builder.templates()

    def _fall_back(self, record: CallRecord, reason: str) -> None:
        record.token_in = False
        record.token_in_fallback = reason

    async def _plan(
        self, headers: list[tuple[bytes, bytes]], record: CallRecord
    ) -> tuple[list[int], PromptField]:
        request = record.request
        if record.route != CHAT_ROUTE or request is None or not isinstance(request.get("messages"), list):
            raise BuildFailed(Reason.NOT_CHAT)
        if record.seq is None:
            raise BuildFailed(Fallback.NO_TRAJECTORY)
        trajectory_id = record.trajectory_id
        opened = self._memory.open_call(trajectory_id, request["messages"])
        self._open[record.call_id] = (opened, None, None)
        unsupported = _unsupported(request)
        if unsupported is not None:
            raise BuildFailed(unsupported)
        read_now = not self._memory.holds(trajectory_id)
        if read_now:
            await self._load(trajectory_id)
        waiting = self._memory.predecessors(trajectory_id, opened)
        if waiting:  # the client may already hold their answers while their records are being made
            waits = [asyncio.ensure_future(o.done.wait()) for o in waiting]
            try:
                await asyncio.wait(waits, timeout=self._wait_s)
            finally:
                for wait in waits:
                    wait.cancel()
        found = best_continuation(self._memory.calls(trajectory_id), request)
        if suffix_has_reply(found, request) or (not isinstance(found, Continuation) and not read_now):
            found = await self._continuation_on_record(trajectory_id, request)
        if found == Reason.FIRST_CALL and holds_a_reply(request["messages"]):
            # no call of the trajectory is recorded, yet the history holds a model's reply: an earlier
            # turn another process relayed and has not written yet (sticky routing avoids this)
            raise BuildFailed(Fallback.REPLY_NOT_RECORDED)
        if not isinstance(found, Continuation):
            raise BuildFailed(found)
        if not self._memory.claim_base(trajectory_id, opened, found.past.call_id):
            raise BuildFailed(Fallback.CONCURRENT)
        auth = [(n, v) for n, v in headers if n.lower() == b"authorization"]
        upstream_url = self._upstream_of(trajectory_id)
        known = self._fields.known(upstream_url)
        if known is None:  # asked once per upstream, beside the first call's renders
            built, field = await asyncio.gather(
                self._builder.build(upstream_url, auth, request, found),
                self._fields.field(upstream_url, auth),
            )
        else:  # no task of its own: under load each one costs the call a turn of the event loop
            built, field = await self._builder.build(upstream_url, auth, request, found), known
        record.token_in_render = str(built.how)
        return built.ids, field

    async def _continuation_on_record(
        self, trajectory_id: str, request: dict[str, Any]
    ) -> Continuation | str:
        """What the call continues, by what the database holds, when memory does not prove it.

        Memory is trusted only where the request itself shows it is current: a continuation whose new
        messages hold no assistant reply. Otherwise another process may have relayed a later turn:
        the database is read. A reply in the new messages that no recorded call gave may still be on
        its way (another worker's writer is batching it): the database is read again until the wait
        bound, and if it never comes the call falls back, for building on an older call would
        re-render that reply from text and call the result exact.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_s
        while True:
            await self._load(trajectory_id)
            calls = self._memory.calls(trajectory_id)
            found = best_continuation(calls, request)
            if not suffix_has_reply(found, request):
                return found
            assert isinstance(found, Continuation)
            if answered_by_a_later_call(calls, found, request):
                return Reason.REPLY_EDITED  # that reply is a recorded call's, edited: nothing to wait for
            if loop.time() >= deadline:
                return Fallback.REPLY_NOT_RECORDED
            await asyncio.sleep(_RECORD_POLL_S)

    async def _load(self, trajectory_id: str) -> None:
        def read() -> list[Any]:
            with self._engine.connect() as connection:
                return load_recent_calls(connection, trajectory_id, CALLS_PER_TRAJECTORY)

        try:
            loaded = await asyncio.to_thread(read)
        except (SQLAlchemyError, StoredFormError) as exc:
            raise BuildFailed(Fallback.DATABASE_ERROR, type(exc).__name__) from exc
        self._memory.merge_loaded(trajectory_id, loaded)

    def refused(self, record: CallRecord, status: int) -> None:
        """vLLM answered the token-in body with ``status`` (a 4xx); the call goes on without it."""
        logger.warning("call_id=<%s>, status=<%s> | vLLM refused the token-in prompt", record.call_id, status)
        self._fall_back(record, Fallback.UPSTREAM_REFUSED)

    def reads_replies(self, headers: list[tuple[bytes, bytes]], record: CallRecord) -> bool:
        """Whether ``finished`` needs this call's reply read (token-in used for it, or its
        trajectory's calls kept in memory)."""
        return record.call_id in self._open or (
            record.seq is not None
            and (token_in_wanted(headers, self.enabled) or self._memory.holds(record.trajectory_id))
        )

    def finished(self, record: CallRecord) -> None:
        """The call ended (its record is final): keep it for the next call of its trajectory."""
        entry = self._open.pop(record.call_id, None)
        if entry is None:
            if record.seq is not None and self._memory.holds(record.trajectory_id):
                past = past_call(record)
                if past is not None:
                    self._memory.add(record.trajectory_id, past)
            return
        opened, prompt_ids, ids_text = entry
        text = record.prompt_ids_text
        if record.token_in and prompt_ids and text is not None and text == ids_text:
            # vLLM answered with exactly the IDs it was sent: keep that list rather than parse the text
            # (writing 15,000 IDs costs a fifth of reading them); the writer still checks their count
            record.prompt_token_ids = prompt_ids
            record.prompt_ids_text = None
        if record.token_in and record.load_prompt_ids() not in (None, prompt_ids):
            logger.warning("call_id=<%s> | vLLM did not use the token-in prompt IDs", record.call_id)
            self._fall_back(record, Fallback.UPSTREAM_IGNORED)
        self._memory.close_call(record.trajectory_id, opened, past_call(record))
