"""Where a call's trajectory id comes from: the ``X-Trajectory-Id`` header or a ``/t/<id>`` prefix.

Clients that cannot set headers put the id in the base URL (``http://proxy:8000/t/<id>/v1``); the
prefix is removed before the call is forwarded, so every route works exactly as under ``/v1``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from tokentrail.proxy.errors import BadTrajectoryIdError, BadTrajectoryTagsError
from tokentrail.proxy.ids import new_id
from tokentrail.proxy.relay.headers import (
    GROUP_HEADER,
    POLICY_VERSION_HEADER,
    TAGS_HEADER,
    TRAJECTORY_HEADER,
)

MAX_TRAJECTORY_ID_LENGTH = 256
MAX_TAGS = 32
MAX_TAG_VALUE_LENGTH = 256
TAG_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_PREFIX = b"/t/"


@dataclass(frozen=True, slots=True)
class RoutedPath:
    """The path to forward (prefix removed) and the trajectory id the client gave, if any."""

    raw_path: bytes
    trajectory_id: str | None


def validate_trajectory_id(raw: bytes, where: str) -> str:
    """A trajectory id must be UTF-8, printable, and 1 to 256 characters long."""
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadTrajectoryIdError(f"{where} is not valid UTF-8", param=where) from None
    if not value:
        raise BadTrajectoryIdError(f"{where} is empty", param=where)
    if len(value) > MAX_TRAJECTORY_ID_LENGTH:
        raise BadTrajectoryIdError(
            f"{where} is {len(value)} characters long; at most {MAX_TRAJECTORY_ID_LENGTH} are allowed",
            param=where,
        )
    if not value.isprintable():
        raise BadTrajectoryIdError(f"{where} contains control or non-printable characters", param=where)
    return value


def route_path(raw_path: bytes, headers: list[tuple[bytes, bytes]]) -> RoutedPath:
    """Split off a ``/t/<id>`` prefix and read ``X-Trajectory-Id``; the prefix wins over the header."""
    if raw_path.startswith(_PREFIX):
        end = raw_path.find(b"/", len(_PREFIX))
        encoded = raw_path[len(_PREFIX) :] if end == -1 else raw_path[len(_PREFIX) : end]
        rest = b"/" if end == -1 else raw_path[end:]
        trajectory_id = validate_trajectory_id(unquote_to_bytes(encoded), "the /t/<id> path prefix")
        return RoutedPath(rest, trajectory_id)
    for name, value in headers:
        if name.lower() == TRAJECTORY_HEADER:
            return RoutedPath(raw_path, validate_trajectory_id(value, "X-Trajectory-Id"))
    return RoutedPath(raw_path, None)


def generated_trajectory_id() -> str:
    """An id for a call that came without one: it becomes a trajectory of its own."""
    return "auto-" + new_id()


def validate_tags(pairs: dict[str, str], where: str) -> dict[str, str]:
    """Tag keys are 1-64 of ``A-Z a-z 0-9 _ . : -``; values printable, at most 256 characters."""
    if len(pairs) > MAX_TAGS:
        raise BadTrajectoryTagsError(f"{where} has {len(pairs)} tags; at most {MAX_TAGS} are allowed", where)
    for key, value in pairs.items():
        if not TAG_KEY.fullmatch(key):
            raise BadTrajectoryTagsError(
                f"{where}: tag key {key[:70]!r} must be 1-64 of A-Z a-z 0-9 _ . : -", where
            )
        if not isinstance(value, str) or len(value) > MAX_TAG_VALUE_LENGTH or not value.isprintable():
            raise BadTrajectoryTagsError(
                f"{where}: the value of tag {key!r} must be printable text of at most "
                f"{MAX_TAG_VALUE_LENGTH} characters",
                where,
            )
    return pairs


def parse_tags_header(headers: list[tuple[bytes, bytes]]) -> dict[str, str] | None:
    """``X-Trajectory-Tags: env=prod,task=math-17`` as a dict; None when the header is absent."""
    raw = next((value for name, value in headers if name.lower() == TAGS_HEADER), None)
    if raw is None:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadTrajectoryTagsError("X-Trajectory-Tags is not valid UTF-8", "X-Trajectory-Tags") from None
    pairs: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise BadTrajectoryTagsError(
                f"X-Trajectory-Tags: {item.strip()[:70]!r} is not key=value", "X-Trajectory-Tags"
            )
        pairs[key.strip()] = value.strip()
    return validate_tags(pairs, "X-Trajectory-Tags")


@dataclass(frozen=True, slots=True)
class RlHeaders:
    """``X-Trajectory-Group`` (the trajectory's GRPO group) and ``X-Policy-Version`` (the policy
    version the client says it sampled with), validated like trajectory ids; None when absent."""

    group_id: str | None
    policy_version: str | None


def parse_rl_headers(headers: list[tuple[bytes, bytes]]) -> RlHeaders:
    group = policy = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == GROUP_HEADER:
            group = validate_trajectory_id(value, "X-Trajectory-Group")
        elif lowered == POLICY_VERSION_HEADER:
            policy = validate_trajectory_id(value, "X-Policy-Version")
    return RlHeaders(group, policy)
