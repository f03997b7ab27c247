"""Running the proxy: the HTTP server, signals, graceful shutdown and reload.

SIGTERM/SIGINT: stop accepting, let in-flight requests and streams finish within
`server.shutdown_grace_s`, flush the audit queue, exit 0. SIGHUP: reload the config file
(see `proxy.app.reload_config`).

The runner also makes aiohttp's own protocol-level errors (a header too large, a body in
an encoding it cannot decode) answer in OpenAI's error shape instead of plain text.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy.errors import error_body

log = structlog.get_logger("proxy.server")

#: How the proxy's server must run (`serve` and the tests use it): no access log (the
#: proxy logs one line per request itself), and a handler is cancelled as soon as its
#: client disconnects, so the upstream request is closed at once, never orphaned.
SERVER_OPTIONS: dict[str, Any] = {"access_log": None, "handler_cancellation": True}


class _JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, answering its own HTTP-level errors in OpenAI's shape."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        plain = super().handle_error(request, status, exc, message)
        kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
        detail = (message or "").strip().splitlines()[0][:300] if message else ""
        if status >= 500:
            text = "The proxy hit an internal error; it has been logged."
        else:
            text = "Malformed HTTP request" + (f": {detail}" if detail else "") + "."
        resp = web.Response(status=status, body=error_body(text, kind),
                            content_type="application/json")
        resp.force_close()
        del plain
        return resp


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class ProxyRunner(web.AppRunner):
    """An AppRunner whose connections use `_JsonErrorHandler`."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer  # same state, one overridden factory method
        return server


async def serve(app: web.Application, host: str, port: int, grace_s: float,
                on_reload: Any = None, reuse_port: bool = False) -> None:
    """Serve until SIGTERM or SIGINT; then shut down gracefully."""
    runner = ProxyRunner(app, shutdown_timeout=grace_s, **SERVER_OPTIONS)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
    await site.start()
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
        # Stops accepting, waits up to grace_s for in-flight requests, then runs the
        # app's cleanup (prober, upstream session, audit flush).
        await runner.cleanup()
        log.info("stopped")


def supervise(workers: int, run_one: Callable[[], int]) -> int:
    """Run `run_one` in `workers` forked processes sharing one port (SO_REUSEPORT).

    Each worker is a whole proxy with its own instance states, prober, sessions, metrics
    and audit writer (they share the SQLite file). Signals are passed on to every worker;
    the supervisor exits when all have, with the worst exit code.
    """
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                code = run_one()
            finally:
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
