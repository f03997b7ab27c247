"""Errors the proxy itself returns to clients, in OpenAI's shape so SDKs raise the right class."""

from __future__ import annotations

import orjson


class ProxyError(Exception):
    """A request the proxy answers with an error of its own (not passed through from upstream)."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


class BadRequest(ProxyError):
    """400: the body is not valid JSON or not a valid request."""

    status = 400
    type = "invalid_request_error"


class Unauthorized(ProxyError):
    """401: missing or wrong API key."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(ProxyError):
    """403: authenticated, but not allowed here (e.g. a client key on /admin)."""

    status = 403
    type = "permission_error"


class NotFound(ProxyError):
    """404: unknown model (strict mode) or path."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class RequestTimeout(ProxyError):
    """408: the client was too slow sending its request."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class UnsupportedEncoding(ProxyError):
    """415: a compressed request body (no OpenAI SDK sends one)."""

    status = 415
    type = "invalid_request_error"
    code = "unsupported_content_encoding"


class PayloadTooLarge(ProxyError):
    """413: the body is larger than `server.max_body_bytes`."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimitedError(ProxyError):
    """429: every instance that could serve is rate limited."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class AllAttemptsFailed(ProxyError):
    """502: every attempt failed; the message lists each attempt and why."""

    status = 502
    type = "upstream_error"
    code = "all_attempts_failed"


class RouteBlocked(ProxyError):
    """503: no instance is routable for this request."""

    status = 503
    type = "service_unavailable"
    code = "ROUTE_BLOCKED"


class AuditUnavailable(ProxyError):
    """503: the audit database cannot be reached now (an admin read of the audit trail)."""

    status = 503
    type = "service_unavailable"
    code = "audit_unavailable"


class AllAttemptsTimedOut(ProxyError):
    """504: every attempt timed out."""

    status = 504
    type = "timeout"
    code = "all_attempts_timed_out"


class ContextError(ProxyError):
    """400: no instance could fit the prompt. In OpenAI's shape whatever server said it
    (SDKs raise BadRequestError with code `context_length_exceeded`); the message quotes
    the last upstream's own words, then every attempt."""

    status = 400
    type = "invalid_request_error"
    code = "context_length_exceeded"


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    """`{"error": {message, type, param, code}}` as JSON bytes."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def error_event(message: str, type_: str = "upstream_error", code: str | None = None) -> bytes:
    """An SSE error event; sent without a following `[DONE]` so SDKs raise."""
    return b"data: " + error_body(message, type_, code) + b"\n\n"
