"""TokenTrail's own errors, and the OpenAI-shaped bodies the proxy answers with.

    TokenTrailError
    ├── ConfigurationError        bad settings or command-line values
    ├── DatabaseTooNewError       the database was made by a newer TokenTrail (serve refuses it)
    └── ProxyRequestError         an answer the proxy itself gives instead of vLLM's
        ├── BadTrajectoryIdError  400: X-Trajectory-Id not printable or longer than 256 characters
        ├── BadTrajectoryTagsError 400: X-Trajectory-Tags not key=value pairs of the allowed form
        ├── BodyTooLargeError     413: the request body is over TOKENTRAIL_MAX_BODY_BYTES
        ├── TooManyCallsError     503: TOKENTRAIL_MAX_CONCURRENT_CALLS calls are already open
        ├── PausedTooLongError    503 + Retry-After: held past TOKENTRAIL_PAUSE_MAX_WAIT_S (training pause)
        ├── UpstreamUnreachableError 502: no connection to vLLM
        └── UpstreamTimeoutError  504: vLLM stayed silent past the read timeout

Every ``ProxyRequestError`` becomes ``{"error": {"message", "type", "param", "code"}}`` like vLLM's own
``ErrorResponse``; no stack trace ever reaches a response.
"""

from __future__ import annotations

import json


class TokenTrailError(Exception):
    """Base of every error TokenTrail raises on purpose."""


class ConfigurationError(TokenTrailError):
    """Settings or arguments that cannot work."""


class DatabaseTooNewError(TokenTrailError):
    """The database's schema revision is unknown to this version."""


class ProxyRequestError(TokenTrailError):
    """An error the proxy answers itself, in the OpenAI error shape."""

    status_code = 500
    error_type = "InternalServerError"
    headers: tuple[tuple[bytes, bytes], ...] = ()  # sent besides content-type and content-length

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> bytes:
        """The JSON body of the answer, shaped like vLLM's ``ErrorResponse``."""
        return openai_error_body(self.message, self.error_type, self.status_code, self.param)


class BadTrajectoryIdError(ProxyRequestError):
    status_code = 400
    error_type = "BadRequestError"


class BadTrajectoryTagsError(ProxyRequestError):
    status_code = 400
    error_type = "BadRequestError"


class BodyTooLargeError(ProxyRequestError):
    status_code = 413
    error_type = "RequestEntityTooLargeError"


class HeadersTooLargeError(ProxyRequestError):
    status_code = 431
    error_type = "RequestHeaderFieldsTooLargeError"


class ClientTooSlowError(ProxyRequestError):
    status_code = 408
    error_type = "RequestTimeoutError"


class TooManyCallsError(ProxyRequestError):
    status_code = 503
    error_type = "ServiceUnavailableError"


class PausedTooLongError(ProxyRequestError):
    """A recorded call held at the proxy while training paused the fleet, for longer than allowed."""

    status_code = 503
    error_type = "ServiceUnavailableError"
    headers = ((b"retry-after", b"5"),)

    def __init__(self, max_wait_s: float) -> None:
        super().__init__(
            f"training paused the model for more than {max_wait_s:g} s "
            "(TOKENTRAIL_PAUSE_MAX_WAIT_S); retry shortly"
        )


class UpstreamUnreachableError(ProxyRequestError):
    status_code = 502
    error_type = "BadGatewayError"


class UpstreamTimeoutError(ProxyRequestError):
    status_code = 504
    error_type = "GatewayTimeoutError"


def openai_error_body(message: str, error_type: str, code: int, param: str | None = None) -> bytes:
    """``{"error": {"message", "type", "param", "code"}}`` as bytes."""
    error = {"message": message, "type": error_type, "param": param, "code": code}
    return json.dumps({"error": error}).encode()
