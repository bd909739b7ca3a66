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
from tokentrail.proxy.upstream.balancer import Upstream, UpstreamBalancer
from tokentrail.proxy.upstream.client import UpstreamClient, UpstreamError

logger = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 600.0  # vLLM's pause?mode=wait returns only once its requests are done


@dataclass
class UpstreamAnswer:
    upstream: str
    status: int | None
    body: str


class SupersededError(Exception):
    """A newer pause or resume came before this one could act; the newer one decides."""


class RlLoop:
    """Pause gate, policy versions and fleet-wide control calls for one proxy process."""

    def __init__(
        self,
        balancer: UpstreamBalancer,
        client: UpstreamClient,
        pause_max_wait_s: float,
        *,
        learn_versions: bool = True,
    ) -> None:
        self.learn = learn_versions
        self.balancer = balancer
        self.client = client
        self.pause_max_wait_s = pause_max_wait_s
        self.gate = PauseGate()
        self.weights = WeightVersions()
        self._idle = asyncio.Event()
        self._idle.set()
        self._running: set[RunningCall] = set()  # every recorded call sent upstream and not ended
        self._aborting: set[RunningCall] = set()
        # Pause and resume: each request takes the next generation; only the latest acts on vLLM
        # and the gate, one at a time (see ``pause``).
        self._generation = 0
        self._control_lock = asyncio.Lock()
        self._newer_request = asyncio.Event()

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
        if any(c.finish_reason == "abort" for c in record.choices) or (aborting and (broken or unfinished)):
            record.outcome = Outcome.ABORTED
        record.version_times = {
            version: self.weights.learned_at[version]
            for version in [record.weight_version, *(s["version"] for s in record.weight_versions or [])]
            if version is not None and version in self.weights.learned_at
        }

    # ---- the control plane ----

    async def pause(self, mode: PauseMode) -> list[UpstreamAnswer]:
        """Hold new recorded calls here, then pause every upstream.

        ``wait``: the calls TokenTrail has already sent finish first, and only then is vLLM paused
        (vLLM's own ``wait`` would hold a request that arrives a moment after it, and TokenTrail would
        wait for that one forever). Raises ``TimeoutError`` when they take longer than
        ``CONTROL_TIMEOUT_S`` (the gate stays closed: resume opens it).

        Pause and resume are serialised and the last request wins: a resume that comes while a pause
        waits for calls to finish ends that pause (``SupersededError``, nothing paused), and whichever
        comes last decides both vLLM's state and the gate's.
        """
        generation = self._next_generation()
        self.gate.pause(mode)
        if mode == PauseMode.WAIT:
            await asyncio.wait_for(self._drained_or_newer(generation), CONTROL_TIMEOUT_S)
        async with self._control_lock:
            self._check_latest(generation)
            if mode == PauseMode.ABORT:
                self._aborting.update(self._running)
            answers = await self._everywhere("POST", f"/pause?mode={mode}")
        logger.warning("mode=<%s>, held=<%d> | fleet paused", mode, self.gate.held_now)
        return answers

    async def resume(self) -> list[UpstreamAnswer]:
        """Resume every upstream, then let the held calls go (unless a newer pause came meanwhile)."""
        generation = self._next_generation()
        async with self._control_lock:
            self._check_latest(generation)
            answers = await self._everywhere("POST", "/resume")
            self._aborting.clear()
            await self.learn_versions()  # weights may have changed by routes TokenTrail did not see
            self._check_latest(generation)  # a pause that came meanwhile keeps the gate closed
            held = self.gate.held_now
            self.gate.resume()
        logger.warning("held=<%d> | fleet resumed", held)
        return answers

    def _next_generation(self) -> int:
        self._generation += 1
        self._newer_request.set()  # wakes a pause that waits for calls to finish
        self._newer_request = asyncio.Event()
        return self._generation

    def _check_latest(self, generation: int) -> None:
        if generation != self._generation:
            raise SupersededError

    async def _drained_or_newer(self, generation: int) -> None:
        """Until no call is running, or a newer pause or resume came (then ``SupersededError``)."""
        while not self._idle.is_set():
            self._check_latest(generation)
            newer = asyncio.ensure_future(self._newer_request.wait())
            idle = asyncio.ensure_future(self._idle.wait())
            try:
                await asyncio.wait((newer, idle), return_when=asyncio.FIRST_COMPLETED)
            finally:
                newer.cancel()
                idle.cancel()
        self._check_latest(generation)

    async def learn_versions(self) -> bool:
        """Ask every upstream for its policy version; True when each answered at all (a 404 comes from
        a vLLM without ``VLLM_SERVER_DEV_MODE``, which has no versions to tell)."""
        if not self.learn:
            return True
        answered = True
        for answer in await self._everywhere("GET", WEIGHT_INFO_PATH):
            if answer.status == 200:
                self.weights.learn_weight_info(answer.upstream, answer.body.encode())
            elif answer.status is None:  # not up yet; any HTTP answer (404 without dev mode) is final
                answered = False
        return answered

    async def learn_versions_until_known(self, retry_s: float = 2.0) -> None:
        """At start (a background task): vLLM may come up after TokenTrail, so ask until it answers."""
        while not await self.learn_versions():  # noqa: ASYNC110 - nothing to wait on but time
            await asyncio.sleep(retry_s)

    async def _everywhere(self, method: str, path: str) -> list[UpstreamAnswer]:
        return list(await asyncio.gather(*(self._one(u, method, path) for u in self.balancer.upstreams)))

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
