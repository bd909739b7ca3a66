"""Pause, resume and policy versions for a whole fleet of relays, in one place.

Why: under ``serve --workers N`` each worker had its own pause gate and its own idea of the policy
version. A resume that reached another worker than the pause opened only that worker's gate, so the
pausing worker held its calls until ``TOKENTRAIL_PAUSE_MAX_WAIT_S`` (6 of 12 held calls timed out in a
measured run); and a version set through one worker was known to that worker alone, so the others
stamped their calls with the old one.

``ControlPlane`` decides; the relays are its ``Members`` and only do what it tells them: close their
gate, let their running calls finish, open with the versions it learned. In one process the relay is
its only member (``rl/loop.py``); under ``serve --workers`` the control plane runs in the supervisor
and every worker is a member over a Unix socket (``proxy/fleet/``). Either way:

* pause and resume are serialised and the last request wins: each takes the next generation; a newer
  one ends a pause that still waits for calls to finish (``SupersededError``), and only the latest
  acts on vLLM and on the gates, one at a time (the ``Sequencer``: this host's, or with replicas on
  one database every replica's, ``proxy/fleet/replicas.py``);
* the versions are learned from every upstream's ``/weight_info`` before any gate opens again, so
  every relay knows the new version before it sends its next call;
* a version changed by a control call passing through one relay (``/update_weight_version``) is told
  to every member before that call's answer goes back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from tokentrail.proxy.rl.pause import PauseMode
from tokentrail.proxy.rl.weights import WEIGHT_INFO_PATH, version_in_weight_info
from tokentrail.proxy.upstream.client import UpstreamClient, UpstreamError

logger = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 600.0  # vLLM's pause?mode=wait returns only once its requests are done

Versions = dict[str, str | None]  # upstream URL -> its policy version (None: it has none)


@dataclass
class UpstreamAnswer:
    upstream: str
    status: int | None
    body: str


class SupersededError(Exception):
    """A newer pause or resume came before this one could act; the newer one decides."""


class FleetUnavailableError(Exception):
    """The fleet's control plane cannot be reached: the supervisor is stopping or gone, or the
    database the replicas share is away."""


class Members(Protocol):
    """The relays a control plane speaks for (one, or every worker of a host)."""

    def newer(self) -> None:
        """A newer pause or resume came: a ``drain`` in progress returns False."""

    async def close(self, mode: PauseMode) -> None:
        """Hold new recorded calls; with ``abort``, note the running ones as being aborted."""

    async def drain(self) -> bool:
        """Until no recorded call runs (True), or a newer request came (False)."""

    async def open(self, versions: Versions) -> None:
        """Take ``versions``, then let the held calls go."""

    async def set_versions(self, versions: Versions) -> None:
        """Take ``versions`` (the gate stays as it is)."""


class Sequencer(Protocol):
    """Which pause or resume is the latest, and whose turn it is to act on vLLM and the gates."""

    async def next(self) -> int:
        """A new request's generation: greater than every one before it."""

    async def latest(self) -> int:
        """The latest request's generation."""

    def turn(self, generation: int) -> AbstractAsyncContextManager[None]:
        """Held while the request of ``generation`` acts (the others wait)."""


class LocalSequencer:
    """The sequencer of one host: a counter and a lock."""

    def __init__(self) -> None:
        self._generation = 0
        self._lock = asyncio.Lock()

    async def next(self) -> int:
        self._generation += 1
        return self._generation

    async def latest(self) -> int:
        return self._generation

    def turn(self, generation: int) -> AbstractAsyncContextManager[None]:
        return self._lock


@dataclass
class ControlState:
    paused: PauseMode | None
    versions: Versions


