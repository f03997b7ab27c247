"""The proxy's HTTP/1.1 server: asyncio protocols on httptools' parser, and nothing else.

A proxy in front of every model call has to cost next to nothing, and a general web
framework spends most of a request's CPU on machinery the proxy does not use (request
objects with lazy everything, middleware chains, multi-dicts, signals). This server does
what the proxy needs and no more:

- keep-alive and pipelining (requests on one connection are answered in order), HTTP/1.0
  and `Connection: close`, chunked or sized request bodies, `Expect: 100-continue`;
- bounded header size (431), body size (413, then the connection closes) and body time
  (the handler's read gives up after `body_timeout_s`: 408); a malformed request gets an
  OpenAI-shaped 400 and the connection closes;
- a handler is cancelled as soon as its client disconnects, so an upstream request is
  closed at once rather than orphaned;
- write flow control for streams (`StreamResponse.write` waits while the socket buffer is
  full), idle keep-alive connections closed after `keepalive_s`;
- graceful shutdown: stop accepting, close idle connections, let running handlers finish
  within a grace period, then cancel what is left.

Routing is a dict lookup on (method, path) plus a few `{name}` patterns; an `App` holds the
routes, the error wrapper (`on_error`) and typed shared state.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any, Generic, TypeVar, cast
from urllib.parse import parse_qsl, unquote

import httptools
import structlog

from proxy.headers import Headers

log = structlog.get_logger("proxy.httpserver")

T = TypeVar("T")

#: Most bytes of request line and headers taken from a client.
MAX_HEAD_BYTES = 128 * 1024
#: Requests parsed ahead of the one being answered before the connection stops reading.
MAX_PIPELINED = 16
#: How long a connection whose request body was refused keeps draining it before closing.
LINGER_S = 2.0
#: Unsent response bytes above which a streaming write waits for the client.
WRITE_HIGH_WATER = 256 * 1024


class HttpError(Exception):
    """A protocol-level error answered by the server itself (status, message, headers)."""

    def __init__(self, status: int, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class BodyTooLarge(HttpError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than the limit of {limit} bytes.")


class ClientDisconnected(ConnectionError):
    """The client closed the connection before its request body was complete."""


class BadFraming(Exception):
    """The request body's framing (chunked encoding) is broken; the connection closes."""


