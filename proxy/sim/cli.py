"""`failover-proxy simulate`: a simulator as a process, until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable

from proxy.sim.faults import KNOWN
from proxy.sim.simulator import Simulator


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate`` command-line options to ``parser``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0: pick a free one)")
    parser.add_argument("--model", required=True, help="model name to serve")
    parser.add_argument("--words", type=int, default=20, help="words per answer (default: 20)")
    parser.add_argument("--chunk-delay", type=float, default=0.0, metavar="SECONDS",
                        help="delay between streamed chunks (default: 0)")
    parser.add_argument("--fault", action="append", default=[], metavar="NAME[=VALUE]",
                        help="inject a fault; repeatable. Known: " + ", ".join(KNOWN))
    parser.add_argument("--control-port", type=int, default=None,
                        help="extra always-on port for the /_sim/ control endpoints")
    parser.add_argument("--no-prefill", action="store_true",
                        help="reject requests whose last message is from the assistant (HTTP 400)")
    parser.add_argument("--slots", type=int, default=None, metavar="N",
                        help="report N llama.cpp slots (/props total_slots, /slots busy ones)")


def run(args: argparse.Namespace) -> int:
    """Run a simulator until SIGINT/SIGTERM; return the process exit code.

    Prints ``simulator MODEL listening on http://HOST:PORT`` once ready.
    Bad faults or options print an error and return 2; bind failures return 1.
    """
    try:
        sim = Simulator(
            args.model,
            host=args.host,
            port=args.port,
            words=args.words,
            chunk_delay=args.chunk_delay,
            faults=args.fault or (),
            control_port=args.control_port,
            prefill=not args.no_prefill,
            slots=args.slots,
        )
    except ValueError as exc:
        print(f"failover-proxy simulate: error: {exc}", file=sys.stderr)
        return 2
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(_serve_until_signal(sim))
    except OSError as exc:
        print(f"failover-proxy simulate: error: {exc}", file=sys.stderr)
        return 1


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _serve_until_signal(sim: Simulator) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-POSIX
            pass
    await sim.start()
    try:
        print(f"simulator {sim.model} listening on http://{_print_host(sim.host)}:{sim.port}", flush=True)
        await stop.wait()
    finally:
        await sim.stop()
    return 0


def _print_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
