"""The RL loop as one relay process runs it: the pause gate, policy versions, running calls.

The relay asks three things of it on each recorded call (pass the gate, note the version when the
request goes out, close the version spans at the end) and tells it about the control calls that pass
through. Pause, resume and versions are decided by a ``ControlPlane`` (``rl/control.py``): this
process's own, of which this loop is the only member, or under ``serve --workers`` the supervisor's,
reached through ``FleetLink`` (``proxy/fleet/``), of which every worker's loop is a member.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from tokentrail.proxy.recording.records import CallRecord, Outcome, ended_by_vllm_abort
from tokentrail.proxy.rl.control import (
    CONTROL_TIMEOUT_S,
    ControlPlane,
    SupersededError,
    UpstreamAnswer,
    Versions,
)
from tokentrail.proxy.rl.pause import PauseGate, PauseMode
from tokentrail.proxy.rl.weights import RunningCall, WeightVersions
from tokentrail.proxy.upstream.balancer import UpstreamBalancer
from tokentrail.proxy.upstream.client import UpstreamClient

logger = logging.getLogger(__name__)

__all__ = ["CONTROL_TIMEOUT_S", "Control", "RlLoop", "SupersededError", "UpstreamAnswer"]


class Control(Protocol):
    """Where pause, resume and version changes are decided (``ControlPlane`` or ``FleetLink``)."""

    async def pause(self, mode: PauseMode) -> list[UpstreamAnswer]: ...

    async def resume(self) -> list[UpstreamAnswer]: ...

    async def share_versions(self, versions: Versions) -> None: ...

    async def relearn(self) -> bool: ...


class RlLoop:
    """Pause gate, policy versions and running calls of one proxy process; a ``Members`` of the
    control plane that decides for it."""

    def __init__(
        self,
        balancer: UpstreamBalancer,
        client: UpstreamClient,
        pause_max_wait_s: float,
        *,
        learn_versions: bool = True,
    ) -> None:
        self.balancer = balancer
        self.pause_max_wait_s = pause_max_wait_s
        self.gate = PauseGate()
        self.weights = WeightVersions()
        self._idle = asyncio.Event()
        self._idle.set()
        self._running: set[RunningCall] = set()  # every recorded call sent upstream and not ended
        self._aborting: set[RunningCall] = set()
        self._newer_request = asyncio.Event()
        # this process decides alone until ``control`` is set to a fleet's (``FleetLink``)
        self.local_control = ControlPlane(
            lambda: [u.url for u in balancer.upstreams], client, self, learn_versions=learn_versions
        )
        self.control: Control = self.local_control
        # An upstream that went away may come back restarted, with other weights: its version is
        # unknown (None, never the old one) until it is asked again, as soon as it answers.
        self._relearning: set[asyncio.Task[bool]] = set()
        balancer.on_down.append(self._upstream_lost)
        balancer.on_back.append(self._upstream_back)

    # ---- the relay's side ----

    async def admit(self) -> bool:
        """Wait while paused; False when the pause outlasted ``pause_max_wait_s`` (answer 503)."""
        return await self.gate.wait(self.pause_max_wait_s)

    def begin(
        self, record: CallRecord, upstream: str, policy_header: str | None, generated: Callable[[], int]
    ) -> RunningCall:
        """The call's request goes to ``upstream`` now: note its policy version, watch for changes."""
        record.weight_version = policy_header if policy_header is not None else self.weights.current(upstream)
        record.weight_versions = None
        call = RunningCall(record, upstream, generated, record.stream)
        if policy_header is None:  # the client's own version is not changed by the upstream's
            self.weights.start(call)
        self._running.add(call)
        self._idle.clear()
        return call

    def forget(self, call: RunningCall) -> None:
        """An attempt that failed before an answer (the call is sent again, or ends)."""
        self.weights.stop(call)
        self._running.discard(call)
        self._aborting.discard(call)
        if not self._running:
            self._idle.set()

    def reads_answer(self, call: RunningCall) -> bool:
        """Whether ``end`` needs the call's answer read: the version changed while it ran (spans over
        its tokens), or an abort pause is in force (an unfinished answer is then ``aborted``)."""
        return bool(call.boundaries) or call in self._aborting

    def end(self, call: RunningCall, total_generated: int) -> None:
        """The call is over: version spans, and ``aborted`` for a call vLLM aborted: finish reason
        ``abort``, or, while an abort pause was in force, an answer broken off or one that ended with
        a choice unfinished (vLLM 0.32 ends a stream it aborted before its first token with the role
        chunk and ``[DONE]``, no finish reason at all)."""
        aborting = call in self._aborting
        self.forget(call)
        call.finish(total_generated)
        record = call.record
        broken = record.outcome in (Outcome.UPSTREAM_DIED, Outcome.UPSTREAM_ERROR)
        unfinished = record.outcome == Outcome.OK and (
            not record.choices or any(c.finish_reason is None for c in record.choices)
        )
        if ended_by_vllm_abort(record) or (aborting and (broken or unfinished)):
            record.outcome = Outcome.ABORTED
        record.version_times = {
            version: self.weights.learned_at[version]
            for version in [record.weight_version, *(s["version"] for s in record.weight_versions or [])]
            if version is not None and version in self.weights.learned_at
        }

    # ---- the control plane (decided by ``control``) ----

    async def pause(self, mode: PauseMode) -> list[UpstreamAnswer]:
        """Pause the fleet (``ControlPlane.pause``)."""
        return await self.control.pause(mode)

    async def resume(self) -> list[UpstreamAnswer]:
        """Resume the fleet (``ControlPlane.resume``)."""
        return await self.control.resume()

    async def observed(
        self, upstream: str, method: str, path: str, request: bytes, status: int, answer: bytes
    ) -> None:
        """A control call passed through: learn from it, and when it changed the upstream's version,
        the whole fleet learns it before its answer goes back."""
        before = self.weights.current(upstream)
        self.weights.observe(upstream, method, path, request, status, answer)
        after = self.weights.current(upstream)
        if after != before:
            try:
                await self.control.share_versions({upstream: after})
            except Exception as exc:  # the control plane is going away: this worker knows it at least
                name = type(exc).__name__
                logger.warning("upstream=<%s>, error=<%s> | version change not shared", upstream, name)

    def _upstream_lost(self, upstream: str) -> None:
        if self.weights.current(upstream) is not None:
            self.weights.set(upstream, None)

    def _upstream_back(self, upstream: str) -> None:
        task = asyncio.get_running_loop().create_task(self._relearn(upstream))
        self._relearning.add(task)
        task.add_done_callback(self._relearning.discard)

    async def _relearn(self, upstream: str) -> bool:
        try:
            return await self.control.relearn()
        except Exception as exc:  # the control plane is going away: the version stays unknown
            logger.warning(
                "upstream=<%s>, error=<%s> | version not learned again", upstream, type(exc).__name__
            )
            return False

    # ---- as a member of the control plane ----

    def newer(self) -> None:
        self._newer_request.set()  # wakes a drain of an older request
        self._newer_request = asyncio.Event()

    async def close(self, mode: PauseMode) -> None:
        self.gate.pause(mode)
        if mode == PauseMode.ABORT:
            self._aborting.update(self._running)

    async def drain(self) -> bool:
        newer = self._newer_request
        while not self._idle.is_set():
            if newer.is_set():
                return False
            waits = [asyncio.ensure_future(newer.wait()), asyncio.ensure_future(self._idle.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
        return not newer.is_set()

    async def open(self, versions: Versions) -> None:
        await self.set_versions(versions)
        self._aborting.clear()
        held = self.gate.held_now
        self.gate.resume()
        if held:
            logger.info("held=<%d> | held calls let go", held)

    async def set_versions(self, versions: Versions) -> None:
        for upstream, version in versions.items():
            self.weights.set(upstream, version)
