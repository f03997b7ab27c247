"""Every way an upstream attempt can fail, and the one place where aiohttp's errors become ours.

Reason codes are the product's vocabulary (SPEC section 6): they appear in events, logs,
metrics and the 502 message. Handlers never catch transport exceptions themselves: every
wait on aiohttp's client goes through :func:`map_exceptions` (or, on the per-event hot
path, :func:`failure_from`), which turns aiohttp's exceptions (aiohttp 3.14,
`aiohttp/client_exceptions.py`), socket errors and timeouts into these failures.
"""

from __future__ import annotations

import errno
from types import TracebackType
from typing import Literal

import aiohttp
from aiohttp.http_exceptions import ContentEncodingError, DecompressSizeError

from proxy.providers.overflow import Overflow

# Reason codes, as strings so they serialise as they are.
INSTANCE_NOT_READY = "INSTANCE_NOT_READY"
INSTANCE_BUSY = "INSTANCE_BUSY"
#: A skip, not a failure: the instance cannot take this particular request.
UNSUPPORTED_REQUEST = "UNSUPPORTED_REQUEST"
CONN_REFUSED = "CONN_REFUSED"
TIMEOUT = "TIMEOUT"
PROCESS_EXITED = "PROCESS_EXITED"
FINGERPRINT_MISMATCH = "FINGERPRINT_MISMATCH"
UPSTREAM_5XX = "UPSTREAM_5XX"
RATE_LIMITED = "RATE_LIMITED"
CONTEXT_TOO_LONG = "CONTEXT_TOO_LONG"
STREAM_CUT = "STREAM_CUT"
STREAM_STALLED = "STREAM_STALLED"
STREAM_MALFORMED = "STREAM_MALFORMED"
UPSTREAM_ERROR = "UPSTREAM_ERROR"
UPSTREAM_AUTH = "UPSTREAM_AUTH"
UPSTREAM_PROTOCOL_ERROR = "UPSTREAM_PROTOCOL_ERROR"

# The names used in `retry.on` of the config, mapped to the reason codes they cover.
RETRY_KINDS: dict[str, tuple[str, ...]] = {
    "conn_refused": (CONN_REFUSED,),
    "timeout": (TIMEOUT, STREAM_STALLED),
    "process_exited": (PROCESS_EXITED, STREAM_CUT, STREAM_MALFORMED, UPSTREAM_ERROR),
    "fingerprint_mismatch": (FINGERPRINT_MISMATCH,),
    "upstream_5xx": (UPSTREAM_5XX,),
    "upstream_auth": (UPSTREAM_AUTH,),
    "rate_limited": (RATE_LIMITED,),
    "context_too_long": (CONTEXT_TOO_LONG,),
    "protocol_error": (UPSTREAM_PROTOCOL_ERROR,),
}


class UpstreamFailure(Exception):
    """An attempt on one instance failed; the request may still be served by another."""

    code: str = UPSTREAM_ERROR
    #: Worth one more try on the same instance (a blip), before moving on.
    transient: bool = False
    #: Says something about the instance's health: feeds its error rate and circuit (or,
    #: for a 429, its rate-limit cooldown). False for an answer about this request only.
    instance_fault: bool = True

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.code)
        self.detail = detail or self.code


class ConnRefused(UpstreamFailure):
    """Nothing listens at the instance's address (or the host is unreachable)."""

    code = CONN_REFUSED


class UpstreamTimeout(UpstreamFailure):
    """Connect, first byte or total deadline passed; `phase` says which."""

    code = TIMEOUT

    def __init__(self, phase: str, seconds: float | None = None) -> None:
        detail = f"{phase} timeout" + (f" after {seconds:g}s" if seconds is not None else "")
        super().__init__(detail)
        self.phase = phase


class ProcessExited(UpstreamFailure):
    """The connection was reset or closed before the response was complete."""

    code = PROCESS_EXITED
    transient = True


class Upstream5xx(UpstreamFailure):
    """The upstream answered with a server error status."""

    code = UPSTREAM_5XX
    transient = True

    def __init__(self, status: int, body: bytes = b"") -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


class UpstreamAuth(UpstreamFailure):
    """The upstream refused the proxy's credentials (401/403): the instance is misconfigured,
    not the client's request wrong."""

    code = UPSTREAM_AUTH

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}: the upstream refused the configured credentials")
        self.status = status


class RateLimited(UpstreamFailure):
    """The upstream answered 429; `retry_after` is its requested pause in seconds (None when
    it gave none), `headers` its rate-limit headers, relayed to the client."""

    code = RATE_LIMITED

    def __init__(self, retry_after: float | None, body: bytes = b"",
                 headers: dict[str, str] | None = None) -> None:
        detail = "HTTP 429" + (f", retry after {retry_after:g}s" if retry_after is not None else "")
        super().__init__(detail)
        self.retry_after = retry_after
        self.body = body
        self.headers = headers or {}


class ContextTooLong(UpstreamFailure):
    """The upstream said the prompt does not fit its context window (in any server's
    wording: see proxy.providers.overflow); `overflow` holds the window and size it stated. A fact
    about this request, not about the instance's health."""

    code = CONTEXT_TOO_LONG
    instance_fault = False

    def __init__(self, overflow: Overflow) -> None:
        super().__init__(overflow.describe())
        self.overflow = overflow


