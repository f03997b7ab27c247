"""The `failover-proxy` command line: one entry point, one sub-command per job."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from proxy import __version__
from proxy.config import Config, ConfigError, load_config


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def use_uvloop() -> None:
    """Install uvloop's event loop policy when it is available (it is by default)."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def cmd_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from proxy.app import create_app
    from proxy.logs import configure_logging

    config = _load(args.config)
    configure_logging(args.log_format or config.logging.format, config.logging.level)
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    use_uvloop()
    app = create_app(config)
    print(f"failover-proxy {__version__} serving on http://{host}:{port}/v1 "
          f"({len(config.instances)} instances, config {config.source})", flush=True)
    web.run_app(app, host=host, port=port, access_log=None, print=None,
                handle_signals=True, shutdown_timeout=10.0)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from proxy import simulator

    return simulator.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="failover-proxy",
                                     description="OpenAI-compatible failover proxy.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", "-c", required=True, help="YAML or JSON config file")
    serve.add_argument("--host", help="bind address (default: server.host)")
    serve.add_argument("--port", type=int, help="port (default: server.port)")
    serve.add_argument("--log-format", choices=("json", "console"),
                       help="log output (default: logging.format, json)")
    serve.set_defaults(func=cmd_serve)

    from proxy import simulator

    simulate = sub.add_parser("simulate", help="run a simulated OpenAI-compatible backend")
    simulator.add_arguments(simulate)
    simulate.set_defaults(func=cmd_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `failover-proxy` console script and `python -m proxy`."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
