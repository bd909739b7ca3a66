"""Several vLLM upstreams: a trajectory sticks to one (its prefix cache stays warm), others balance.

Calls with a trajectory id go to the healthy upstream with the highest rendezvous score for that id
(highest random weight hashing): every proxy replica picks the same one without talking to the
others, and when an upstream goes away only its own trajectories move. Calls without an id go to the
healthy upstream with the fewest calls in flight. Upstreams are probed on ``/health`` in the
background and are also marked down the moment a connection to them is refused (not when this
machine ran out of its own resources); one that answers its probe again is used again.

(Named a balancer: "pool" in this package means only the client's pool of connections.)
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from tokentrail.proxy.upstream.client import UpstreamClient
from tokentrail.proxy.upstream.errors import UpstreamError

logger = logging.getLogger(__name__)

HEALTH_PATH = "/health"
HEALTH_TIMEOUT_S = 2.0


@dataclass(eq=False, slots=True)
class Upstream:
    url: str
    healthy: bool = True
    in_flight: int = 0
    downs: int = 0  # times marked down by a call: a probe begun before the last one is out of date

    @property
    def url_bytes(self) -> bytes:
        return self.url.encode()


def rendezvous_score(trajectory_id: str, url: str) -> int:
    digest = hashlib.blake2b(f"{trajectory_id}\x00{url}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class UpstreamBalancer:
    """Picks an upstream per call and keeps the health of each."""

    def __init__(self, urls: list[str]) -> None:
        if not urls:
            raise ValueError("at least one upstream is needed")
        self.upstreams = [Upstream(url) for url in urls]
        # told an upstream's URL when it is found down, and when it answers again after that
        self.on_down: list[Callable[[str], None]] = []
        self.on_back: list[Callable[[str], None]] = []

    def pick(self, trajectory_id: str | None, exclude: Upstream | None = None) -> Upstream:
        """The upstream for a call (``exclude``: one that just refused the connection)."""
        if len(self.upstreams) == 1:
            return self.upstreams[0]
        candidates = [u for u in self.upstreams if u.healthy and u is not exclude]
        if not candidates:  # all down: keep trying them rather than refusing outright
            candidates = [u for u in self.upstreams if u is not exclude] or self.upstreams
        if trajectory_id is None:
            return min(candidates, key=lambda u: u.in_flight)
        return max(candidates, key=lambda u: rendezvous_score(trajectory_id, u.url))

    def has_alternative(self, upstream: Upstream) -> bool:
        return any(u.healthy and u is not upstream for u in self.upstreams)

    def mark_down(self, upstream: Upstream, reason: str) -> None:
        if upstream.healthy and len(self.upstreams) > 1:
            logger.warning("upstream=<%s>, reason=<%s> | upstream marked down", upstream.url, reason)
        upstream.downs += 1
        if upstream.healthy:
            upstream.healthy = False
            for listener in self.on_down:
                listener(upstream.url)

    def answered(self, upstream: Upstream) -> None:
        """The upstream answered a call: healthy again if it was down (with one upstream nothing else
        probes it)."""
        if not upstream.healthy:
            self._set_healthy(upstream, True)

    def _set_healthy(self, upstream: Upstream, healthy: bool) -> None:
        if healthy == upstream.healthy:
            return
        logger.warning("upstream=<%s>, healthy=<%s> | upstream health changed", upstream.url, healthy)
        upstream.healthy = healthy
        for listener in self.on_back if healthy else self.on_down:
            listener(upstream.url)

    async def probe(self, client: UpstreamClient) -> None:
        """Probe every upstream once."""

        async def one(upstream: Upstream) -> None:
            downs = upstream.downs
            try:
                response = await client.send(
                    "GET", upstream.url + HEALTH_PATH, [], b"", timeout_s=HEALTH_TIMEOUT_S
                )
                healthy = response.status_code == 200
                await response.aclose()
            except UpstreamError:
                healthy = False
            if healthy and upstream.downs != downs:  # a call found it down while this probe ran
                return
            self._set_healthy(upstream, healthy)

        await asyncio.gather(*(one(u) for u in self.upstreams))

    async def watch(self, client: UpstreamClient, interval_s: float) -> None:
        """Probe forever (a background task of the app's lifespan; only with several upstreams).

        Upstreams start as healthy; one that is down at startup is marked down by the first refused
        connection, before any probe.
        """
        while True:
            await asyncio.sleep(interval_s)
            await self.probe(client)
