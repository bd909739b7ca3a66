"""The record of one recorded call, as plain dataclasses, and the values its outcome can take.

The relay fills a ``CallRecord`` while a call runs and hands it to the writer exactly once; the writer
turns it into rows. Nothing here does I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokentrail.proxy import jsonio

if TYPE_CHECKING:
    from tokentrail.proxy.recording.capture import RawAnswer


class Outcome(enum.StrEnum):
    """How a recorded call ended; exactly one per call."""

    OK = "ok"
    UPSTREAM_ERROR = "upstream_error"  # vLLM answered with an error status or an error event
    UPSTREAM_UNREACHABLE = "upstream_unreachable"  # no connection to vLLM (answered 502)
    UPSTREAM_TIMEOUT = "upstream_timeout"  # vLLM stayed silent past the read timeout (504)
    UPSTREAM_DIED = "upstream_died"  # the connection closed or broke after the request was sent (502)
    CLIENT_DISCONNECTED = "client_disconnected"  # the client hung up; the upstream call was cancelled
    CLIENT_TOO_SLOW = "client_too_slow"  # the client took nothing for the send timeout: cut off, cancelled
    PROXY_SHUTDOWN = "proxy_shutdown"  # the grace period after SIGTERM ran out with the call open
    PROXY_ERROR = "proxy_error"  # a bug in the proxy; the client got a 502 without details
    ABORTED = "aborted"  # vLLM aborted it for a pause (POST /tokentrail/v1/pause?mode=abort)
    PAUSED = "paused"  # held at the proxy past TOKENTRAIL_PAUSE_MAX_WAIT_S (answered 503, never sent)


class Integrity(enum.StrEnum):
    """Whether the recorded token IDs agree with vLLM's own counts (``llm_calls.integrity``)."""

    OK = "ok"
    NOT_CHECKED = "not_checked"  # the call did not finish normally, so no counts to compare
    NO_USAGE = "no_usage"  # the stream carried no usage (client did not ask for it)
    NO_TOKEN_IDS = "no_token_ids"  # noqa: S105 - token IDs were not requested (completions with echo)
    PROMPT_IDS_MISMATCH = "prompt_ids_mismatch"  # len(prompt IDs) != usage.prompt_tokens
    COMPLETION_IDS_MISMATCH = "completion_ids_mismatch"  # sum(len(ids)) != completion_tokens
    LOGPROBS_MISMATCH = "logprobs_mismatch"  # logprobs asked, but not one entry per token


# Values that say nothing is wrong (a check that could not be made is not a problem); the
# trajectory_summary view counts integrity_problems the same way.
GOOD_INTEGRITY = frozenset({Integrity.OK, Integrity.NOT_CHECKED, Integrity.NO_TOKEN_IDS, Integrity.NO_USAGE})


