"""Which policy produced a training sequence, how stale it is, and its GRPO group: the export's RL
columns and filters.

A sequence's ``weight_version`` is the oldest version among its calls (its first tokens are the
stalest); ``staleness`` counts the versions first seen after it (``weight_versions`` keeps the order
in which TokenTrail saw them, whatever they are called). A sequence whose calls have no known version
has neither, and is left out by ``--min-weight-version`` and ``--max-staleness``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select

from tokentrail.proxy.rl.groups import group_advantages
from tokentrail.proxy.storage import queries
from tokentrail.proxy.storage.models import WeightVersionSeen
from tokentrail.proxy.training.sequences import TrainingSequence

VERSIONS = WeightVersionSeen.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class PolicyFilter:
    min_weight_version: str | None = None
    max_staleness: int | None = None
    certificate: str | None = None  # keep only sequences whose every call has this certificate

    @property
    def active(self) -> bool:
        return (
            self.min_weight_version is not None
            or self.max_staleness is not None
            or self.certificate is not None
        )


class UnknownWeightVersionError(ValueError):
    """--min-weight-version names a version the database has never seen."""


def version_ranks(connection: Connection) -> dict[str, int]:
    """Each version's place in the order TokenTrail first saw them (0: the oldest)."""
    rows = connection.execute(
        select(VERSIONS.c.version).order_by(VERSIONS.c.first_seen_at, VERSIONS.c.version)
    )
    return {version: rank for rank, (version,) in enumerate(rows)}


def call_versions(connection: Connection, call_ids: Iterable[str]) -> dict[str, str | None]:
    ids = list(call_ids)
    if not ids:
        return {}
    calls = queries.CALLS
    rows = connection.execute(select(calls.c.id, calls.c.weight_version).where(calls.c.id.in_(ids)))
    return {call_id: version for call_id, version in rows}


def call_certificates(connection: Connection, call_ids: Iterable[str]) -> dict[str, str | None]:
    """Each call's certificate id (``certificates``, recording/certificate.py)."""
    ids = list(call_ids)
    if not ids:
        return {}
    calls = queries.CALLS
    rows = connection.execute(select(calls.c.id, calls.c.certificate_id).where(calls.c.id.in_(ids)))
    return {call_id: certificate for call_id, certificate in rows}


def annotate(
    sequences: list[TrainingSequence],
    versions: dict[str, str | None],
    ranks: dict[str, int],
    certificates: dict[str, str | None] | None = None,
) -> None:
    """Set each sequence's oldest policy version, its staleness and its certificate (the one all
    its calls share)."""
    newest = len(ranks) - 1
    for sequence in sequences:
        if certificates is not None:
            shared = {certificates.get(c) for c in sequence.call_ids}
            sequence.certificate_id = shared.pop() if len(shared) == 1 else None
        known = [v for v in (versions.get(c) for c in sequence.call_ids) if v is not None and v in ranks]
        if known:
            oldest = min(known, key=ranks.__getitem__)
            sequence.weight_version = oldest
            sequence.staleness = newest - ranks[oldest]


def describe(connection: Connection, trajectory: dict[str, Any], sequences: list[TrainingSequence]) -> None:
    """One trajectory's sequences with their policy version, staleness, group and advantage (the
    read API; the export does the same a batch at a time)."""
    ranks = version_ranks(connection)
    call_ids = [call for s in sequences for call in s.call_ids]
    versions = call_versions(connection, call_ids)
    group_id = trajectory.get("group_id")
    advantages = group_advantage_of(connection, [group_id] if group_id else [])
    annotate(sequences, versions, ranks, call_certificates(connection, call_ids))
    for sequence in sequences:
        sequence.group_id = group_id
        sequence.advantage = advantages.get(trajectory["id"])


def check_known(policy: PolicyFilter, ranks: dict[str, int]) -> None:
    """A --min-weight-version nobody ran under is a typo, not a filter that keeps nothing."""
    if policy.min_weight_version is not None and policy.min_weight_version not in ranks:
        raise UnknownWeightVersionError(f"no call ran under weight version {policy.min_weight_version!r}")


def keep(sequence: TrainingSequence, policy: PolicyFilter, ranks: dict[str, int]) -> bool:
    if not policy.active:
        return True
    if policy.certificate is not None and sequence.certificate_id != policy.certificate:
        return False
    if policy.min_weight_version is None and policy.max_staleness is None:
        return True
    if sequence.weight_version is None or sequence.staleness is None:
        return False
    if (
        policy.min_weight_version is not None
        and ranks[sequence.weight_version] < ranks[policy.min_weight_version]
    ):
        return False
    return policy.max_staleness is None or sequence.staleness <= policy.max_staleness


def group_advantage_of(connection: Connection, group_ids: Iterable[str]) -> dict[str, float | None]:
    """Trajectory id -> its advantage within its group (over every rewarded member of the group)."""
    out: dict[str, float | None] = {}
    for group_id in set(group_ids):
        members = queries.group_trajectories(connection, group_id)
        advantages = group_advantages([m["reward"] for m in members])
        out.update({m["id"]: a for m, a in zip(members, advantages, strict=True)})
    return out
