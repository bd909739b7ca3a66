"""Which headers cross the proxy, in both directions (RFC 9110 section 7.6.1).

Headers stay a list of (name, value) byte pairs, never a dict: duplicates such as ``set-cookie``
must survive.
"""

from __future__ import annotations

from collections.abc import Iterable

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
TRAJECTORY_HEADER = b"x-trajectory-id"
TAGS_HEADER = b"x-trajectory-tags"
GROUP_HEADER = b"x-trajectory-group"
POLICY_VERSION_HEADER = b"x-policy-version"
OWN_HEADER_PREFIXES = (b"x-trajectory-", b"x-tokentrail-")  # TokenTrail's own: never forwarded


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def strip_hop_by_hop(
    headers: Iterable[tuple[bytes, bytes]], drop: frozenset[bytes] = frozenset()
) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop headers, any header named in ``Connection``, and the names in ``drop``."""
    pairs = list(headers)
    nominated = _connection_tokens(pairs)
    kept = []
    for name, value in pairs:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in nominated or lower in drop:
            continue
        kept.append((lower, value))
    return kept


def upstream_request_headers(
    headers: Iterable[tuple[bytes, bytes]], *, recorded: bool
) -> list[tuple[bytes, bytes]]:
    """The client's headers as vLLM should get them: no hop-by-hop, no Host, no X-Trajectory-* or
    X-TokenTrail-*.

    On recorded routes the proxy reads the response, so it asks for identity encoding. The length is
    always the upstream client's to set, from the body it sends.
    """
    drop = {b"host", b"expect", b"content-length"}  # the proxy has read the whole body already
    if recorded:
        drop.add(b"accept-encoding")
    kept = [
        (name, value)
        for name, value in strip_hop_by_hop(headers, frozenset(drop))
        if not name.startswith(OWN_HEADER_PREFIXES)
    ]
    if recorded:
        kept.append((b"accept-encoding", b"identity"))
    return kept
