"""``/tokentrail/v1/pause``, ``/resume`` and ``/groups``: the RL loop's controls and GRPO groups.

Pause and resume act on every upstream at once (vLLM's own ``/pause`` and ``/resume``, which need
``VLLM_SERVER_DEV_MODE=1``) and on this proxy's gate, where new recorded calls wait instead of failing.
Same API key rule as the rest of ``/tokentrail/v1/``.
"""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from pydantic import BaseModel, Field

from tokentrail.proxy.api.trajectories import TrajectoryId, TrajectoryOut, _existing, require_api_key
from tokentrail.proxy.errors import ProxyRequestError
from tokentrail.proxy.relay.routing import validate_trajectory_id
from tokentrail.proxy.rl.control import FleetUnavailableError
from tokentrail.proxy.rl.groups import group_advantages
from tokentrail.proxy.rl.loop import RlLoop, SupersededError, UpstreamAnswer
from tokentrail.proxy.rl.pause import PauseMode
from tokentrail.proxy.storage import queries

router = APIRouter(prefix="/tokentrail/v1", tags=["rl"], dependencies=[Depends(require_api_key)])


class UpstreamAnswerOut(BaseModel):
    upstream: str
    status: int | None = Field(description="vLLM's status code; null when it could not be reached.")
    body: str


class PauseOut(BaseModel):
    paused: bool
    mode: PauseMode | None
    paused_for_s: float | None = Field(description="Seconds since the pause began.")
    held_now: int = Field(description="Recorded calls waiting at the proxy now.")
    held_total: int = Field(description="Recorded calls held by any pause since the proxy started.")
    longest_wait_s: float = Field(description="The longest a call waited at the proxy.")
    timed_out: int = Field(description="Calls held past TOKENTRAIL_PAUSE_MAX_WAIT_S (answered 503).")
    weight_versions: dict[str, str | None] = Field(description="Each upstream's policy version, if known.")
    upstreams: list[UpstreamAnswerOut] = Field(
        default_factory=list, description="vLLM's answers to the pause or resume just sent."
    )
    worker: int | None = Field(
        None, description="The worker that answered (serve --workers); held counts are its own."
    )


class GroupMember(BaseModel):
    trajectory_id: str
    reward: float | None
    advantage: float | None = Field(
        description="(reward - mean) / std over the group's rewarded trajectories (population std); "
        "null without a reward or when every reward is equal."
    )
    finished: bool
    call_count: int
    completion_tokens: int


class GroupOut(BaseModel):
    group_id: str
    trajectories: list[GroupMember]


class GroupIn(BaseModel):
    group_id: str = Field(description="The group (task) this trajectory was sampled for.")


def _rl(request: Request) -> RlLoop:
    rl: RlLoop | None = request.app.state.runtime.relay.rl
    if rl is None:  # pragma: no cover - every app built by create_app has one
        raise HTTPException(503, "the RL controls are not available")
    return rl


def _state(request: Request, rl: RlLoop, answers: list[UpstreamAnswer]) -> PauseOut:
    state = rl.gate.state()
    versions = {u.url: rl.weights.current(u.url) for u in rl.balancer.upstreams}
    return PauseOut(
        **vars(state),
        weight_versions=versions,
        upstreams=[UpstreamAnswerOut.model_validate(vars(a)) for a in answers],
        worker=request.app.state.runtime.worker,
    )


_SUPERSEDED = "a later pause or resume came before this one could act; the later one decides"
_NO_FLEET = (
    "the fleet's control plane cannot be reached (is TokenTrail stopping, or the database the replicas "
    "share away?)"
)


@router.post("/pause", response_model=PauseOut, responses={409: {}, 502: {}, 503: {}, 504: {}})
async def pause(
    request: Request,
    mode: Annotated[PauseMode, Query(description="wait (default), keep or abort, as vLLM's /pause")] = (
        PauseMode.WAIT
    ),
) -> PauseOut:
    """Hold new recorded calls at the proxy and pause every upstream; with ``wait``, the calls already
    running finish first. 502 (and everything resumed) when an upstream did not pause, e.g. a vLLM
    without ``VLLM_SERVER_DEV_MODE=1``; 504 when running calls did not finish in time (still paused)."""
    rl = _rl(request)
    try:
        answers = await rl.pause(mode)
    except TimeoutError:
        raise HTTPException(504, "calls still running after the wait limit; the proxy stays paused") from None
    except SupersededError:
        raise HTTPException(409, _SUPERSEDED) from None
    except FleetUnavailableError:
        raise HTTPException(503, _NO_FLEET) from None
    failed = [a for a in answers if a.status is None or not 200 <= a.status < 300]
    if failed:
        with contextlib.suppress(SupersededError, FleetUnavailableError):  # a newer request decides
            await rl.resume()
        detail = "; ".join(f"{a.upstream}: {a.status} {a.body[:200]}" for a in failed)
        raise HTTPException(502, f"not every upstream paused (is VLLM_SERVER_DEV_MODE=1 set?): {detail}")
    return _state(request, rl, answers)


@router.post("/resume", response_model=PauseOut, responses={409: {}, 503: {}})
async def resume(request: Request) -> PauseOut:
    """Resume every upstream, then release the held calls. 409 when a pause came meanwhile (the
    last request wins: the fleet stays paused)."""
    rl = _rl(request)
    try:
        answers = await rl.resume()
    except SupersededError:
        raise HTTPException(409, _SUPERSEDED) from None
    except FleetUnavailableError:
        raise HTTPException(503, _NO_FLEET) from None
    return _state(request, rl, answers)


@router.get("/pause", response_model=PauseOut)
async def pause_state(request: Request) -> PauseOut:
    """Whether the fleet is paused, how many calls wait, and each upstream's policy version."""
    return _state(request, _rl(request), [])


def _group_id(group_id: Annotated[str, Path(description="The X-Trajectory-Group value")]) -> str:
    try:
        return validate_trajectory_id(group_id.encode(), "group id")
    except ProxyRequestError as exc:
        raise HTTPException(400, exc.message) from None


@router.get("/groups/{group_id}", response_model=GroupOut)
def get_group(request: Request, group_id: Annotated[str, Depends(_group_id)]) -> GroupOut:
    """The trajectories of a group with their rewards and group-normalised advantages."""
    with request.app.state.runtime.engine.connect() as connection:
        rows = queries.group_trajectories(connection, group_id)
    if not rows:
        raise HTTPException(404, f"no trajectory in group {group_id!r}")
    advantages = group_advantages([row["reward"] for row in rows])
    members = [_member(row, advantage) for row, advantage in zip(rows, advantages, strict=True)]
    return GroupOut(group_id=group_id, trajectories=members)


def _member(row: dict[str, Any], advantage: float | None) -> GroupMember:
    return GroupMember(
        trajectory_id=row["id"],
        reward=row["reward"],
        advantage=advantage,
        finished=row["finished"],
        call_count=row["call_count"],
        completion_tokens=row["completion_tokens"],
    )


@router.post("/trajectories/{trajectory_id}/group", response_model=TrajectoryOut)
def set_group(request: Request, trajectory_id: TrajectoryId, body: GroupIn) -> TrajectoryOut:
    """Put a trajectory in a group (as the ``X-Trajectory-Group`` header does)."""
    group_id = _group_id(body.group_id)
    with request.app.state.runtime.engine.begin() as connection:
        queries.set_group(connection, trajectory_id, group_id)
        return TrajectoryOut.model_validate(_existing(connection, trajectory_id))
