"""The RL control plane as TokenTrail runs it: the pause gate, policy versions, and vLLM's own
control routes called on every upstream at once.

The relay asks three things of it on each recorded call (pass the gate, note the version when the
request goes out, close the version spans at the end) and tells it about the control calls that pass
through; TokenTrail's API (``/tokentrail/v1/pause``, ``/resume``) pauses and resumes the fleet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from tokentrail.proxy.recording.records import CallRecord, Outcome
from tokentrail.proxy.rl.pause import PauseGate, PauseMode
from tokentrail.proxy.rl.weights import WEIGHT_INFO_PATH, RunningCall, WeightVersions
from tokentrail.proxy.upstream.balancer import Upstream, UpstreamPool
from tokentrail.proxy.upstream.client import UpstreamClient, UpstreamError

logger = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 600.0  # vLLM's pause?mode=wait returns only once its requests are done


@dataclass
class UpstreamAnswer:
    upstream: str
    status: int | None
    body: str


class RlLoop:
    """Pause gate, policy versions and fleet-wide control calls for one proxy process."""

    def __init__(self, pool: UpstreamPool, client: UpstreamClient, pause_max_wait_s: float) -> None:
        self.pool = pool
        self.client = client
        self.pause_max_wait_s = pause_max_wait_s
        self.gate = PauseGate()
        self.weights = WeightVersions()
        self._idle = asyncio.Event()
        self._idle.set()
        self._aborting: set[RunningCall] = set()

    # ---- the relay's side ----

    async def admit(self) -> bool:
        """Wait while paused; False when the pause outlasted ``pause_max_wait_s`` (answer 503)."""
        return await self.gate.wait(self.pause_max_wait_s)

    def begin(
        self, record: CallRecord, upstream: str, policy_header: str | None, generated: Callable[[], int]
    ) -> RunningCall:
        """The call's request goes to ``upstream`` now: note its policy version, watch for changes."""
        record.weight_version = policy_header if policy_header is not None else self.weights.current(upstream)
        call = RunningCall(record, upstream, generated, record.stream)
        if policy_header is None:
            self.weights.start(call)
        self._idle.clear()
        return call

    def end(self, call: RunningCall, total_generated: int) -> None:
        """The call is over: version spans, and ``aborted`` for a call a pause aborted."""
        self.weights.stop(call)
        call.finish(total_generated)
        if call in self._aborting:
            self._aborting.discard(call)
            record = call.record
            cut = any(c.finish_reason == "abort" for c in record.choices)
            if cut or record.outcome != Outcome.OK:
                record.outcome = Outcome.ABORTED
        if not self.weights.running():
            self._idle.set()

    # ---- the control plane ----

    async def pause(self, mode: PauseMode) -> list[UpstreamAnswer]:
        """Hold new recorded calls here, pause every upstream, and (``wait``) return once the calls
        already running are done."""
        self.gate.pause(mode)
        if mode == PauseMode.ABORT:
            self._aborting.update(self.weights.running())
        answers = await self._everywhere("POST", f"/pause?mode={mode}")
        if mode == PauseMode.WAIT:
            await asyncio.wait_for(self._idle.wait(), CONTROL_TIMEOUT_S)
        logger.warning("mode=<%s>, held=<%d> | fleet paused", mode, self.gate.held_now)
        return answers

    async def resume(self) -> list[UpstreamAnswer]:
        """Resume every upstream, then let the held calls go."""
        answers = await self._everywhere("POST", "/resume")
        held = self.gate.held_now
        self.gate.resume()
        logger.warning("held=<%d> | fleet resumed", held)
        return answers

    async def learn_versions(self) -> None:
        """Ask every upstream for its policy version (at start; after an upstream comes back)."""
        for answer in await self._everywhere("GET", WEIGHT_INFO_PATH):
            if answer.status == 200:
                self.weights.learn_weight_info(answer.upstream, answer.body.encode())

    async def _everywhere(self, method: str, path: str) -> list[UpstreamAnswer]:
        return list(await asyncio.gather(*(self._one(u, method, path) for u in self.pool.upstreams)))

    async def _one(self, upstream: Upstream, method: str, path: str) -> UpstreamAnswer:
        try:
            response = await self.client.send(
                method, upstream.url + path, [], b"", timeout_s=CONTROL_TIMEOUT_S
            )
            try:
                body = b"".join([chunk async for chunk in response.iter_raw()])
            finally:
                await response.aclose()
        except UpstreamError as exc:
            logger.warning(
                "upstream=<%s>, path=<%s>, error=<%s> | control call failed", upstream.url, path, exc
            )
            return UpstreamAnswer(upstream.url, None, type(exc).__name__)
        return UpstreamAnswer(upstream.url, response.status_code, body.decode("utf-8", "replace")[:2000])