class FingerprintMismatch(UpstreamFailure):
    """The server at the address answers as a different model than the one configured."""

    code = FINGERPRINT_MISMATCH


class StreamMalformed(UpstreamFailure):
    """The upstream sent an event that is not valid JSON or not a completion chunk."""

    code = STREAM_MALFORMED


class StreamCut(UpstreamFailure):
    """A stream ended (closed or reset) before its finish reason."""

    code = STREAM_CUT


class StreamStalled(UpstreamFailure):
    """No stream event arrived within the idle timeout."""

    code = STREAM_STALLED


class UpstreamProtocolError(UpstreamFailure):
    """The answer breaks HTTP (unparsable head, too many or too long header lines, bad
    chunking or content coding, an unasked-for 101 or a redirect) or exceeds the response
    limits (`upstream.max_response_bytes`, `upstream.max_event_bytes`)."""

    code = UPSTREAM_PROTOCOL_ERROR


class UpstreamErrorEvent(UpstreamFailure):
    """The upstream reported an error inside an otherwise successful stream."""

    code = UPSTREAM_ERROR


class UnusableAnswer(UpstreamFailure):
    """The instance answered, in a form this request cannot use (a continuation answered
    without streaming): a failed attempt, but no mark against the instance's health."""

    code = UPSTREAM_ERROR
    instance_fault = False


class UnsupportedByInstance(Exception):
    """This instance cannot take this particular request (a continuation it cannot
    express, a protocol that cannot carry it): it is skipped with `detail` as the reason.

    Not an UpstreamFailure: nothing was sent, the instance did nothing wrong, and its
    circuit and error rate stay untouched; a skip does not count as an attempt.
    """

    code = UNSUPPORTED_REQUEST

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


_REFUSAL_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})


def failure_from(exc: BaseException, phase: str,
                 timeout_s: float | None = None) -> UpstreamFailure:
    """Our failure for an exception raised while waiting on an upstream.

    `phase` names the wait ("connect", "first_byte", "idle", "body", "probe") so that a
    timeout says where it happened. Our own failures come back unchanged.
    """
    if isinstance(exc, UpstreamFailure):
        return exc
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamTimeout("connect", timeout_s if phase == "connect" else None)
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return ConnRefused(f"cannot reach the forward proxy {exc.host}:{exc.port}")
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return ConnRefused(f"the forward proxy refused the tunnel: HTTP {exc.status}")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return ConnRefused(f"cannot resolve {exc.host}")
    if isinstance(exc, aiohttp.ClientSSLError):
        return ConnRefused(f"TLS handshake with {exc.host}:{exc.port} failed: "
                           f"{getattr(exc, 'certificate_error', None) or exc.os_error}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        if isinstance(os_error, ConnectionRefusedError) or os_error.errno in _REFUSAL_ERRNOS:
            return ConnRefused(f"connection refused by {exc.host}:{exc.port}")
        return ConnRefused(f"cannot connect to {exc.host}:{exc.port}: {os_error.strerror or os_error}")
    if isinstance(exc, TimeoutError):  # asyncio's, and aiohttp's socket timeouts
        return UpstreamTimeout(phase, timeout_s)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return ProcessExited("server closed the connection")
    if isinstance(exc, aiohttp.ClientPayloadError):
        # A body that cannot be decoded breaks HTTP; one that stops short (the connection
        # closed before its length or last chunk) is a server that went away.
        cause = exc.__cause__
        if isinstance(cause, (ContentEncodingError, DecompressSizeError)):
            return UpstreamProtocolError(f"undecodable response body: {cause.message}")
        return ProcessExited("response body cut short")
    if isinstance(exc, aiohttp.ClientResponseError):
        # aiohttp's parser refused the response head (too many or too long header lines,
        # not HTTP at all): the answer breaks HTTP.
        return UpstreamProtocolError(f"unparsable response: {exc.message}")
    if isinstance(exc, (aiohttp.ClientOSError, ConnectionError)):
        return ProcessExited("connection reset")
    if isinstance(exc, aiohttp.ClientError):
        return UpstreamProtocolError(f"transport error: {type(exc).__name__}: {exc}")
    if isinstance(exc, OSError):
        return ProcessExited(f"connection error: {exc.strerror or exc}")
    raise exc  # a bug of ours, not the upstream's failure: let it surface


class map_exceptions:  # noqa: N801 - a context manager, named like contextlib's
    """``with map_exceptions(phase, timeout_s):`` turns whatever an upstream wait inside
    the block raises into our failure (see :func:`failure_from`). A class rather than a
    generator: it sits on every request's path."""

    __slots__ = ("phase", "timeout_s")

    def __init__(self, phase: str, timeout_s: float | None = None) -> None:
        self.phase = phase
        self.timeout_s = timeout_s

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        if exc is None or isinstance(exc, UpstreamFailure) \
                or not isinstance(exc, (aiohttp.ClientError, OSError, TimeoutError)):
            return False
        raise failure_from(exc, self.phase, self.timeout_s) from exc
