"""The `failover-proxy` command line: one entry point, one sub-command per job."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

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


def is_loopback(host: str) -> bool:
    """Whether `host` is only reachable from this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.api.server import BindError, listen, serve, supervise
    from proxy.app import create_app, reload_config
    from proxy.audit.database import StoreError
    from proxy.logs import configure_logging

    config = _load(args.config)
    configure_logging(args.log_format or config.logging.format, config.logging.level)
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    if not config.server.api_keys and not is_loopback(host) and not args.insecure:
        print(f"serve: refusing to listen on {host} with no server.api_keys: anyone who can "
              "reach it could use your upstream keys. Configure server.api_keys (and "
              "server.admin_key), bind to 127.0.0.1, or pass --insecure.", file=sys.stderr)
        return 1
    workers = max(1, args.workers)

    def announce(bound: int) -> None:
        # Only once the address is taken: a busy port is one line on stderr, never this.
        print(f"failover-proxy {__version__} serving on http://{host}:{bound}/v1 "
              f"({len(config.instances)} instance{'' if len(config.instances) == 1 else 's'}, "
              f"config {config.source}"
              + (f", {workers} workers" if workers > 1 else "") + ")", flush=True)

    def run_one(on_ready: Callable[[int], None] | None) -> int:
        use_uvloop()
        app = create_app(config)

        async def reload() -> None:
            await reload_config(app)

        try:
            asyncio.run(serve(app, host, port, config.server.shutdown_grace_s, reload,
                              reuse_port=workers > 1, on_ready=on_ready))
        except BindError as exc:
            print(f"serve: {exc}", file=sys.stderr)
            return 1
        except StoreError as exc:  # (its message shows the store's URL without password)
            print(f"serve: the audit store cannot be used: {exc}", file=sys.stderr)
            return 1
        return 0

    if workers == 1:
        return run_one(announce)
    try:  # the workers each bind the port (SO_REUSEPORT): see that they can, first
        listen(host, port, reuse_port=True).close()
    except BindError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 1
    announce(port)
    return supervise(workers, lambda: run_one(None))


