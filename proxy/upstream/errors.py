"""How a call to vLLM can fail, as the upstream client reports it to the relay.

UpstreamError
├── UpstreamConnectError     no connection could be made (``local``: the proxy's own resources)
├── UpstreamClosedError      the connection closed before any byte of an answer
│   └── UpstreamStaleConnection  ... and nothing of the request can have been processed
├── UpstreamReadTimeout      vLLM stayed silent past the read timeout
└── UpstreamBrokenError      an answer cut off, invalid HTTP, a 101, a head over the cap
"""

from __future__ import annotations


class UpstreamError(Exception):
    """vLLM could not be reached or did not answer properly."""


class UpstreamConnectError(UpstreamError):
    """No connection could be made.

    ``local`` is True when the cause is this machine (out of file descriptors, ports or memory): the
    upstream is not at fault and must not be marked down for it.
    """

    def __init__(self, message: str, *, local: bool = False) -> None:
        super().__init__(message)
        self.local = local


class UpstreamClosedError(UpstreamError):
    """The connection closed before any byte of an answer: vLLM may have processed the request."""


class UpstreamStaleConnection(UpstreamClosedError):
    """A reused keep-alive connection closed before the request can have been processed (it was not
    fully written, or the close came within the stale-connection window): safe to send once more."""


class UpstreamReadTimeout(UpstreamError):
    """vLLM sent nothing for longer than the read timeout."""


class UpstreamBrokenError(UpstreamError):
    """The answer was cut off or was not valid HTTP."""
