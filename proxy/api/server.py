"""Running the proxy on aiohttp's server: protocol errors, signals, graceful shutdown, workers.

SIGTERM/SIGINT: stop accepting, let in-flight requests and streams finish within
`server.shutdown_grace_s`, flush the audit queue, exit 0. SIGHUP: reload the config file
(see `proxy.app.reload_config`).

The app's middleware gives every error raised while handling a request OpenAI's shape. A
request that aiohttp's parser refuses (a malformed request line or header, a line over
the limits set in `HANDLER_ARGS`, a missing or repeated `Host`) never reaches
the app: aiohttp answers it itself through `RequestHandler.handle_error`. `ProxyRunner`
serves the app with a RequestHandler subclass that answers those in the same shape, then
reads no further into the connection (half-closed, the rest dropped, then closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadStatusLine, HttpProcessingError, InvalidHeader, LineTooLong
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from proxy.api.errors import error_body
from proxy.api.middleware import framework_error, http_error_response

log = structlog.get_logger("proxy.api.server")

#: How aiohttp's server runs this app, wherever it is served (`serve`, tests, chaos):
#: - a request line over MAX_LINE_SIZE bytes is refused (414), a header line (name and
#:   value) over MAX_FIELD_SIZE or more than MAX_HEADERS headers too (431); each parsed
#:   request waiting on a connection holds at most MAX_HEADERS * MAX_FIELD_SIZE bytes, and
#:   aiohttp stops reading a connection that has 32 unanswered requests queued;
#: - a handler is cancelled as soon as its client disconnects, so the upstream request is
#:   closed at once rather than orphaned;
#: - request bodies are never decompressed (compressed ones are refused with a 415 before
#:   they are read); no access log (the proxy logs one line per request itself);
#: - a keep-alive connection idle for KEEPALIVE_S is closed (also one that never completes
#:   its first request head); after an answer sent before its request's body was read
#:   (401, 413...), what is left of the body is read and dropped for up to LINGER_S, so
#:   that closing does not reset the connection before the client has read the answer.
MAX_LINE_SIZE = 8 * 1024
MAX_FIELD_SIZE = 16 * 1024
MAX_HEADERS = 100
KEEPALIVE_S = 75.0
LINGER_S = 2.0
HANDLER_ARGS: dict[str, Any] = {
    "max_line_size": MAX_LINE_SIZE, "max_field_size": MAX_FIELD_SIZE,
    "max_headers": MAX_HEADERS, "keepalive_timeout": KEEPALIVE_S, "lingering_time": LINGER_S,
    "handler_cancellation": True, "auto_decompress": False, "access_log": None,
}

#: Pending connections the kernel keeps for the listening socket (aiohttp's default is 128;
#: a burst of new clients should queue, not be refused).
BACKLOG = 1024


def protocol_error(status: int, exc: BaseException | None,
                   message: str | None) -> tuple[int, str]:
    """The status and message for a request aiohttp refused: its parser reports every
    refusal as a 400 with an HttpProcessingError; a line over a size limit becomes 414
    (the request line, MAX_LINE_SIZE) or 431 (a header line, MAX_FIELD_SIZE), too many
    headers 431. Any other status (a 500 from a handler, which the middleware prevents)
    is kept with a message that says nothing about internals."""
    if status >= 500:
        return status, "The proxy hit an internal error; it has been logged."
    if isinstance(exc, LineTooLong):
        # aiohttp's C parser raises LineTooLong(line, limit) with the limit of the line
        # it was reading; the two limits differ, so the limit says which line it was.
        limit = str(exc.args[1]) if len(exc.args) > 1 else ""
        if limit == str(MAX_LINE_SIZE):
            return 414, f"The request line is longer than {MAX_LINE_SIZE} bytes."
        return 431, f"A request header line is longer than {MAX_FIELD_SIZE} bytes."
    if isinstance(exc, InvalidHeader):  # its message quotes the header (a key, maybe)
        return status, "Malformed HTTP request: a header holds a forbidden character."
    if isinstance(exc, BadStatusLine):  # (and this one the request line)
        return status, "Malformed HTTP request: the request line is not HTTP/1.x."
    detail = message or (exc.message if isinstance(exc, HttpProcessingError) else "") or ""
    # The C parser's message is a line of text, then the offending bytes with a caret:
    # only the text is kept, so no byte the client sent is echoed (or logged).
    detail = detail.strip().splitlines()[0][:200].rstrip(":. ") if detail.strip() else ""
    if detail == "Too many headers received":
        return 431, "The request has too many headers."
    return status, "Malformed HTTP request" + (f": {detail}" if detail else "") + "."


class _Refusal(web.Response):
    """The answer to a request the parser refused. After it, the connection is half-closed
    (the client reads the answer, then EOF), and whatever the client still sends is read
    and dropped for up to LINGER_S before the connection closes (sooner when the client
    closes): closing a socket with unread bytes would reset the connection, and a reset
    can destroy the answer before the client has read it."""

    def __init__(self, transport: asyncio.Transport | None, status: int, body: bytes) -> None:
        super().__init__(status=status, body=body, content_type="application/json")
        self.force_close()
        self.transport = transport

    async def write_eof(self, data: bytes = b"") -> None:
        await super().write_eof(data)
        transport = self.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()
            # Cancelled at once when the client closes (handler_cancellation).
            await asyncio.sleep(LINGER_S)


class _OpenAIErrorHandler(RequestHandler):
    """aiohttp's connection protocol, answering its own errors in OpenAI's shape, and
    reading no further into a connection once its parser has refused a request."""

    __slots__ = ("_refused",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # the stream cannot be trusted any more: dropped until the close
        super().data_received(data)
        # aiohttp queues a request its parser refused as a message (_ErrInfo) for
        # start() to answer after the ones before it, and would go on parsing what
        # follows into more of them, each holding the offending bytes in its message
        # (about 10 MB per connection sending an endless header line).
        messages = self._messages
        if not messages or not isinstance(messages[-1][0], _ErrInfo):
            return
        self._refused = True
        request = self._current_request
        if request is not None and not request.content.is_eof():
            # The refused bytes are the body of the request being handled (a broken
            # chunked encoding). aiohttp 3.14's C parser drops that body without failing
            # it (its pure-Python parser fails it), so the handler reading it would wait
            # out body_timeout_s: it is failed here, and the connection closes after the
            # handler's answer rather than answer the same request twice.
            request.content.set_exception(web.RequestPayloadError(messages[-1][0].message))
            request.content.feed_eof()  # (nothing of it left to drain after the answer)
            self.close()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        # aiohttp 3.14 (web_protocol.py) calls this for a request its parser refused
        # (status 400, the parser's exception) and for an exception that escaped the
        # request handler (500, or 504 for a TimeoutError; the app's middleware catches
        # both first). Like the method it overrides: nothing can follow a response
        # already started, and the connection closes after the answer.
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already started on this connection")
        status, text = protocol_error(status, exc, message)
        if status >= 500:
            log.error("request_failed", status=status, exc_info=exc)
            resp = http_error_response(status, text)
            resp.force_close()
            return resp
        log.debug("bad_http_request", status=status, message=text)
        return _Refusal(self.transport, status, error_body(text, "invalid_request_error"))

    def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                        start_time: float | None
                        ) -> Coroutine[Any, Any, tuple[web.StreamResponse, bool]]:
        # An HTTPException raised before the app's middleware runs reaches the client
        # through here as it is: aiohttp's default Expect handler, which the router uses
        # for unknown paths, answers an unknown expectation with a plain-text 417. (Not
        # a coroutine itself: no extra await per request.)
        if resp.status >= 400 and isinstance(resp, web.HTTPException):  # (an ABC check)
            resp = framework_error(request, resp)
        return super().finish_response(request, resp, start_time)


class _OpenAIErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        # The same construction as web.Server.__call__, with the subclass.
        return _OpenAIErrorHandler(self, loop=self._loop, **self._kwargs)


class ProxyRunner(web.AppRunner):
    """An AppRunner whose connections answer aiohttp's own protocol errors in OpenAI's
    shape (`_OpenAIErrorHandler`). Everything else is aiohttp's AppRunner: the app's
    cleanup_ctx runs on setup and cleanup, and cleanup stops accepting, closes idle
    connections, waits up to `shutdown_timeout` seconds for running handlers, then
    cancels them."""

    async def _make_server(self) -> web.Server:
        # aiohttp has no option for the connection protocol class (aio-libs/aiohttp#3287
        # asks for a hook for exactly this), so the app's own server is re-classed; its
        # state is untouched and only __call__ (the protocol factory) differs. Covered by
        # tests/test_server_edges.py, which fails if an aiohttp upgrade changes this.
        server = await super()._make_server()
        server.__class__ = _OpenAIErrorServer
        return server


class BindError(Exception):
    """The address cannot be listened on (in use, not this machine's, not permitted); the
    message is one sentence for people."""


def listen(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A socket bound to host:port and listening (the first address `host` resolves to;
    SO_REUSEADDR as aiohttp sets it, SO_REUSEPORT when asked). Raises BindError."""
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        return socket.create_server(address, family=family, backlog=BACKLOG,
                                    reuse_port=reuse_port)
    except OSError as exc:
        # (socket.create_server words its errors "... (while attempting to bind on ...)")
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        hint = " (is another proxy, or `make run`, using it?)" \
            if exc.errno == errno.EADDRINUSE else ""
        raise BindError(f"cannot listen on {host}:{port}: {why.lower()}{hint}") from None


async def start(app: web.Application, host: str, port: int, *, reuse_port: bool = False,
                shutdown_timeout: float = 10.0) -> ProxyRunner:
    """Listen on host:port (port 0: any free port; see `bound_port`), then run the app's
    start-up and serve. The address is taken first, so a busy port fails at once
    (BindError) rather than after the start-up; connections made during the start-up wait
    in the backlog. `reuse_port` lets several processes share the port (SO_REUSEPORT)."""
    sock = listen(host, port, reuse_port)
    runner = ProxyRunner(app, shutdown_timeout=shutdown_timeout)
    try:
        await runner.setup()
        await web.SockSite(runner, sock, backlog=BACKLOG).start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    return runner


#: The cyclic garbage collector's young-generation threshold while serving (CPython's
#: default is 700 allocations): see `settle_gc`.
GC_YOUNG_THRESHOLD = 7000


def settle_gc() -> None:
    """Tune the cyclic garbage collector for serving, once start-up is done.

    What start-up allocated (modules, config, pydantic models: tens of thousands of
    objects that live as long as the process) is moved out of the collector's sight
    (`gc.freeze`), and young collections run 10x less often. Under load, the objects of
    the requests in flight outlive a young collection or two and are promoted; with the
    defaults that promotion triggered a full collection over every object of the process
    every second or so, and the collector took about a sixth of the proxy's CPU at 64
    concurrent requests (measured with scripts/bench_cpu.py). Everything still gets
    collected; request objects are freed by reference counting anyway.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def bound_port(runner: web.BaseRunner) -> int:
    """The port a started runner listens on."""
    return int(runner.addresses[0][1])


async def serve(app: web.Application, host: str, port: int, grace_s: float,
                on_reload: Callable[[], Coroutine[Any, Any, None]] | None = None,
                reuse_port: bool = False,
                on_ready: Callable[[int], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT; then shut down gracefully within `grace_s`.
    `on_ready(port)` is called once the port is listening and the app has started.
    Raises BindError when the address cannot be listened on."""
    runner = await start(app, host, port, reuse_port=reuse_port, shutdown_timeout=grace_s)
    settle_gc()
    if on_ready is not None:
        on_ready(bound_port(runner))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[Any]] = set()

    def on_hup() -> None:
        if on_reload is not None:
            task = loop.create_task(on_reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await stop.wait()
        log.info("shutting_down", grace_s=grace_s)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        # Stops accepting, waits up to grace_s for in-flight requests and streams, then
        # runs the app's cleanup (prober, upstream connections, audit flush).
        await runner.cleanup()
        log.info("stopped")


def supervise(workers: int, run_one: Callable[[], int]) -> int:
    """Run `run_one` in `workers` forked processes sharing one port (SO_REUSEPORT).

    Each worker is a whole proxy with its own instance states, prober, sessions, metrics
    and audit writer (they share the SQLite file; with `state.url` they share instance
    states and sessions through Redis, as replicas do). Signals are passed on to every worker;
    the supervisor exits when all have, with the worst exit code.
    """
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                code = run_one()
            except BaseException:  # said, or the worker would end without a word
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        children.append(pid)

    def forward(signum: int, frame: Any) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    worst = 0
    for child in children:
        while True:
            try:
                _, status = os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
        worst = max(worst, os.waitstatus_to_exitcode(status) & 0xFF)
    return worst
