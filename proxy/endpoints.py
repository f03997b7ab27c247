"""HTTP endpoints: the OpenAI surface and the health checks.

Handlers turn HTTP into plain data (ClientRequest), ask the planner for a plan, hand both
to the forwarder, and turn its Reply (or a ProxyError) back into HTTP. They know nothing
about scoring or upstream transports.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import orjson
from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError

from proxy.auth import check_admin, check_client
from proxy.config import Config
from proxy.errors import (
    AllAttemptsFailed,
    BadRequest,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    RouteBlocked,
    UnsupportedEncoding,
)
from proxy.forwarding import CLIENT_GONE, ClientGone, StreamSink
from proxy.fronts import Exchange, Front
from proxy.inbound import CHAT, COMPLETIONS, EMBEDDINGS, parse_request
from proxy.messages_api import (
    MESSAGES,
    MESSAGES_PATH,
    count_request,
    count_tokens,
    estimate_input,
)
from proxy.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from proxy.responses_api import RESPONSES
from proxy.routing import AUTO, RoutePlan, new_id
from proxy.state import STATE, ProxyState

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_JSON = "application/json"
#: Errors answered before the body was read whole: the connection closes after them
#: rather than read on through what is left of the body to find the next request.
_CLOSING = frozenset({408, 413})


class EventStream(web.StreamResponse):
    """A streamed answer whose head goes out together with its first events (one write)."""

    # aiohttp (3.12+, aio-libs/aiohttp#10991) keeps a response's head in the writer until
    # the first body write when this class attribute is False, as web.Response does; a
    # StreamResponse otherwise sends the head on its own from prepare().
    _send_headers_immediately = False


class HttpSink:
    """The client side of a committed stream: prepared on the first write of content."""

    __slots__ = ("request", "response", "headers")

    def __init__(self, request: web.Request, headers: dict[str, str]) -> None:
        self.request = request
        self.headers = headers
        self.response: web.StreamResponse | None = None

    async def start(self, instance_id: str, attempts: int, first: bytes,
                    upstream_headers: dict[str, str]) -> None:
        headers = self.headers
        if upstream_headers:
            headers.update(upstream_headers)
        headers["x-route-instance"] = instance_id
        headers["x-route-attempts"] = str(attempts)
        headers["Content-Type"] = "text/event-stream; charset=utf-8"
        headers["Cache-Control"] = "no-cache"
        headers["X-Accel-Buffering"] = "no"
        response = EventStream(status=200, headers=headers)
        try:
            await response.prepare(self.request)
            await response.write(first)
        except (ConnectionError, RuntimeError) as exc:
            raise ClientGone() from exc
        self.response = response

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        try:
            await self.response.write(data)  # waits while the client is not reading
        except (ConnectionError, RuntimeError) as exc:
            # The client went away (reset, or the transport is already closing).
            raise ClientGone() from exc


def _request_id(request: web.Request) -> str:
    given = request.headers.get("x-request-id")
    if given and _REQUEST_ID.fullmatch(given):
        return given
    return new_id()


async def read_body(request: web.Request, limit: int, timeout_s: float = 30.0) -> bytes:
    """The request body, within the size limit and the time a client may take to send it.

    Raises UnsupportedEncoding (415) for a compressed body, PayloadTooLarge (413) over
    `limit` bytes, RequestTimeout (408) when it has not all arrived within `timeout_s`,
    BadRequest (400) when its framing is broken or it is cut short.
    """
    encoding = request.headers.get("Content-Encoding")
    if encoding is not None and encoding.strip().lower() not in ("", "identity"):
        # Decoding client bodies buys nothing here and has sharp edges (a bad deflate body
        # can leave the read hanging), so it is refused outright.
        raise UnsupportedEncoding("Compressed request bodies are not accepted; send the JSON "
                                  "body without a Content-Encoding.", param="Content-Encoding")
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"The request body is {length} bytes; the limit is {limit}.")
    try:
        if request.content.is_eof():  # it came whole with the head: no timer to arm
            return await request.read()
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout(f"The request body did not arrive within {timeout_s:g}s.") from None
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.") from None
    except (HttpProcessingError, web.RequestPayloadError):
        # a broken chunked encoding, or a body cut short by the client's half-close
        raise BadRequest("The request body could not be read (broken framing, or cut "
                         "short).") from None


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """The `Expect` handler of every route: `100 Continue` only for a body the proxy would
    take; a declared length over the limit is answered 413 at once, before the client
    sends it (aiohttp's default handler sends `100 Continue` first). Expectations other
    than 100-continue are ignored, as RFC 9110 section 10.1.1 allows; HTTP/1.0 has no
    interim answers."""
    if request.version < HttpVersion11 or \
            request.headers.get("Expect", "").strip().lower() != "100-continue":
        return None
    length = request.content_length
    if length is not None and length > request.client_max_size:
        return error_response(PayloadTooLarge(
            f"The request body is {length} bytes; the limit is {request.client_max_size}."), {},
            MESSAGES if request.path.startswith(MESSAGES_PATH) else None)
    writer = request.writer
    await writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    writer.output_size = 0  # the answer itself has not started (as aiohttp's handler does)
    return None


def error_response(exc: ProxyError, headers: dict[str, str],
                   front: Front | None = None) -> web.Response:
    """A ProxyError as an OpenAI-shaped response (with its own headers, e.g. Retry-After),
    or in the shape of the API a front serves."""
    headers.update(exc.headers)
    headers["Content-Type"] = _JSON
    body = exc.body() if front is None else front.error_body(exc)
    response = web.Response(status=exc.status, body=body, headers=headers)
    if exc.status in _CLOSING:
        response.force_close()
    return response


async def _proxy(request: web.Request, endpoint: str,
                 front: Front | None = None) -> web.StreamResponse:
    """Serve one model request; with a `front` (the Responses or Messages API) the body is
    translated into a chat request on the way in and the answer back on the way out."""
    state: ProxyState = request.app[STATE]
    # Taken once: a config reload during this request does not change what it uses.
    config, recorder, planner, forwarder = (state.config, state.recorder, state.planner,
                                            state.forwarder)
    started = time.perf_counter()
    request_id = _request_id(request)
    headers = {"x-request-id": request_id}
    model: str | None = None
    plan: RoutePlan | None = None
    exchange: Exchange | None = None
    stream = False
    counters = recorder.metrics
    counters.inflight += 1
    try:
        check_client(config.server, request.headers)
        raw = await read_body(request, config.server.max_body_bytes, config.server.body_timeout_s)
        if front is None:
            req = parse_request(endpoint, raw, request_id)
        else:
            exchange = front.exchange(raw, request_id, config)
            req = exchange.request
        model, stream = req.model, req.stream
        plan = planner.plan(req, request.headers)
        headers["x-route-plan-id"] = plan.plan_id
        recorder.planned(plan)
        http_sink = HttpSink(request, headers) if stream else None
        sink: StreamSink | None = http_sink
        if exchange is not None and http_sink is not None:
            sink = exchange.stream(http_sink)
        reply = await forwarder.forward(req, plan, sink, request.headers.get("Authorization"))
        planner.served(plan, reply.instance)
    except asyncio.CancelledError:
        # The client went away (the server cancels the handler); the upstream request was
        # closed on the way out. An outcome of the request, not a failure of the instance.
        recorder.completed(plan, request_id, model, 499, CLIENT_GONE, None, 0, None,
                           time.perf_counter() - started, 0.0, stream)
        raise
    except ProxyError as exc:
        if isinstance(exc, RouteBlocked) and plan is not None:
            recorder.blocked(plan, exc.message)
        headers["x-route-attempts"] = str(exc.attempts)
        # Outcomes are lower-case words (`ok`, `all_attempts_failed`), in the metrics'
        # labels too; an error code in capitals (ROUTE_BLOCKED) is no exception there.
        outcome = (exc.code or exc.type).lower()
        recorder.completed(plan, request_id, model, exc.status, outcome, None,
                           exc.attempts, None, time.perf_counter() - started, exc.upstream_s,
                           stream, exc.tried)
        return error_response(exc, headers, front)
    finally:
        counters.inflight -= 1

    upstream_s = sum(a.elapsed_ms for a in reply.attempts) / 1000.0
    recorder.completed(plan, request_id, model, reply.status, reply.outcome, reply.instance,
                       len(reply.attempts), reply.ttfb_s, time.perf_counter() - started,
                       upstream_s, reply.body is None, reply.attempts, reply.usage)
    if reply.body is None:
        response = http_sink.response if http_sink is not None else None
        if response is None:  # the client left before the stream could start
            return web.Response(status=499, headers=headers)
        if reply.outcome != CLIENT_GONE:
            try:
                await response.write_eof()
            except (ConnectionError, RuntimeError):
                pass
        return response
    headers.update(reply.headers)
    headers["x-route-instance"] = reply.instance or ""
    headers["x-route-attempts"] = str(len(reply.attempts))
    if exchange is not None:
        assert front is not None
        return _translated(exchange, front, reply.status, reply.body, headers)
    headers["Content-Type"] = reply.content_type or _JSON  # the upstream's, as it was
    return web.Response(status=reply.status, body=reply.body, headers=headers)


def _translated(exchange: Exchange, front: Front, status: int, body: bytes,
                headers: dict[str, str]) -> web.Response:
    """A whole answer (or an upstream's error) in the shape of the front's API."""
    try:
        status, body = exchange.answer(status, body)
    except (ValueError, TypeError, AttributeError):  # a 2xx JSON object that is no completion
        status = 502
        body = front.error_body(AllAttemptsFailed(
            f"The answer from {headers.get('x-route-instance')} is not a chat completion "
            "and could not be translated."))
    headers["Content-Type"] = _JSON
    return web.Response(status=status, body=body, headers=headers)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions"""
    return await _proxy(request, CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions"""
    return await _proxy(request, COMPLETIONS)


async def embeddings(request: web.Request) -> web.StreamResponse:
    """POST /v1/embeddings"""
    return await _proxy(request, EMBEDDINGS)


async def responses(request: web.Request) -> web.StreamResponse:
    """POST /v1/responses: OpenAI's Responses API, translated (proxy.responses_api)."""
    return await _proxy(request, CHAT, RESPONSES)


async def messages(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages: Anthropic's Messages API, translated (proxy.messages_api)."""
    return await _proxy(request, CHAT, MESSAGES)


async def count_message_tokens(request: web.Request) -> web.Response:
    """POST /v1/messages/count_tokens: `{"input_tokens": N}` for a Messages request, by the
    tokenizer of a llama.cpp or Anthropic instance it could go to, else estimated."""
    state = request.app[STATE]
    config = state.config
    headers = {"x-request-id": _request_id(request)}
    try:
        check_client(config.server, request.headers)
        raw = await read_body(request, config.server.max_body_bytes, config.server.body_timeout_s)
        req = count_request(raw, headers["x-request-id"])
        plan = state.planner.plan(req, request.headers)
        tokens = await count_tokens(state.forwarder.upstream, plan.candidates, req,
                                    estimate_input(req.body, plan.requirements.prompt_tokens),
                                    config.timeouts.connect_s + 1.0)
    except ProxyError as exc:
        return error_response(exc, headers, MESSAGES)
    return web.Response(body=orjson.dumps({"input_tokens": tokens}), headers=headers,
                        content_type=_JSON)


async def retrieve_model(request: web.Request) -> web.Response:
    """GET /v1/models/{id}: the model object of `auto`, a model group, an instance id or a
    model name (a label, or a name a server lists); 404 otherwise. In Anthropic's shape
    when the request carries `anthropic-version` (the `anthropic` SDK sends it)."""
    state = request.app[STATE]
    anthropic_client = "anthropic-version" in request.headers
    front = MESSAGES if anthropic_client else None
    name = request.match_info["id"]
    try:
        check_client(state.config.server, request.headers)
        found = model_object(state, name)
        if found is None:
            raise NotFound(f"The model '{name}' does not exist on this proxy.", param="model")
    except ProxyError as exc:
        return error_response(exc, {}, front)
    if anthropic_client:
        found = {"type": "model", "id": found["id"], "display_name": found["id"],
                 "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                             time.gmtime(found["created"]))}
    return web.Response(body=orjson.dumps(found), content_type=_JSON)


def model_object(state: ProxyState, name: str) -> dict[str, Any] | None:
    """The OpenAI model object for `name`, as /v1/models lists it, or for an instance id or
    a name a server lists; None when the proxy knows no such model."""
    listed = orjson.loads(state.models_body)["data"]
    for entry in listed:
        if entry["id"] == name:
            return dict(entry)
    created = listed[0]["created"]
    inst = state.config.instance(name)
    if inst is not None:
        return {"id": name, "object": "model", "created": created, "owned_by": inst.provider_id}
    for live in state.registry.states:
        if live.pin is not None and name in live.pin.models:
            return {"id": name, "object": "model", "created": created,
                    "owned_by": live.config.provider_id}
    return None


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: `auto`, the model groups and every upstream model, OpenAI list format."""
    state = request.app[STATE]
    check_client(state.config.server, request.headers)
    return web.Response(body=state.models_body, content_type=_JSON)


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process is alive."""
    return web.Response(body=b'{"status":"ok"}', content_type=_JSON)


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: 200 when at least one instance is routable, else 503."""
    registry = request.app[STATE].registry
    routable = [s.id for s in registry.states if s.routable()]
    body = orjson.dumps({"status": "ready" if routable else "unavailable", "routable": routable})
    return web.Response(status=200 if routable else 503, body=body, content_type=_JSON)


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format (behind the admin key if server.metrics_auth)."""
    state = request.app[STATE]
    if state.config.server.metrics_auth:
        check_admin(state.config.server, request.headers)
    body = state.recorder.metrics.render()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


def models_body(config: Config) -> bytes:
    """The /v1/models answer, computed once at start-up."""
    created = int(time.time())
    seen: dict[str, str] = {AUTO: "failover-proxy"}
    for name in config.models:
        seen.setdefault(name, "failover-proxy")
    for inst in config.instances:
        if inst.model:
            seen.setdefault(inst.model, inst.provider_id)
    return orjson.dumps({"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": owner}
        for name, owner in seen.items()
    ]})


def add_routes(app: web.Application) -> None:
    """Register the public endpoints (a GET route answers HEAD too)."""
    router = app.router
    for path, handler in (("/v1/chat/completions", chat_completions),
                          ("/v1/completions", completions), ("/v1/embeddings", embeddings),
                          ("/v1/responses", responses), ("/v1/messages", messages),
                          ("/v1/messages/count_tokens", count_message_tokens)):
        router.add_post(path, handler, expect_handler=expect_continue)
    for path, get in (("/v1/models", list_models), ("/v1/models/{id:.+}", retrieve_model),
                      ("/healthz", healthz), ("/readyz", readyz), ("/metrics", metrics)):
        router.add_get(path, get, expect_handler=expect_continue)
