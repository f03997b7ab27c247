"""HTTP endpoints: the OpenAI surface (and the Responses and Messages APIs in front of it:
proxy.fronts) and the health checks.

Handlers turn HTTP into plain data (ClientRequest), ask the planner for a plan, hand both
to the forwarder, and turn its Reply (or a ProxyError) back into HTTP. They know nothing
about scoring or upstream transports.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from typing import Any

import orjson
from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError

from proxy.api.auth import check_admin, check_client
from proxy.api.errors import (
    AllAttemptsFailed,
    BadRequest,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    UnsupportedEncoding,
)
from proxy.api.inbound import CHAT, COMPLETIONS, EMBEDDINGS, parse_request
from proxy.api.middleware import error_response
from proxy.api.state import STATE, ProxyState
from proxy.audit.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from proxy.config import Config
from proxy.engine.record import CLIENT_GONE, RequestRecord
from proxy.engine.relay import ClientGone, StreamSink
from proxy.fronts.base import Exchange, Front
from proxy.fronts.messages import (
    MESSAGES,
    MESSAGES_PATH,
    count_request,
    count_tokens,
    estimate_input,
)
from proxy.fronts.responses import RESPONSES
from proxy.routing.planner import AUTO, new_id

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_JSON = "application/json"


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
    content = request.content
    try:
        if content.is_eof():
            # It came whole with the head (the usual small request): taken as it is, with
            # no timer to arm and none of request.read()'s copying and awaits.
            body = content.read_nowait()
            if 0 < request.client_max_size < len(body):  # (a chunked one declares none)
                raise PayloadTooLarge(f"The request body is larger than the limit of {limit} "
                                      "bytes.")
            return body
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


async def _proxy(request: web.Request, endpoint: str,
                 front: Front | None = None) -> web.StreamResponse:
    """Serve one model request; with a `front` (the Responses or Messages API) the body is
    translated into a chat request on the way in and the answer back on the way out."""
    state: ProxyState = request.app[STATE]
    # Taken once: a config reload during this request does not change what it uses.
    config, recorder, planner, forwarder = (state.config, state.recorder, state.planner,
                                            state.forwarder)
    started = time.perf_counter()
    record = RequestRecord(_request_id(request))
    if state.tracing is not None:
        state.tracing.start_request(request.headers, endpoint, record)
    headers = {"x-request-id": record.request_id}
    exchange: Exchange | None = None
    counters = recorder.metrics
    counters.inflight += 1
    try:
        check_client(config.server, request.headers)
        raw = await read_body(request, config.server.max_body_bytes, config.server.body_timeout_s)
        if front is None:
            req = parse_request(endpoint, raw, record.request_id)
        else:
            exchange = front.exchange(raw, record.request_id, config)
            req = exchange.request
        record.model, record.stream = req.model, req.stream
        plan = planner.plan(req, request.headers)
        record.plan, record.planned_at = plan, time.time()
        headers["x-route-plan-id"] = plan.plan_id
        http_sink = HttpSink(request, headers) if req.stream else None
        sink: StreamSink | None = http_sink
        if exchange is not None and http_sink is not None:
            sink = exchange.stream(http_sink)
        reply = await forwarder.forward(req, plan, sink, request.headers.get("Authorization"),
                                        record)
        planner.served(plan, record.instance)
    except asyncio.CancelledError:
        # The client went away (the server cancels the handler); the upstream request was
        # closed on the way out. An outcome of the request, not a failure of the instance.
        record.status, record.outcome, record.instance = 499, CLIENT_GONE, None
        record.duration_s = time.perf_counter() - started
        recorder.completed(record)
        raise
    except ProxyError as exc:
        headers["x-route-attempts"] = str(record.sent)
        # Outcomes are lower-case words (`ok`, `all_attempts_failed`), in the metrics'
        # labels too; an error code in capitals (ROUTE_BLOCKED) is no exception there.
        record.status, record.outcome = exc.status, (exc.code or exc.type).lower()
        record.duration_s = time.perf_counter() - started
        recorder.completed(record)
        return error_response(exc, headers, front)
    finally:
        counters.inflight -= 1

    record.status, record.stream = reply.status, reply.body is None
    record.duration_s = time.perf_counter() - started
    recorder.completed(record)
    if reply.body is None:
        response = http_sink.response if http_sink is not None else None
        if response is None:  # the client left before the stream could start
            return web.Response(status=499, headers=headers)
        if record.outcome != CLIENT_GONE:
            try:
                await response.write_eof()
            except (ConnectionError, RuntimeError):
                pass
        return response
    headers.update(reply.headers)
    headers["x-route-instance"] = record.instance or ""
    headers["x-route-attempts"] = str(record.sent)
    if exchange is not None and front is not None:
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


async def count_message_tokens(request: web.Request) -> web.Response:
    """POST /v1/messages/count_tokens: `{"input_tokens": N}` for a Messages request, by the
    tokenizer of an instance it could go to that has one, else estimated."""
    state = request.app[STATE]
    config = state.config
    headers = {"x-request-id": _request_id(request)}
    try:
        check_client(config.server, request.headers)
        raw = await read_body(request, config.server.max_body_bytes, config.server.body_timeout_s)
        req = count_request(raw, headers["x-request-id"])
        plan = state.planner.plan(req, request.headers)
        tokens = await count_tokens(state.upstream, plan.candidates, req,
                                    estimate_input(req.body, plan.requirements.prompt_tokens),
                                    config.timeouts.connect_s + 1.0)
    except ProxyError as exc:
        return error_response(exc, headers, MESSAGES)
    return web.Response(body=orjson.dumps({"input_tokens": tokens}), headers=headers,
                        content_type=_JSON)


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: `auto`, the model groups and every upstream model, OpenAI list format."""
    state = request.app[STATE]
    check_client(state.config.server, request.headers)
    return web.Response(body=state.models_body, content_type=_JSON)


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


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process is alive."""
    return web.Response(body=b'{"status":"ok"}', content_type=_JSON)


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: 200 when at least one instance is routable, else 503; with a shared
    state (`state.url`), whether it is reachable (`shared_state`: up, since, and while
    down the error: the replica serves from its local state then, so it stays ready)."""
    state = request.app[STATE]
    routable = [s.id for s in state.registry.states if s.routable()]
    doc: dict[str, object] = {"status": "ready" if routable else "unavailable",
                              "routable": routable}
    if state.shared is not None:
        doc["shared_state"] = state.shared.status()
    body = orjson.dumps(doc)
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