class AppKey(Generic[T]):
    """A typed key for state kept on the App (`app[KEY]`)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"AppKey({self.name!r})"


class Request:
    """One request: method, path, query, headers, and a body that may still be arriving."""

    __slots__ = ("method", "path", "raw_path", "query_string", "headers", "app", "match_info",
                 "keep_alive", "expect_continue", "http10", "_body", "_size", "_complete", "_waiter",
                 "_error", "_query", "_limit", "_conn")

    def __init__(self, conn: _Connection, method: str, path: str, raw_path: str,
                 query_string: str, headers: Headers, limit: int) -> None:
        self.method = method
        self.path = path  # percent-decoded
        self.raw_path = raw_path
        self.query_string = query_string
        self.headers = headers
        self.app: App = conn.app
        self.match_info: dict[str, str] = {}
        self.keep_alive = True
        #: The client waits for `100 Continue` before sending the body (sent on first read).
        self.expect_continue = False
        self.http10 = False  # an HTTP/1.0 client: no chunked encoding
        self._body: list[bytes] = []
        self._size = 0
        self._complete = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        self._query: dict[str, str] | None = None
        self._limit = limit
        self._conn = conn

    @property
    def query(self) -> Mapping[str, str]:
        """Query parameters (the first value of each name), decoded as UTF-8."""
        if self._query is None:
            query: dict[str, str] = {}
            for name, value in parse_qsl(self.query_string, keep_blank_values=True,
                                         errors="replace"):
                query.setdefault(name, value)
            self._query = query
        return self._query

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None

    async def read(self, timeout_s: float | None = None) -> bytes:
        """The whole body; raises BodyTooLarge, ClientDisconnected, or TimeoutError when it
        has not all arrived within `timeout_s` (no timer at all when it already has)."""
        if not self._complete and self._error is None:
            loop = asyncio.get_running_loop()
            deadline = None if timeout_s is None else loop.time() + timeout_s
            while not self._complete and self._error is None:
                waiter = self._waiter = loop.create_future()
                timer = None if deadline is None else loop.call_at(deadline, _time_out, waiter)
                self._conn.body_wanted(self)
                try:
                    await waiter
                finally:
                    self._waiter = None
                    if timer is not None:
                        timer.cancel()
        if self._error is not None:
            raise self._error
        body = self._body
        if not body:
            return b""
        return body[0] if len(body) == 1 else b"".join(body)

    # ---- fed by the connection

    def _feed(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            if self._error is None:
                self._error = BodyTooLarge(self._limit)
                self._body = []
                self.keep_alive = False  # the rest of it is not worth reading
                self._wake()
            return
        self._body.append(data)

    def _finish(self) -> None:
        self._complete = True
        self._wake()

    def _fail(self, error: Exception) -> None:
        if not self._complete and self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Response:
    """A whole response."""

    __slots__ = ("status", "body", "headers")

    def __init__(self, status: int = 200, body: bytes = b"",
                 headers: dict[str, str] | None = None,
                 content_type: str | None = "application/json") -> None:
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else {}
        if content_type is not None:
            self.headers["Content-Type"] = content_type


class StreamResponse:
    """A response written piece by piece (chunked transfer encoding): prepare, write..., write_eof."""

    __slots__ = ("status", "headers", "_conn", "prepared", "finished", "_chunked")

    def __init__(self, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.headers = headers if headers is not None else {}
        self._conn: _Connection | None = None
        self.prepared = False
        self.finished = False
        self._chunked = True

    async def prepare(self, request: Request, first: bytes = b"") -> None:
        """Send the status line and headers (and `first`, the start of the body, with them)."""
        conn = request._conn
        if conn.transport is None or conn.transport.is_closing():
            raise ConnectionResetError("the client has gone")
        self._conn = conn
        conn.head_sent = request
        if request.http10:  # no chunked encoding: the body ends when the connection does
            self._chunked = request.keep_alive = False
            head = _head(self.status, self.headers, False)
            conn.write(head + first)
        else:
            self.headers["Transfer-Encoding"] = "chunked"
            head = _head(self.status, self.headers, conn.keeps(request))
            conn.write(head + b"%x\r\n%b\r\n" % (len(first), first) if first else head)
        self.prepared = True
        if conn.paused:
            await conn.drain()

    async def write(self, data: bytes) -> None:
        """Send one piece; waits while the client is not reading."""
        conn = self._conn
        if conn is None:
            raise RuntimeError("write() before prepare()")
        if not data:
            return
        conn.write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)
        if conn.paused:
            await conn.drain()

    async def write_eof(self) -> None:
        """End the response."""
        if self.finished or self._conn is None:
            return
        self.finished = True
        if self._chunked:
            self._conn.write(b"0\r\n\r\n")


Handler = Callable[[Request], Awaitable["Response | StreamResponse"]]
ErrorWrapper = Callable[[Request, Handler], Awaitable["Response | StreamResponse"]]
Lifecycle = Callable[["App"], AsyncIterator[None]]


class App:
    """Routes, the error wrapper, life-cycle hooks and shared state of one server."""

    def __init__(self, *, client_max_size: int = 1 << 20,
                 error_response: Callable[[int, str], Response] | None = None) -> None:
        self.client_max_size = client_max_size
        self._state: dict[AppKey[Any], Any] = {}
        self._exact: dict[str, dict[str, Handler]] = {}
        self._patterns: list[tuple[tuple[str, ...], dict[str, Handler]]] = []
        self.wrap: ErrorWrapper | None = None
        self.lifecycles: list[Lifecycle] = []
        self._running: list[AsyncIterator[None]] = []
        self.error_response = error_response or _plain_error

    # ---- state

    def __getitem__(self, key: AppKey[T]) -> T:
        value: T = self._state[key]
        return value

    def __setitem__(self, key: AppKey[T], value: T) -> None:
        self._state[key] = value

    # ---- routes

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """Route `method path`; a segment `{name}` matches one path segment (match_info)."""
        if "{" in path:
            parts = tuple(path.strip("/").split("/"))
            for existing, methods in self._patterns:
                if existing == parts:
                    methods[method] = handler
                    return
            self._patterns.append((parts, {method: handler}))
        else:
            self._exact.setdefault(path, {})[method] = handler

    def add_get(self, path: str, handler: Handler) -> None:
        self.add_route("GET", path, handler)

    def add_post(self, path: str, handler: Handler) -> None:
        self.add_route("POST", path, handler)

    def resolve(self, request: Request) -> Handler:
        """The handler for a request, or an HttpError 404/405."""
        methods = self._exact.get(request.path)
        if methods is None:
            methods = self._match_pattern(request)
        if methods is None:
            raise HttpError(404, f"Unknown path: {request.path}")
        handler = methods.get(request.method)
        if handler is None and request.method == "HEAD":
            handler = methods.get("GET")
        if handler is None:
            allowed = sorted({*methods, "HEAD"} if "GET" in methods else methods)
            raise HttpError(405, f"Method {request.method} is not allowed for {request.path}; "
                                 f"allowed: {', '.join(allowed)}.", {"Allow": ", ".join(allowed)})
        return handler

    def _match_pattern(self, request: Request) -> dict[str, Handler] | None:
        segments = request.raw_path.strip("/").split("/")
        for parts, methods in self._patterns:
            if len(parts) != len(segments):
                continue
            found: dict[str, str] = {}
            for part, segment in zip(parts, segments, strict=True):
                if part.startswith("{"):
                    if not segment:
                        break
                    found[part[1:-1]] = unquote(segment, errors="replace")  # once
                elif part != segment:
                    break
            else:
                request.match_info = found
                return methods
        return None

    async def handle(self, request: Request) -> Response | StreamResponse:
        """Resolve and run the handler, through the error wrapper when there is one."""
        try:
            handler = self.resolve(request)
        except HttpError as exc:
            response = self.error_response(exc.status, exc.message)
            response.headers.update(exc.headers)
            return response
        if self.wrap is not None:
            return await self.wrap(request, handler)
        return await handler(request)

    # ---- life cycle

    async def startup(self) -> None:
        for hook in self.lifecycles:
            run = hook(self)
            await run.__anext__()
            self._running.append(run)

    async def cleanup(self) -> None:
        while self._running:
            run = self._running.pop()
            try:
                await run.__anext__()
            except StopAsyncIteration:
                pass
            except Exception:
                log.exception("cleanup_failed")


def _plain_error(status: int, message: str) -> Response:
    return Response(status, message.encode(), content_type="text/plain; charset=utf-8")


# --------------------------------------------------------------------------- wire format

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_STATUS_LINES: dict[int, str] = {}
_date_second = -1
_date_line = ""


def _date() -> str:
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_line = "Date: " + time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)) \
            + "\r\n"
    return _date_line


def _status_line(status: int) -> str:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
    return line


def _head(status: int, headers: Mapping[str, str], keep_alive: bool,
          content_length: int | None = None) -> bytes:
    parts = [_status_line(status), _date()]
    for name, value in headers.items():
        if "\n" in value or "\r" in value:  # never let a value split the head
            value = value.replace("\r", " ").replace("\n", " ")
        parts.append(f"{name}: {value}\r\n")
    if content_length is not None:
        parts.append(f"Content-Length: {content_length}\r\n")
    if not keep_alive:
        parts.append("Connection: close\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1", "replace")


# --------------------------------------------------------------------------- connections


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, runs their handlers one at a time."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.app = server.app
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self.closing = False
        self.queue: deque[Request] = deque()
        self.task: asyncio.Task[None] | None = None
        self.current: Request | None = None  # the request the parser is filling
        self.head_sent: Request | None = None  # the request whose stream head went out
        self.idle_since = time.monotonic()
        self._url = b""
        self._headers: dict[str, str] = {}
        self._head_bytes = 0
        self._raw_head = 0
        self._in_head = False
        self._line_done = False  # the request line of the message being read has ended
        self._parse_error = False

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        if self.current is not None:
            self.current._fail(ClientDisconnected("the client closed the connection"))
        for request in self.queue:
            request._fail(ClientDisconnected("the client closed the connection"))
        self.queue.clear()
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client is gone: stop its handler (and its upstream)
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("the client has gone"))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._parse_error:
            return
        began_in_head = self._in_head
        try:
            self.parser.feed_data(data)
            if self._in_head:
                # The parser holds a header line until it ends: bound what it may hold, by
                # the bytes that arrived while the head was incomplete (callbacks count the
                # finished lines exactly, separately).
                self._raw_head = self._raw_head + len(data) if began_in_head else len(data)
                self._line_done = self._line_done or b"\n" in data
                if self._raw_head > MAX_HEAD_BYTES:
                    if not self._line_done:
                        raise HttpError(414, "The request line is too long.")
                    raise HttpError(431, "The request headers are larger than "
                                         f"{MAX_HEAD_BYTES} bytes.")
        except HttpError as exc:
            self._protocol_error(exc.status, exc.message)
        except httptools.HttpParserUpgrade:
            # A bodyless request asked to switch protocols (others were refused): it is
            # answered as plain HTTP/1.1, then the connection closes; what follows is not
            # HTTP this server reads.
            self._parse_error = True
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # an error raised by one of our callbacks
            if isinstance(cause, HttpError):
                self._protocol_error(cause.status, cause.message)
            else:
                detail = str(exc).strip() or type(exc).__name__
                self._protocol_error(400, f"Malformed HTTP request: {detail[:200]}.")

    def eof_received(self) -> bool | None:
        return None  # close our side too

    # ---- httptools callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._head_bytes = 0
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise HttpError(414, "The request line is too long.")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES:
            raise HttpError(431, f"The request headers are larger than {MAX_HEAD_BYTES} bytes.")
        key = name.decode("latin-1").lower()
        text = value.decode("utf-8", "surrogateescape")
        headers = self._headers
        seen = headers.get(key)
        headers[key] = text if seen is None else f"{seen}, {text}"

    def on_headers_complete(self) -> None:
        self._in_head = self._line_done = False
        parser = self.parser
        url = self._url
        qmark = url.find(b"?")
        if qmark >= 0:
            raw_path, query = url[:qmark], url[qmark + 1:].decode("latin-1")
        else:
            raw_path, query = url, ""
        if raw_path.startswith(b"http://") or raw_path.startswith(b"https://"):
            raw_path = b"/" + raw_path.split(b"/", 3)[-1] if raw_path.count(b"/") >= 3 else b"/"
        raw = raw_path.decode("latin-1")
        path = unquote(raw, errors="replace") if "%" in raw else raw
        method = parser.get_method().decode("latin-1")
        raw_headers = self._headers
        coding = raw_headers.get("transfer-encoding")
        if coding is not None and coding.rsplit(",", 1)[-1].strip().lower() != "chunked":
            # The body's end cannot be known (RFC 9112 6.3): refuse rather than guess.
            raise HttpError(400, "A Transfer-Encoding other than chunked is not accepted.")
        upgrade = parser.should_upgrade()
        if upgrade and (method == "CONNECT" or coding is not None
                        or raw_headers.get("content-length", "0").strip() not in ("", "0")):
            # The parser would take the body for another protocol's bytes: refuse.
            raise HttpError(400, "Protocol upgrades (and CONNECT) are not supported here; "
                                 "send the request as plain HTTP/1.1 without Upgrade.")
        request = Request(self, method, path, raw, query, Headers(raw_headers),
                          self.app.client_max_size)
        request.keep_alive = parser.should_keep_alive() and not upgrade
        request.http10 = parser.get_http_version() == "1.0"
        self.current = request
        length = request.content_length
        if length is not None and length > self.app.client_max_size:
            request._error = BodyTooLarge(self.app.client_max_size)
            request.keep_alive = False
        elif raw_headers.get("expect", "").lower() == "100-continue" and not request.http10:
            request.expect_continue = True
        self.queue.append(request)
        if self.task is None:
            self._start_next()
        elif len(self.queue) > MAX_PIPELINED and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True

    def on_body(self, body: bytes) -> None:
        if self.current is not None:
            self.current._feed(body)

    def on_message_complete(self) -> None:
        request = self.current
        if request is not None:
            self.current = None
            request._finish()

    # ---- handling

    def body_wanted(self, request: Request) -> None:
        """A handler waits for body bytes: ask for them if the client waits to be asked, and
        make sure the socket is being read."""
        if request.expect_continue and self.transport is not None:
            request.expect_continue = False
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def _start_next(self) -> None:
        request = self.queue.popleft()
        self.task = asyncio.get_running_loop().create_task(self._run(request))

    async def _run(self, request: Request) -> None:
        try:
            try:
                response = await self.app.handle(request)
            except asyncio.CancelledError:
                return
            except BodyTooLarge as exc:
                response = self.app.error_response(exc.status, exc.message)
            except Exception:
                log.exception("handler_failed", path=request.path)
                response = self.app.error_response(500, "The proxy hit an internal error; "
                                                        "it has been logged.")
            keep_alive = self.keeps(request) and request._complete
            if isinstance(response, StreamResponse):
                if not response.prepared:
                    await response.prepare(request)
                await response.write_eof()
                keep_alive = keep_alive and request.keep_alive  # (HTTP/1.0 streams close)
            elif self.head_sent is request:
                # A stream had started when the handler failed: a second answer cannot
                # follow its head; closing is how the client learns it is incomplete.
                keep_alive = False
            else:
                body = response.body
                headers = response.headers
                if keep_alive and request.http10:
                    headers["Connection"] = "keep-alive"
                head = _head(response.status, headers, keep_alive, len(body))
                if request.method == "HEAD" or not body:
                    self.write(head)
                else:
                    self.write(head + body)
        except (ConnectionError, RuntimeError):  # the client is gone
            keep_alive = False
        except Exception:  # a bug of ours: say so, and never leave the connection half-open
            log.exception("response_failed", path=request.path)
            keep_alive = False
        self.idle_since = time.monotonic()
        if not request._complete:
            # A body still arriving (refused, or not needed) is not worth parsing to find a
            # next request; it is drained until the client closes, so that closing does not
            # reset the connection before the client has read the answer.
            self._linger()
            return
        if not keep_alive:
            self.close()
            return
        self.task = None
        if self.queue:
            self._start_next()
        elif self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def keeps(self, request: Request) -> bool:
        """Whether the connection stays open after answering `request`."""
        return request.keep_alive and not self.closing and not self.server.stopping

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client has gone")
        transport.write(data)

    async def drain(self) -> None:
        if not self.paused:
            return
        if self.transport is None:
            raise ConnectionResetError("the client has gone")
        waiter = self._drain_waiter
        if waiter is None or waiter.done():
            waiter = self._drain_waiter = asyncio.get_running_loop().create_future()
        await waiter

    def _linger(self) -> None:
        """Half-close after the answer, discard what the client still sends, then close."""
        self.closing = True
        self._parse_error = True  # data_received drops everything from now on
        transport = self.transport
        if transport is None:
            return
        if transport.can_write_eof():
            transport.write_eof()
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        asyncio.get_running_loop().call_later(LINGER_S, self.close)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def _protocol_error(self, status: int, message: str) -> None:
        """Answer a request the parser refused, then close: the stream cannot be trusted."""
        self._parse_error = True
        if self.current is not None:  # its body will never be complete
            self.current._fail(BadFraming(message))
            self.current = None
        if self.task is not None:
            self.closing = True  # answer what is in progress, then close
            return
        response = self.app.error_response(status, message)
        try:
            self.write(_head(status, response.headers, False, len(response.body)) + response.body)
        except ConnectionError:
            pass
        self._linger()


class Server:
    """A listening socket serving an App."""

    def __init__(self, app: App, *, keepalive_s: float = 75.0) -> None:
        self.app = app
        self.keepalive_s = keepalive_s
        self.connections: set[_Connection] = set()
        self.stopping = False
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool = False,
                    backlog: int = 1024) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port,
                                                reuse_port=reuse_port or None, backlog=backlog)
        self._sweeper = loop.create_task(self._sweep())

    @property
    def active(self) -> int:
        """Handlers running now."""
        return sum(1 for c in self.connections if c.task is not None and not c.task.done())

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def _sweep(self) -> None:
        """Close keep-alive connections idle for longer than `keepalive_s`."""
        while True:
            await asyncio.sleep(min(10.0, self.keepalive_s))
            cutoff = time.monotonic() - self.keepalive_s
            for conn in list(self.connections):
                if conn.task is None and conn.idle_since < cutoff:
                    conn.close()

    async def close(self, grace_s: float = 10.0) -> None:
        """Stop accepting; wait up to `grace_s` for running handlers; close everything."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            if conn.task is None:
                conn.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while any(c.task is not None and not c.task.done() for c in self.connections) \
                and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.task is not None and not conn.task.done():
                conn.task.cancel()
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()


async def start_server(app: App, host: str, port: int, *, reuse_port: bool = False) -> Server:
    """Run the app's start-up hooks and listen; `Server.port` is the bound port."""
    await app.startup()
    server = Server(app)
    try:
        await server.start(host, port, reuse_port=reuse_port)
    except BaseException:
        await app.cleanup()
        raise
    return server


async def stop_server(server: Server, grace_s: float = 10.0) -> None:
    """Close the server gracefully, then run the app's cleanup."""
    await server.close(grace_s)
    await server.app.cleanup()