def cmd_route(args: argparse.Namespace) -> int:
    import orjson

    from proxy.api.errors import ProxyError
    from proxy.api.inbound import CHAT, parse_request
    from proxy.health.registry import Registry
    from proxy.routing.planner import Planner, new_id

    config = _load(args.config)
    if args.request:
        try:
            with open(args.request, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            print(f"route: cannot read {args.request}: {exc.strerror}", file=sys.stderr)
            return 2
    else:
        if not args.prompt:
            print("route: give --request FILE, or -m MODEL and -p PROMPT", file=sys.stderr)
            return 2
        body: dict[str, object] = {"model": args.model,
                                   "messages": [{"role": "user", "content": args.prompt}]}
        if args.max_tokens is not None:
            body["max_tokens"] = args.max_tokens
        raw = orjson.dumps(body)
    headers = {}
    if args.tags:
        headers["x-route-tags"] = args.tags
    if args.prefer:
        headers["x-route-prefer"] = args.prefer
    if args.session:
        headers[config.routing.session_header] = args.session
    try:
        req = parse_request(CHAT, raw, new_id())
        plan = Planner(config, Registry(config.instances, config.health)).plan(req, headers)
    except ProxyError as exc:
        print(f"route: {exc.message}", file=sys.stderr)
        return 1
    sys.stdout.write(orjson.dumps(plan.as_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Probe every instance once and report; exit 1 when none is routable (or the config
    is invalid), 0 otherwise. Warnings (a label the server does not list, capabilities
    only cloud instances can serve) never fail the check."""
    import orjson

    from proxy.health.prober import Prober
    from proxy.health.registry import Registry
    from proxy.logs import configure_logging
    from proxy.providers.transport import Upstream, make_client
    from proxy.routing.scoring import capability_notes
    from proxy.secrets import Redactor, config_secrets

    config = _load(args.config)
    configure_logging("console", "error")

    async def probe() -> Registry:
        session = make_client(config.timeouts)
        try:
            registry = Registry(config.instances, config.health)
            upstream = Upstream(session, config.timeouts, Redactor(config_secrets(config)),
                                limits=config.upstream)
            await Prober(registry, upstream, config.health).probe_all()
            return registry
        finally:
            await session.close()

    registry = asyncio.run(probe())
    rows = [s.snapshot() for s in registry.states]
    notes = capability_notes(config.instances)
    routable = sum(1 for row in rows if row["routable"])
    if args.json:
        doc = {"instances": rows, "routable": routable, "capabilities": notes}
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(format_instances(rows))
        for row in rows:
            warnings = row["warnings"]
            for warning in warnings if isinstance(warnings, list) else ():
                print(f"warning: {row['id']}: {warning}")
        for note in notes:
            print(f"capabilities: {note}")
    if routable:
        return 0
    print(f"check: no instance is routable ({len(rows)} configured):", file=sys.stderr)
    for row in rows:
        print(f"  {row['id']}: {not_routable_reason(row)}", file=sys.stderr)
    return 1


def not_routable_reason(row: dict[str, object]) -> str:
    """Why an instance (a `snapshot()` row) may not be sent traffic, for people."""
    state = row["state"]
    if state == "DRAINED":
        return "disabled in the config" if not row["enabled"] else "drained by an admin"
    why = row.get("last_probe_error") or row.get("last_error")
    if state in ("READY", "UNKNOWN") and row.get("circuit") != "closed":
        why = f"circuit {row['circuit']} ({row.get('circuit_opened_by')})"
    return f"{state}: {why}" if why else str(state)


def format_instances(rows: list[dict[str, object]]) -> str:
    """The instance table of `check` (and of /admin/instances, for people)."""
    header = ("INSTANCE", "STATE", "CIRCUIT", "LATENCY", "FINGERPRINT", "DETAIL")
    table: list[tuple[str, ...]] = [header]
    for row in rows:
        probe_ms = row.get("last_probe_ms")
        detail = row.get("last_probe_error") or row.get("fingerprint_detail") or ""
        table.append((
            str(row["id"]), str(row["state"]), str(row["circuit"]),
            f"{probe_ms:.1f} ms" if isinstance(probe_ms, float) else "-",
            str(row.get("fingerprint") or "-"), str(detail),
        ))
    return text_table(table)


def text_table(table: list[tuple[str, ...]]) -> str:
    """Rows padded into columns; the last column is left ragged. A character that is not
    printable (a newline, a terminal escape: a model name or an upstream's text, as a
    client or a server sent it) is shown as its Python escape (`\\x1b`), so that a cell
    stays one cell on one line and the terminal is given nothing to run."""
    table = [tuple(map(_printable, row)) for row in table]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True))
                     + "  " + r[-1] for r in table)


def _printable(cell: str) -> str:
    if cell.isprintable():
        return cell
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in cell)


# The file `failover-proxy init` writes. `status` and `events` given neither an address nor
# a config read it from the current directory, so that after `init` and `serve --config
# failover-proxy.yaml` they find that proxy (on 8081, beside llama-server's 8080) and store.
STARTER_CONFIG = "failover-proxy.yaml"


def _config_here(given: str | None) -> str | None:
    """`given`, else ./failover-proxy.yaml when it exists, else None."""
    if given is not None:
        return given
    return STARTER_CONFIG if Path(STARTER_CONFIG).is_file() else None


def cmd_events(args: argparse.Namespace) -> int:
    from proxy import cli_events

    url = args.store
    if url is None:
        config = _config_here(args.config)
        url = _load(config).store.url if config else "sqlite:///./data/audit.db"
    return cli_events.run(args, url)


def cmd_status(args: argparse.Namespace) -> int:
    """The running proxy's own view (GET /admin/status) as a table; --watch redraws it."""
    import os

    from proxy import cli_status as status

    if not args.interval > 0:
        print("status: --interval must be a positive number of seconds", file=sys.stderr)
        return 2
    url, key = args.url, args.admin_key or os.environ.get("PROXY_ADMIN_KEY") or None
    config = args.config if url else _config_here(args.config)
    if config:
        server = _load(config).server
        host = "127.0.0.1" if server.host in ("0.0.0.0", "::", "") else server.host
        url = url or f"http://{'[' + host + ']' if ':' in host else host}:{server.port}"
        key = key or server.admin_key
    return status.run(url or "http://127.0.0.1:8080", key, args.watch, args.interval)


def cmd_init(args: argparse.Namespace) -> int:
    from proxy import starter

    return starter.run(args.out, args.host, args.force, args.ports)


def _ports(text: str) -> tuple[tuple[str, int], ...]:
    from proxy.starter import parse_ports

    try:
        return parse_ports(text)
    except ValueError as exc:  # argparse words a ValueError as "invalid value" only
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_simulate(args: argparse.Namespace) -> int:
    from proxy.sim import cli as simulator

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
    serve.add_argument("--workers", type=int, default=1,
                       help="processes sharing the port (SO_REUSEPORT); default 1")
    serve.add_argument("--insecure", action="store_true",
                       help="allow a non-loopback address with no client keys")
    serve.add_argument("--log-format", choices=("json", "console"),
                       help="log output (default: logging.format, json)")
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check", help="validate the config and probe every instance once")
    check.add_argument("--config", "-c", required=True, help="YAML or JSON config file")
    check.add_argument("--json", action="store_true", help="print JSON instead of a table")
    check.set_defaults(func=cmd_check)

    route = sub.add_parser("route", help="dry run: print the route plan for a request")
    route.add_argument("--config", "-c", required=True, help="YAML or JSON config file")
    route.add_argument("--request", "-r", help="a JSON chat completion request body")
    route.add_argument("-m", "--model", default="auto", help="model (default: auto)")
    route.add_argument("-p", "--prompt", help="the user message")
    route.add_argument("--max-tokens", type=int, help="max_tokens of the request")
    route.add_argument("--tags", help="as the x-route-tags header, e.g. coding,frontend")
    route.add_argument("--prefer", choices=("local", "cloud", "cheap", "fast"),
                       help="as the x-route-prefer header")
    route.add_argument("--session", help="a session key, as the x-session-id header")
    route.set_defaults(func=cmd_route)

    events = sub.add_parser("events", help="read the audit trail")
    from proxy import cli_events

    cli_events.add_arguments(events)
    events.set_defaults(func=cmd_events)

    status = sub.add_parser("status", help="the running proxy: instances, circuits, load, "
                                           "recent reroutes")
    status.add_argument("--url", help="the proxy (default: from --config, else from "
                                      f"./{STARTER_CONFIG} if there is one, else "
                                      "http://127.0.0.1:8080)")
    status.add_argument("--admin-key", help="server.admin_key (default: $PROXY_ADMIN_KEY, or "
                                            "the one in --config)")
    status.add_argument("--config", "-c", help="take the address and admin key from this config")
    status.add_argument("--watch", "-w", action="store_true", help="redraw until Ctrl-C")
    status.add_argument("--interval", type=float, default=2.0,
                        help="seconds between redraws with --watch (default 2)")
    status.set_defaults(func=cmd_status)

    from proxy.starter import DEFAULT_PORTS

    init = sub.add_parser("init", help="find local model servers and write a starter config")
    init.add_argument("--out", "-o", default=STARTER_CONFIG,
                      help=f"config file to write (default: {STARTER_CONFIG})")
    init.add_argument("--host", default="127.0.0.1",
                      help="where the model servers run (default: 127.0.0.1)")
    init.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    # KIND=PORT,...: other ports than the usual ones (the tests' simulators)
    init.add_argument("--ports", type=_ports, default=DEFAULT_PORTS, help=argparse.SUPPRESS)
    init.set_defaults(func=cmd_init)

    from proxy.sim import cli as simulator

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