#: The model endpoints: path, endpoint, front. /v1/responses is OpenAI's Responses API and
#: /v1/messages Anthropic's Messages API, both translated (proxy.fronts).
MODEL_ROUTES: tuple[tuple[str, str, Front | None], ...] = (
    ("/v1/chat/completions", CHAT, None),
    ("/v1/completions", COMPLETIONS, None),
    ("/v1/embeddings", EMBEDDINGS, None),
    ("/v1/responses", CHAT, RESPONSES),
    ("/v1/messages", CHAT, MESSAGES),
)


def add_routes(app: web.Application) -> None:
    """Register the public endpoints (a GET route answers HEAD too)."""
    router = app.router
    for path, endpoint, front in MODEL_ROUTES:
        # `_proxy` itself is the handler (aiohttp takes a partial of a coroutine function
        # as one): a handler that only passed the call on would be one more coroutine on
        # every request, resumed at each of its waits.
        router.add_post(path, functools.partial(_proxy, endpoint=endpoint, front=front),
                        expect_handler=expect_continue)
    router.add_post("/v1/messages/count_tokens", count_message_tokens,
                    expect_handler=expect_continue)
    for path, get in (("/v1/models", list_models), ("/v1/models/{id:.+}", retrieve_model),
                      ("/healthz", healthz), ("/readyz", readyz), ("/metrics", metrics)):
        router.add_get(path, get, expect_handler=expect_continue)
