"""Running the proxy: the HTTP server, signals, graceful shutdown and reload.

SIGTERM/SIGINT: stop accepting, let in-flight requests and streams finish within
`server.shutdown_grace_s`, flush the audit queue, exit 0. SIGHUP: reload the config file
(see `proxy.app.reload_config`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from typing import Any

import structlog

from proxy.httpserver import App, start_server, stop_server

log = structlog.get_logger("proxy.server")


async def serve(app: App, host: str, port: int, grace_s: float,
                on_reload: Any = None, reuse_port: bool = False) -> None:
    """Serve until SIGTERM or SIGINT; then shut down gracefully."""
    server = await start_server(app, host, port, reuse_port=reuse_port)
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
        # app's cleanup (prober, upstream connections, audit flush).
        await stop_server(server, grace_s)
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