@dataclass(slots=True)
class ChoiceRecord:
    """One generated choice (``n`` > 1 gives several)."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    message: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class CallRecord:
    """Everything kept of one chat or text completion call."""

    call_id: str
    trajectory_id: str
    route: str
    received_at: float
    seq: int | None = None
    tags: dict[str, str] | None = None
    request: dict[str, Any] | None = None
    model: str | None = None
    upstream: str | None = None
    stream: bool = False
    status_code: int | None = None
    outcome: Outcome = Outcome.OK
    error: str | None = None
    integrity: str = Integrity.NOT_CHECKED
    response_id: str | None = None
    prompt_token_ids: list[int] | None = None
    # The prompt IDs as the JSON array vLLM sent, until ``load_prompt_ids`` parses them: parsing
    # 15,000 IDs takes ~270 us, and the event loop would pay it just as the call's first tokens come.
    prompt_ids_text: bytes | None = field(default=None, repr=False)
    # Their count is checked against usage.prompt_tokens when they are parsed (counting the commas of
    # 90 KB of text took 0.5 ms on the event loop): ``integrity`` is final once they are loaded.
    prompt_count_unchecked: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    upstream_first_byte_at: float | None = None
    finished_at: float | None = None
    # When the request went to the upstream and its last byte came back: with both, the metrics
    # tell the proxy's own time from the upstream's (the relay sets them where it knows them).
    upstream_sent_at: float | None = None
    upstream_last_byte_at: float | None = None
    choices: list[ChoiceRecord] = field(default_factory=list)
    # The RL loop: the trajectory's GRPO group (X-Trajectory-Group), the policy version when vLLM
    # started the call (X-Policy-Version or the upstream's), and spans over the generated tokens when
    # the version changed while the call ran: [{"version", "start", "end"}].
    group_id: str | None = None
    weight_version: str | None = None
    weight_versions: list[dict[str, Any]] | None = None
    # when this process learned each of those versions (epoch seconds): their order (not a column)
    version_times: dict[str, float] | None = None
    # Token-in (proxy/token_in/): the proxy sent the prompt IDs, or why it did not (None: off).
    token_in: bool = False
    token_in_fallback: str | None = None
    # How token-in found the new tokens (token_in/prompt.py ``How``); counted in metrics, not stored.
    token_in_render: str | None = None
    # What the upstream serves (upstream/identity.py), as known when the call was sealed: the
    # call's certificate is made of it and the request (recording/certificate.py).
    upstream_identity: dict[str, str | None] | None = None
    # How the prompt relates to the trajectory's previous call; set by the writer (trajectory/drift.py).
    drift: str | None = None
    drift_position: int | None = None
    # Whether the writer held it for the record of a reply its history holds (recording/order.py).
    order_wait: str | None = None
    # vLLM's answer, not read by the relay: the recorder process reads it (capture.read_raw_answer).
    answer: RawAnswer | None = field(default=None, repr=False)
    # Handed over again (the recorder restarted before it answered, or a relay's spool): the writer
    # skips it when the database already holds its call_id. Not stored.
    resent: bool = False
    # Durable mode: called (from the writer thread) once the record is committed (True) or kept in
    # the fallback file (False). Not stored.
    on_stored: Callable[[bool], None] | None = field(default=None, repr=False, compare=False)

    def load_prompt_ids(self) -> list[int] | None:
        """The prompt IDs, parsed now if they are still text (the writer thread does it, or whoever
        needs them first). Safe from two threads: the list is set before the text is dropped."""
        text = self.prompt_ids_text
        if text is not None:
            try:
                ids = jsonio.loads(text)
            except ValueError:
                ids = None
            if self.prompt_token_ids is None:
                self.prompt_token_ids = ids if isinstance(ids, list) else None
            self.prompt_ids_text = None
        if self.prompt_count_unchecked:
            self.prompt_count_unchecked = False
            count = None if self.prompt_token_ids is None else len(self.prompt_token_ids)
            mismatch = Integrity.PROMPT_IDS_MISMATCH
            if count != self.prompt_tokens and mismatch not in self.integrity:  # first, as capture puts it
                self.integrity = (
                    mismatch if self.integrity == Integrity.OK else f"{mismatch},{self.integrity}"
                )
        return self.prompt_token_ids


def ended_by_vllm_abort(record: CallRecord) -> bool:
    """Whether vLLM aborted a choice of the call (finish reason ``abort``): the call is ``aborted``,
    whoever reads its answer (the RL loop on the relay, or the recorder process)."""
    return any(c.finish_reason == "abort" for c in record.choices)


@dataclass(frozen=True, slots=True)
class PastChoice:
    index: int
    token_ids: Sequence[int]
    message: dict[str, Any]
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class PastCall:
    """What later calls of a trajectory are compared with: a finished (``ok``) call."""

    call_id: str
    route: str
    request: dict[str, Any]
    prompt_ids: Sequence[int]
    choices: tuple[PastChoice, ...] = field(default=())
