"""The proxy's errors as HTTP answers, in OpenAI's shape: its own (ProxyError), the
framework's (unknown path, wrong method, body too large), and a logged 500 for a bug of ours,
through one middleware; in Anthropic's shape under /v1/messages (proxy.fronts.messages),
whose clients read that one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import orjson
import structlog
from aiohttp import web

from proxy.api.errors import ProxyError, error_body
from proxy.fronts.base import Front
from proxy.fronts.messages import MESSAGES_PATH
from proxy.fronts.messages import error_body as messages_error_body

log = structlog.get_logger("proxy.api.middleware")

#: Errors answered before the body was read whole: the connection closes after them
#: rather than read on through what is left of the body to find the next request.
_CLOSING = frozenset({408, 413})


def error_response(exc: ProxyError, headers: dict[str, str],
                   front: Front | None = None) -> web.Response:
    """A ProxyError as an OpenAI-shaped response (with its own headers, e.g. Retry-After),
    or in the shape of the API a front serves."""
    headers.update(exc.headers)
    headers["Content-Type"] = "application/json"
    body = exc.body() if front is None else front.error_body(exc)
    response = web.Response(status=exc.status, body=body, headers=headers)
    if exc.status in _CLOSING:
        response.force_close()
    return response


def http_error_response(status: int, message: str, headers: dict[str, str] | None = None,
                        code: str | None = None) -> web.Response:
    """An OpenAI-shaped error answer for a status the framework chose (404, 405, 413, or
    400/414/431 for a request aiohttp's parser refused)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.Response(status=status, body=error_body(message, kind, code),
                        content_type="application/json", headers=headers)


def framework_error(request: web.BaseRequest, exc: web.HTTPException) -> web.Response:
    """An HTTPException aiohttp raised (404 unknown path, 405 with Allow, 413 over
    `client_max_size`, 417...) as an OpenAI-shaped response with the same status; in
    Anthropic's shape under /v1/messages, whose clients read that one."""
    response = _framework_error(request, exc)
    if request.path.startswith(MESSAGES_PATH) and isinstance(response.body, bytes):
        message = orjson.loads(response.body)["error"]["message"]
        response.body = messages_error_body(response.status, message)
    return response


def _framework_error(request: web.BaseRequest, exc: web.HTTPException) -> web.Response:
    if isinstance(exc, web.HTTPNotFound):
        return http_error_response(404, f"Unknown path: {request.path}")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return http_error_response(
            405, f"Method {request.method} is not allowed for {request.path}; allowed: "
                 f"{allowed}.", {"Allow": allowed})
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        resp = http_error_response(413, f"The request body is larger than the limit of "
                                        f"{request.client_max_size} bytes.",
                                   code="request_too_large")
        resp.force_close()  # the rest of the body is not worth reading
        return resp
    return http_error_response(exc.status, exc.text or exc.reason)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """OpenAI's error shape for the proxy's own errors raised by any handler, for the
    framework's (unknown path, wrong method, body over `client_max_size`), and a logged
    500 in the same shape for a bug of ours."""
    try:
        return await handler(request)
    except ProxyError as exc:
        return error_response(exc, {})
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return framework_error(request, exc)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("unhandled_error", path=request.path)
        return http_error_response(500, "The proxy hit an internal error; it has been logged.")

