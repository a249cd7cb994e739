"""One error hierarchy for the whole gateway, rendered to OpenAI's error shape at the edge."""

from __future__ import annotations

import math
from typing import Any


class TiergateError(Exception):
    """Base class. Subclasses fix the HTTP status, OpenAI error type and whether a retry may help."""

    status: int = 500
    error_type: str = "server_error"
    code: str | None = None
    retryable: bool = False
    # Does this error say the backend is unhealthy? Only such errors move its circuit breaker.
    backend_fault: bool = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def to_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"retry-after": str(max(1, round(self.retry_after)))}


# --- the client's fault (never retried, never counted against a backend) ---


class BadRequest(TiergateError):
    status = 400
    error_type = "invalid_request_error"


class Unsupported(BadRequest):
    """A parameter is well-formed but the chosen backend cannot honour it."""

    code = "unsupported_parameter"


class ContextLengthExceeded(BadRequest):
    code = "context_length_exceeded"


class AuthenticationFailed(TiergateError):
    status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(TiergateError):
    """Not allowed here whoever asks: a client key on an admin route, or admin routes with no admin key set."""

    status = 403
    error_type = "permission_error"
    code = "permission_denied"


class NotFound(TiergateError):
    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class ReloadFailed(TiergateError):
    """A valid policy whose new parts could not be loaded, or would not fit in memory: nothing was swapped."""

    status = 422
    error_type = "invalid_request_error"
    code = "reload_failed"


class BodyTooLarge(TiergateError):
    status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class HeadersTooLarge(TiergateError):
    status = 431
    error_type = "invalid_request_error"
    code = "request_header_too_large"


class RateLimited(TiergateError):
    status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class LimitExceeded(RateLimited):
    """The gateway's own limit (requests, tokens or concurrent requests of a key or team): OpenAI's headers
    say which limit and when it resets, and the SDKs retry after Retry-After."""

    def __init__(self, message: str, *, retry_after: float, limit_headers: dict[str, str]) -> None:
        super().__init__(message, retry_after=retry_after)
        self.limit_headers = limit_headers

    def headers(self) -> dict[str, str]:
        wait = self.retry_after or 0.0
        # whole seconds rounded up (a retry at the rounded-down second would be refused again), and the exact
        # wait in ms, which the OpenAI SDKs prefer when present
        return {
            **self.limit_headers,
            "retry-after": str(max(1, math.ceil(wait))),
            "retry-after-ms": str(max(1, math.ceil(wait * 1000))),
        }


class BudgetExceeded(TiergateError):
    """A budget cannot hold this request's worst-case cost: OpenAI's insufficient_quota shape. Retrying cannot
    help before the period ends, so the SDKs are told not to (`x-should-retry: false`)."""

    status = 429
    error_type = "insufficient_quota"
    code = "budget_exceeded"

    def headers(self) -> dict[str, str]:
        return {"x-should-retry": "false", **super().headers()}


# --- the gateway's own load shedding: retry later, but the backend is healthy ---


class Overloaded(TiergateError):
    status = 503
    error_type = "server_error"
    code = "overloaded"


class BackendUnavailable(TiergateError):
    """No backend can serve the request (disabled, missing key, not loaded)."""

    status = 503
    error_type = "server_error"
    code = "backend_unavailable"


class StoreUnavailable(TiergateError):
    """The shared store (Redis) did not answer in time, refused, or its breaker is open: never a raw client error."""

    status = 503
    error_type = "server_error"
    code = "store_unavailable"


# --- the backend's fault ---


class UpstreamError(TiergateError):
    status = 502
    error_type = "upstream_error"
    code = "upstream_error"
    retryable = True
    backend_fault = True


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class DeadlineExceeded(TiergateError):
    status = 504
    error_type = "timeout_error"
    code = "deadline_exceeded"


class InternalError(TiergateError):
    status = 500
    error_type = "server_error"
    code = "internal_error"


class ConstraintFailed(InternalError):
    """The constrained-decoding machinery failed on one request: our fault, not the model's; no retry helps."""

    code = "constraint_failed"
