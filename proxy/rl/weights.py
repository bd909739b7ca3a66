"""Which policy version each call ran under, learned from the control calls that pass through.

Where a version comes from, most specific first:

* the request header ``X-Policy-Version`` (the trainer knows best; it wins);
* the last version the upstream was told, seen on its way through TokenTrail:
  ``POST /update_weight_version {"new_version"}`` or ``POST /finish_weight_update {"weight_version"}``
  answered 2xx, or a ``GET /weight_info`` answer;
* ``GET /weight_info`` asked by TokenTrail itself at start and whenever an upstream comes back, so a
  restarted proxy knows the version without having seen the update (vLLM answers it only with
  ``VLLM_SERVER_DEV_MODE=1``; otherwise the version stays unknown, ``None``).

A call takes the version current when its request is sent. If the version changes while it runs,
its record gets spans over its generated tokens, ``[{"version", "start", "end"}]``: for a stream the
boundary is the number of tokens TokenTrail had relayed when it saw the change (exact when the
trainer pauses with ``mode=keep`` around the update, as vLLM then generates nothing in between); for
an answer that arrives whole the boundary is unknown (``null``). vLLM's own per-token spans
(``WeightVersionSpan``) are only exposed on its tokens-in/tokens-out route, not on chat completions.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tokentrail.proxy.recording.records import CallRecord

logger = logging.getLogger(__name__)

POLICY_VERSION_HEADER = b"x-policy-version"
WEIGHT_INFO_PATH = "/weight_info"
_VERSION_FIELDS = {"/update_weight_version": "new_version", "/finish_weight_update": "weight_version"}


@dataclass(eq=False)
class RunningCall:
    """A recorded call in flight on one upstream, and how many tokens it has generated so far."""

    record: CallRecord
    upstream: str
    generated: Callable[[], int]
    streamed: bool
    boundaries: list[tuple[str | None, int | None]] = field(default_factory=list)

    def version_changed(self, version: str | None) -> None:
        self.boundaries.append((version, self.generated() if self.streamed else None))

    def finish(self, total: int) -> None:
        """Spans on the record when the version changed while the call ran."""
        if not self.boundaries:
            return
        spans: list[dict[str, object]] = []
        version: str | None = self.record.weight_version
        start: int | None = 0
        for new_version, at in self.boundaries:
            spans.append({"version": version, "start": start, "end": at})
            version, start = new_version, at
        spans.append({"version": version, "start": start, "end": total})
        self.record.weight_versions = spans


class WeightVersions:
    """The current policy version of each upstream, and the calls running on each."""

    def __init__(self) -> None:
        self._current: dict[str, str | None] = {}
        self._running: dict[str, set[RunningCall]] = {}
        # when this process first learned each version: the order staleness is counted in (a call's
        # own arrival time can precede the version it ends under)
        self.learned_at: dict[str, float] = {}

    def current(self, upstream: str) -> str | None:
        return self._current.get(upstream)

    def set(self, upstream: str, version: str | None) -> None:
        """The upstream now runs ``version``; calls running there note where it changed."""
        if version is not None:
            self.learned_at.setdefault(version, time.time())
        known = upstream in self._current
        if known and self._current[upstream] == version:
            return
        self._current[upstream] = version
        if not known:  # the first version learned for this upstream: no call saw it change
            return
        logger.info("upstream=<%s>, weight_version=<%s> | policy version changed", upstream, version)
        for call in self._running.get(upstream, ()):
            call.version_changed(version)

    def start(self, call: RunningCall) -> None:
        self._running.setdefault(call.upstream, set()).add(call)

    def stop(self, call: RunningCall) -> None:
        running = self._running.get(call.upstream)
        if running is not None:
            running.discard(call)

    def running(self, upstream: str | None = None) -> list[RunningCall]:
        if upstream is not None:
            return list(self._running.get(upstream, ()))
        return [call for calls in self._running.values() for call in calls]

    def observe(
        self, upstream: str, method: str, path: str, request: bytes, status: int, answer: bytes
    ) -> None:
        """Learn from a control call that passed through (only its 2xx answers count)."""
        if not 200 <= status < 300:
            return
        if method == "POST" and path in _VERSION_FIELDS:
            version = _field(request, _VERSION_FIELDS[path])
            if version is not None:
                self.set(upstream, version)
        elif method == "GET" and path == WEIGHT_INFO_PATH:
            self.learn_weight_info(upstream, answer)

    def learn_weight_info(self, upstream: str, answer: bytes) -> None:
        version = version_in_weight_info(answer)
        if version is not None:
            self.set(upstream, version)


def version_in_weight_info(answer: bytes) -> str | None:
    """The version in vLLM's ``GET /weight_info`` answer (None when it names none we can store)."""
    return _field(answer, "weight_version")


def is_control_path(path: str) -> bool:
    """Whether a pass-through call can change or tell the policy version (its bytes are then kept)."""
    return path in _VERSION_FIELDS or path == WEIGHT_INFO_PATH


MAX_VERSION_LENGTH = 256


def _field(body: bytes, name: str) -> str | None:
    """A version named in a control call's JSON; one that could not be stored (over 256 characters,
    not printable) is ignored with a warning rather than breaking every record after it."""
    try:
        value = json.loads(body).get(name)
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    if value is None:
        return None
    version = str(value)
    if not version or len(version) > MAX_VERSION_LENGTH or not version.isprintable():
        logger.warning(
            "length=<%d> | ignored a policy version that is empty, too long or not printable", len(version)
        )
        return None
    return version