class ControlPlane:
    """Pause, resume and versions over ``members``, calling vLLM's own routes on every upstream."""

    def __init__(
        self,
        upstreams: Callable[[], list[str]],
        client: UpstreamClient,
        members: Members,
        *,
        learn_versions: bool = True,
    ) -> None:
        self._upstreams = upstreams
        self._client = client
        self.members = members
        self.learn = learn_versions
        self.state = ControlState(None, {})
        self.sequencer: Sequencer = LocalSequencer()

    async def pause(self, mode: PauseMode) -> list[UpstreamAnswer]:
        """Close every member's gate, then pause every upstream.

        ``wait``: the calls already sent finish first, and only then is vLLM paused (vLLM's own
        ``wait`` would hold a request that arrives a moment after it, and TokenTrail would wait for
        that one forever). Raises ``TimeoutError`` when they take longer than ``CONTROL_TIMEOUT_S``
        (the gates stay closed: resume opens them), ``SupersededError`` when a newer request came.
        """
        generation = await self._next_generation()
        async with self.sequencer.turn(generation):
            await self._check_latest(generation)
            await self._set_gates(mode, self.members.close(mode))
            if mode == PauseMode.WAIT:
                drained = await asyncio.wait_for(self.members.drain(), CONTROL_TIMEOUT_S)
                if not drained:
                    raise SupersededError
            await self._check_latest(generation)
            answers = await self._everywhere("POST", f"/pause?mode={mode}")
        logger.warning("mode=<%s> | fleet paused", mode)
        return answers

    async def resume(self) -> list[UpstreamAnswer]:
        """Resume every upstream, learn their versions, then open every member's gate (unless a
        newer pause came meanwhile: ``SupersededError``, the gates stay closed)."""
        generation = await self._next_generation()
        async with self.sequencer.turn(generation):
            await self._check_latest(generation)
            answers = await self._everywhere("POST", "/resume")
            await self.learn_versions()  # weights may have changed by routes TokenTrail did not see
            await self._check_latest(generation)
            await self._set_gates(None, self.members.open(dict(self.state.versions)))
        logger.warning("fleet resumed")
        return answers

    async def _set_gates(self, paused: PauseMode | None, members_done: Awaitable[None]) -> None:
        """The state says ``paused`` (a worker that connects meanwhile is told it) while the members
        take it; the state before comes back if they could not (the fleet's database is away)."""
        before = self.state.paused
        self.state.paused = paused
        try:
            await members_done
        except FleetUnavailableError:
            self.state.paused = before
            raise

    async def share_versions(self, versions: Versions) -> None:
        """A relay saw a control call change a version: every member takes it before the call's
        answer goes back."""
        self.state.versions.update(versions)
        await self.members.set_versions(versions)

    async def learn_versions(self) -> bool:
        """Ask every upstream for its policy version and tell the members; True when each answered at
        all (a 404 comes from a vLLM without ``VLLM_SERVER_DEV_MODE``, which has no versions)."""
        if not self.learn:
            return True
        answered = True
        learned: Versions = {}
        for answer in await self._everywhere("GET", WEIGHT_INFO_PATH):
            if answer.status == 200:
                version = version_in_weight_info(answer.body.encode())
                if version is not None:
                    learned[answer.upstream] = version
            elif answer.status is None:  # not up yet; any HTTP answer (404 without dev mode) is final
                answered = False
        if learned:
            self.state.versions.update(learned)
            await self.members.set_versions(learned)
        return answered

    async def relearn(self) -> bool:
        """An upstream answered again after it was down (it may have restarted with other weights)."""
        return await self.learn_versions()

    async def learn_versions_until_known(self, retry_s: float = 2.0) -> None:
        """At start (a background task): vLLM may come up after TokenTrail, so ask until it answers
        (and until the fleet took what was learned)."""
        while True:
            try:
                if await self.learn_versions():
                    return
            except FleetUnavailableError as exc:
                logger.warning("error=<%s> | versions learned but not shared yet", exc)
            await asyncio.sleep(retry_s)

    async def _next_generation(self) -> int:
        generation = await self.sequencer.next()
        self.members.newer()
        return generation

    async def _check_latest(self, generation: int) -> None:
        if generation != await self.sequencer.latest():
            raise SupersededError

    async def _everywhere(self, method: str, path: str) -> list[UpstreamAnswer]:
        return list(await asyncio.gather(*(self._one(url, method, path) for url in self._upstreams())))

    async def _one(self, url: str, method: str, path: str) -> UpstreamAnswer:
        try:
            response = await self._client.send(method, url + path, [], b"", timeout_s=CONTROL_TIMEOUT_S)
            try:
                body = b"".join([chunk async for chunk in response.iter_raw()])
            finally:
                await response.aclose()
        except UpstreamError as exc:
            logger.warning("upstream=<%s>, path=<%s>, error=<%s> | control call failed", url, path, exc)
            return UpstreamAnswer(url, None, type(exc).__name__)
        return UpstreamAnswer(url, response.status_code, body.decode("utf-8", "replace")[:2000])
