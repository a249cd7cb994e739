"""Errors for what a remote model server did wrong, each saying whether the router may try again."""

from __future__ import annotations

from backends.errors import UpstreamError, UpstreamTimeout


class UpstreamRateLimited(UpstreamError):
    """The upstream answered 429: our quota there is spent for now; `retry_after` says for how long."""

    status = 429
    error_type = "rate_limit_error"
    code = "upstream_rate_limited"


class UpstreamUnavailable(UpstreamError):
    """The upstream answered 503 (loading, draining, overloaded)."""

    status = 503
    code = "upstream_unavailable"


class UpstreamConnectError(UpstreamError):
    """No connection could be made (refused, DNS, TLS): nothing was sent, so trying again is safe."""

    code = "upstream_connect_error"


class FirstByteTimeout(UpstreamTimeout):
    """The upstream accepted the request but sent nothing within `first_byte_timeout_s`."""

    code = "upstream_first_byte_timeout"


class UpstreamStreamBroken(UpstreamError):
    """A stream stopped after chunks reached the client (cut, reset, stalled): too late to retry."""

    code = "upstream_stream_broken"
    retryable = False


class UpstreamAuthRejected(UpstreamError):
    """The upstream refused the gateway's own key (401/403): a configuration fault, not the client's."""

    code = "upstream_auth_rejected"
    retryable = False


class UpstreamModelNotFound(UpstreamError):
    """The upstream does not serve the model name in the policy (404): a configuration fault."""

    code = "upstream_model_not_found"
    retryable = False


class UpstreamRejected(UpstreamError):
    """Any other refusal (a 4xx we have no better name for, a redirect): repeating it will not help."""

    code = "upstream_rejected"
    retryable = False


class UpstreamProtocolError(UpstreamError):
    """The upstream answered, but not with OpenAI-shaped JSON or SSE."""

    code = "upstream_protocol_error"


class UpstreamResponseTooLarge(UpstreamProtocolError):
    """The upstream's answer (or one SSE event of it) is larger than `max_response_bytes`: it was not read to its end.

    Not retried: the same request would bring the same answer; a fallback with another model may do better.
    """

    code = "upstream_response_too_large"
    retryable = False
