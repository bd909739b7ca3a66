"""``/tokentrail/v1/trajectories``: list and read trajectories, their training sequences, rewards, tags.

Guarded by ``TOKENTRAIL_API_KEY`` (``Authorization: Bearer <key>``, compared in constant time) when it
is set; the pass-through routes never are.
"""

from __future__ import annotations

import hmac
import math
from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from pydantic import BaseModel, Field, field_validator

from tokentrail.proxy.errors import ProxyRequestError
from tokentrail.proxy.relay.routing import validate_tags, validate_trajectory_id
from tokentrail.proxy.storage import queries
from tokentrail.proxy.training import policy
from tokentrail.proxy.training.sequences import SequenceMode, build_sequences, sequence_shapes

MAX_PAGE = 1000


def bearer_matches(headers: list[tuple[bytes, bytes]], key: str) -> bool:
    """Whether ``Authorization: Bearer <key>`` is among ``headers`` (compared in constant time)."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode())
    return False


def require_api_key(request: Request) -> None:
    """401 unless the bearer token equals TOKENTRAIL_API_KEY (when one is configured).

    The proxy's dispatcher checks the same before FastAPI sees the request; this keeps the router
    safe when it is mounted on its own.
    """
    key = request.app.state.runtime.settings.api_key
    if key is not None and not bearer_matches(request.headers.raw, key.get_secret_value()):
        raise HTTPException(401, "a valid 'Authorization: Bearer <TOKENTRAIL_API_KEY>' header is required")


router = APIRouter(prefix="/tokentrail/v1", tags=["trajectories"], dependencies=[Depends(require_api_key)])


def _trajectory_id(trajectory_id: Annotated[str, Path(description="The X-Trajectory-Id value")]) -> str:
    try:
        return validate_trajectory_id(trajectory_id.encode(), "trajectory id")
    except ProxyRequestError as exc:
        raise HTTPException(400, exc.message) from None


TrajectoryId = Annotated[str, Depends(_trajectory_id)]


class TrajectoryOut(BaseModel):
    """One trajectory (an agent run)."""

    id: str
    created_at: datetime
    updated_at: datetime
    reward: float | None = None
    metadata: dict[str, Any] | None = None
    tags: dict[str, str] | None = None
    finished: bool = False
    finished_at: datetime | None = None
    call_count: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    id_generated: bool = False
    group_id: str | None = None
    exported_at: datetime | None = Field(
        None, description="When `tokentrail export --mark-exported` last wrote it (null: never)."
    )
    outcome_problems: int | None = Field(
        None, description="Calls that did not end 'ok' (in lists; null in a single trajectory's answer)."
    )
    sequence_count: int | None = Field(
        None, description="Merged training sequences (with ?shape=true or ?single_sequence=; else null)."
    )
    prefix_breaks: int | None = Field(
        None, description="Calls whose prompt did not extend the sequence before (as sequence_count)."
    )


class TrajectoryPage(BaseModel):
    data: list[TrajectoryOut]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page; null at the end.")


class CompletionOut(BaseModel):
    choice_index: int
    token_ids: list[int]
    logprobs: list[Any] | None = None
    finish_reason: str | None = None
    stop_reason: str | None = None
    message: dict[str, Any] | None = None


class CertificateOut(BaseModel):
    """What produced a call's tokens (``certificates``; see the README's Certificates)."""

    id: str
    template_hash: str = Field(
        description="The chat template (default and request's), tools and template arguments."
    )
    model: str | None = None
    model_root: str | None = Field(None, description="The model's path or repository, from /v1/models.")
    tokenizer: str | None = Field(
        None, description="A fingerprint of the tokenizer's IDs for a fixed probe text."
    )
    vllm_version: str | None = None
    sampling_digest: str
    sampling: dict[str, Any] | None = Field(None, description="The sampling parameters digested.")
    weight_version: str | None = None
    first_seen_at: datetime


class CallOut(BaseModel):
    id: str
    seq: int
    route: str
    model: str | None = None
    stream: bool
    received_at: datetime
    upstream_first_byte_at: datetime | None = None
    finished_at: datetime | None = None
    latency_ms: float | None = None
    status_code: int | None = None
    outcome: str
    integrity: str
    error: str | None = None
    request: dict[str, Any] | None = None
    prompt_token_ids: list[int] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    weight_version: str | None = Field(None, description="The policy version vLLM ran the call under.")
    weight_versions: list[dict[str, Any]] | None = Field(
        None,
        description="When the version changed during the call: [{version, start, end}] over its "
        "generated tokens (start/end null where the boundary is not known).",
    )
    drift: str | None = Field(
        None,
        description=(
            "How the prompt relates to the trajectory's previous call: first, extends, token_in, "
            "retokenized, template or edited."
        ),
    )
    drift_position: int | None = Field(
        None, description="First prompt token that differs from the previous call's prompt + generated IDs."
    )
    token_in_fallback: str | None = Field(
        None, description="Why token-in did not build this call's prompt (null: it did, or it was off)."
    )
    certificate_id: str | None = Field(None, description="What produced the call's tokens: see certificate.")
    certificate: CertificateOut | None = None
    completions: list[CompletionOut]


class TrajectoryDetail(BaseModel):
    trajectory: TrajectoryOut
    calls: list[CallOut]


class MismatchOut(BaseModel):
    call_id: str
    seq: int
    position: int = Field(
        description="First token of the prompt that differs from the previous prompt + response."
    )
    expected_length: int


class SequenceOut(BaseModel):
    sequence_index: int
    input_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float | None]
    reward: float | None
    call_ids: list[str]
    choice_indexes: list[int]
    num_tokens: int
    num_generated: int
    weight_version: str | None = Field(None, description="The oldest policy version among its calls.")
    staleness: int | None = Field(None, description="Policy versions seen after that one.")
    group_id: str | None = None
    advantage: float | None = Field(None, description="The trajectory's advantage within its group.")
    certificate_id: str | None = Field(None, description="The certificate all its calls share (null: mixed).")


class SequencesOut(BaseModel):
    trajectory_id: str
    mode: SequenceMode
    reward: float | None
    sequences: list[SequenceOut]
    prefix_mismatches: list[MismatchOut]


class RewardIn(BaseModel):
    reward: float = Field(description="A finite number.")
    metadata: dict[str, Any] | None = Field(None, description="Merged into the trajectory's metadata.")

    @field_validator("reward")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("reward must be a finite number")
        return value


class TagsIn(BaseModel):
    tags: dict[str, str] = Field(description="Added to the trajectory's tags; a key given again is replaced.")


def _engine(request: Request) -> Any:
    return request.app.state.runtime.engine


def _out(row: dict[str, Any]) -> TrajectoryOut:
    return TrajectoryOut.model_validate(row)


def _parse_tags(values: list[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise HTTPException(400, f"tag filter {item[:70]!r} is not key=value")
        tags[key] = value
    try:
        return validate_tags(tags, "tag")
    except ProxyRequestError as exc:
        raise HTTPException(400, exc.message) from None


@router.get("/trajectories", response_model=TrajectoryPage)
def list_trajectories(
    request: Request,
    since: Annotated[
        datetime | None, Query(description="Only trajectories created at or after this time.")
    ] = None,
    until: Annotated[
        datetime | None, Query(description="Only trajectories created before this time.")
    ] = None,
    finished: Annotated[bool | None, Query(description="Only finished (true) or open (false) ones.")] = None,
    tag: Annotated[list[str], Query(description="key=value; repeat for several (all must match).")] = [],  # noqa: B006
    has_reward: Annotated[
        bool | None, Query(description="Only with (true) or without (false) a reward.")
    ] = None,
    single_sequence: Annotated[
        bool | None,
        Query(
            description=(
                "Only those that merge into exactly one training sequence (true) or not (false); reads "
                "their tokens, so a page costs more."
            )
        ),
    ] = None,
    shape: Annotated[
        bool, Query(description="Fill sequence_count and prefix_breaks (reads the page's tokens).")
    ] = False,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page.")] = None,
) -> TrajectoryPage:
    """Trajectories, oldest first, a page at a time, each with its count of calls that failed."""
    try:
        after = queries.decode_cursor(cursor) if cursor else None
    except queries.BadCursorError as exc:
        raise HTTPException(400, str(exc)) from None
    filters = queries.TrajectoryFilter(since, until, finished, _parse_tags(tag), has_reward)
    with _engine(request).connect() as connection:
        rows = _page(connection, filters, after, limit + 1, single_sequence, shape)
        page, more = rows[:limit], len(rows) > limit
        problems = queries.outcome_problems(connection, [r["id"] for r in page])
    next_cursor = queries.encode_cursor(page[-1]["created_at"], page[-1]["id"]) if more else None
    return TrajectoryPage(
        data=[_out({**r, "outcome_problems": problems[r["id"]]}) for r in page], next_cursor=next_cursor
    )


def _page(
    connection: Any,
    filters: queries.TrajectoryFilter,
    after: tuple[datetime, str] | None,
    want: int,
    single_sequence: bool | None,
    shape: bool,
) -> list[dict[str, Any]]:
    """``want`` matching rows after the cursor. Whether a trajectory is one sequence is not in SQL: it
    takes its tokens, so candidates are read in batches and kept or dropped until the page is full."""
    if single_sequence is None and not shape:
        return queries.list_trajectories(connection, filters, after, want)
    rows: list[dict[str, Any]] = []
    while len(rows) < want:
        batch = queries.list_trajectories(connection, filters, after, want)
        shapes = sequence_shapes(queries.load_call_tokens(connection, [r["id"] for r in batch]))
        for row in batch:
            found = shapes[row["id"]]
            row.update(sequence_count=found.sequences, prefix_breaks=found.prefix_breaks)
            if single_sequence is None or (found.sequences == 1) == single_sequence:
                rows.append(row)
        if len(batch) < want:
            break
        after = (batch[-1]["created_at"], batch[-1]["id"])
    return rows[:want]


def _existing(connection: Any, trajectory_id: str) -> dict[str, Any]:
    row = queries.get_trajectory(connection, trajectory_id)
    if row is None:
        raise HTTPException(404, f"no trajectory {trajectory_id!r}")
    return row


@router.get("/trajectories/{trajectory_id}", response_model=TrajectoryDetail)
def get_trajectory(
    request: Request,
    trajectory_id: TrajectoryId,
    token_ids: Annotated[
        bool,
        Query(
            description=(
                "false: prompt_token_ids null and each completion's token_ids empty and logprobs null, "
                "for readers that take the tokens from /sequences (a long trajectory's answer shrinks "
                "several times)."
            )
        ),
    ] = True,
) -> TrajectoryDetail:
    """One trajectory with its calls and their completions, in seq order."""
    with _engine(request).connect() as connection:
        row = _existing(connection, trajectory_id)
        calls = queries.get_calls(connection, trajectory_id, prompt_ids=token_ids)
    if not token_ids:
        for call in calls:
            for completion in call["completions"]:
                completion.update(token_ids=[], logprobs=None)
    return TrajectoryDetail(trajectory=_out(row), calls=[CallOut.model_validate(c) for c in calls])


@router.get("/trajectories/{trajectory_id}/sequences", response_model=SequencesOut)
def get_sequences(
    request: Request,
    trajectory_id: TrajectoryId,
    mode: Annotated[SequenceMode, Query(description="merged, per_call or last_turn")] = SequenceMode.MERGED,
) -> SequencesOut:
    """The trajectory as token-exact training sequences (input_ids, loss_mask, logprobs, reward)."""
    with _engine(request).connect() as connection:
        row = _existing(connection, trajectory_id)
        calls = queries.load_call_tokens(connection, [trajectory_id])[trajectory_id]
        built = build_sequences(trajectory_id, calls, row["reward"], mode)
        policy.describe(connection, row, built.sequences)
    return SequencesOut(
        trajectory_id=trajectory_id,
        mode=mode,
        reward=row["reward"],
        sequences=[SequenceOut.model_validate(s.as_dict()) for s in built.sequences],
        prefix_mismatches=[MismatchOut.model_validate(asdict(m)) for m in built.mismatches],
    )


def _write_and_read(request: Request, trajectory_id: str, write: Any) -> TrajectoryOut:
    with _engine(request).begin() as connection:
        write(connection)
        return _out(_existing(connection, trajectory_id))


@router.post("/trajectories/{trajectory_id}/reward", response_model=TrajectoryOut)
def set_reward(request: Request, trajectory_id: TrajectoryId, body: RewardIn) -> TrajectoryOut:
    """Attach a reward (and optional metadata). A trajectory not written yet is created."""
    return _write_and_read(
        request, trajectory_id, lambda c: queries.set_reward(c, trajectory_id, body.reward, body.metadata)
    )


@router.post("/trajectories/{trajectory_id}/tags", response_model=TrajectoryOut)
def add_tags(request: Request, trajectory_id: TrajectoryId, body: TagsIn) -> TrajectoryOut:
    """Add tags (key=value) to a trajectory."""
    try:
        tags = validate_tags(body.tags, "tags")
    except ProxyRequestError as exc:
        raise HTTPException(400, exc.message) from None
    return _write_and_read(request, trajectory_id, lambda c: queries.add_tags(c, trajectory_id, tags))


@router.post("/trajectories/{trajectory_id}/finish", response_model=TrajectoryOut)
def finish(request: Request, trajectory_id: TrajectoryId) -> TrajectoryOut:
    """Mark a trajectory finished (``?finished=true`` lists it; the export can take only those)."""
    return _write_and_read(request, trajectory_id, lambda c: queries.finish(c, trajectory_id))
