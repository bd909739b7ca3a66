"""The upstream client as the settings describe it (the relay's, and the supervisor's control plane's)."""

from __future__ import annotations

from tokentrail.proxy.settings import Settings
from tokentrail.proxy.upstream.client import UpstreamClient


def upstream_client(settings: Settings) -> UpstreamClient:
    """The one client to vLLM: no total deadline, no redirects, a keep-alive below vLLM's own."""
    return UpstreamClient(
        connect_timeout_s=settings.upstream_connect_timeout,
        read_timeout_s=settings.upstream_read_timeout,
        max_connections=settings.upstream_max_connections,
        keepalive_s=settings.upstream_keepalive_expiry,
    )
