"""A simulated server's plumbing: its listening socket (closed and reopened by the
`refuse` fault), the exact count of its connections, its `/_sim/*` control endpoints,
its faults and its counters. `proxy.sim.simulator` adds what a model server answers.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from aiohttp import web

from proxy.sim.faults import NO_FAULTS, Faults, parse_faults
from proxy.sim.responses import JSON_HEADERS, error

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class SimStats:
    """Counters of one simulator (control requests are not counted).

    ``open_connections`` and ``inflight`` are gauges (current values); the rest
    count since start or the last reset. ``completed_streams`` counts streams
    the simulator ended itself (including error_after/no_done/no_finish);
    ``aborted`` counts streams whose connection went away first (client
    disconnect, or :meth:`Simulator.stop`), not those cut by ``die_after``.
    """

    #: Model requests (chat, completions, embeddings); `by_path` counts every path.
    requests: int = 0
    #: Headers of the latest model request (to check what a proxy forwards).
    last_headers: dict[str, str] = field(default_factory=dict)
    #: The `model` of the latest model request.
    last_model: str | None = None
    #: The JSON body of the latest model request (to check what a proxy translated).
    last_body: dict[str, Any] | None = None
    by_path: dict[str, int] = field(default_factory=dict)
    open_connections: int = 0
    inflight: int = 0
    completed_streams: int = 0
    aborted: int = 0

    def reset(self) -> None:
        """Zero the counters, keeping the gauges."""
        self.requests = self.completed_streams = self.aborted = 0
        self.by_path.clear()


# --------------------------------------------------------------------------- server plumbing


class _TrackingServer(web.Server):
    """``web.Server`` that keeps the exact set of live TCP connections."""

    def __init__(self, handler: Handler, on_count: Callable[[int], None] | None = None) -> None:
        # handler_cancellation: a hung/stalled handler is cancelled as soon as
        # its client goes away, so nothing lingers. access_log=None: no per-request logging.
        super().__init__(handler, handler_cancellation=True, access_log=None)
        self.live: dict[web.RequestHandler, asyncio.Transport] = {}
        self._on_count = on_count

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.live[handler] = transport
        if self._on_count is not None:
            self._on_count(len(self.live))

    def connection_lost(self, handler: web.RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        if self.live.pop(handler, None) is not None and self._on_count is not None:
            self._on_count(len(self.live))

    def abort_all(self, keep: asyncio.BaseTransport | None = None) -> None:
        """Reset every connection (RST, like a killed process), except ``keep``."""
        for transport in list(self.live.values()):
            if transport is not keep:
                transport.abort()


def _bind(host: str, port: int) -> socket.socket:
    """Return a bound, listening, non-blocking socket."""
    family, type_, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, type_, proto)
    try:
        # SO_REUSEADDR: a restart must get the same port even with TIME_WAIT leftovers.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(512)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


async def forever() -> None:
    """Park the handler until it is cancelled (client gone, or stop())."""
    await asyncio.get_running_loop().create_future()


class SimServer:
    """A simulated server on a real TCP port, with injectable faults; subclasses fill
    `routes` (path -> (method, handler)) with what they answer."""

    def __init__(self, model: str, *, host: str = "127.0.0.1", port: int = 0,
                 faults: Sequence[str] = (), control_port: int | None = None) -> None:
        """Configure (but do not start) a server for ``model``; ValueError for bad faults."""
        self.model = model
        self.host = host
        self.stats = SimStats()
        self._port = port
        self._control_port = control_port
        self._faults = parse_faults(faults)
        self._times_left = self._faults.times
        self._running = False
        self._main: _TrackingServer | None = None
        self._control: _TrackingServer | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._control_listener: asyncio.AbstractServer | None = None
        self._listen_sock: socket.socket | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self.routes: dict[str, tuple[str, Handler]] = {}

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The main port (the requested one until the first start with port=0)."""
        return self._port

    @property
    def control_port(self) -> int | None:
        """The always-on control port, if one was requested."""
        return self._control_port

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` of the main port, without ``/v1``."""
        return f"http://{_url_host(self.host)}:{self._port}"

    @property
    def faults(self) -> tuple[str, ...]:
        """The active faults, normalised (``times`` shows what is left)."""
        return self._spec()

    @property
    def running(self) -> bool:
        """True between start() and stop()."""
        return self._running

    async def start(self) -> None:
        """Start serving; binds the main port unless 'refuse' is active.

        With port=0 a free port is picked once and kept for later restarts.
        """
        if self._running:
            return
        self._main = _TrackingServer(self._handle_main, self._count_connections)
        if self._control_port is not None:
            self._control = _TrackingServer(self._handle_control_port)
            sock = _bind(self.host, self._control_port)
            self._control_port = sock.getsockname()[1]
            self._control_listener = await asyncio.get_running_loop().create_server(
                self._control, sock=sock
            )
        self._running = True
        try:
            if self._faults.refuse:
                if self._port == 0:  # pick the number now so base_url is usable
                    self._port = self._reserve_port()
            else:
                self._open_listener()
                assert self._listen_task is not None
                await self._listen_task
        except BaseException:
            await self.stop()
            raise

    def _reserve_port(self) -> int:
        sock = _bind(self.host, 0)
        try:
            port: int = sock.getsockname()[1]
        finally:
            sock.close()
        return port

    async def stop(self) -> None:
        """Close the listeners and abort every open connection at once."""
        if not self._running:
            return
        self._running = False
        self._close_listener()
        if self._control_listener is not None:
            self._control_listener.close()
            self._control_listener = None
        servers = [s for s in (self._main, self._control) if s is not None]
        for server in servers:
            server.abort_all()
        task, self._listen_task = self._listen_task, None
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        # abort() reports connection_lost via call_soon; let that (and the
        # handler cancellations it triggers) run before tidying up.
        await asyncio.sleep(0)
        for server in servers:
            await server.shutdown(1.0)
        self._main = self._control = None
        # All connections were aborted; handlers decrement ``inflight`` themselves.
        self.stats.open_connections = 0

    def _open_listener(self) -> None:
        # Bind and listen synchronously: from here on connections queue in the
        # kernel instead of being refused, even before the asyncio server runs.
        sock = _bind(self.host, self._port)
        self._port = sock.getsockname()[1]
        self._listen_sock = sock
        self._listen_task = asyncio.get_running_loop().create_task(self._serve(sock))

    async def _serve(self, sock: socket.socket) -> None:
        assert self._main is not None
        server = await asyncio.get_running_loop().create_server(self._main, sock=sock)
        if self._listen_sock is sock:
            self._listener = server
        else:  # refuse was applied (or stop() called) while we were starting
            server.close()

    def _close_listener(self) -> None:
        # asyncio.Server.close() stops listening right away: new connections are refused.
        self._listen_sock = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _count_connections(self, n: int) -> None:
        self.stats.open_connections = n

    # ------------------------------------------------------------------ faults

    def set_faults(self, faults: Sequence[str]) -> None:
        """Replace the active faults (ValueError if invalid; nothing changes then).

        Applying 'refuse' closes the listener and aborts open connections;
        clearing it reopens the listener on the same port.
        """
        self._apply(parse_faults(faults))

    def _apply(self, faults: Faults, keep: asyncio.BaseTransport | None = None) -> None:
        self._faults = faults
        self._times_left = faults.times
        if not self._running:
            return
        listening = self._listen_sock is not None
        if faults.refuse and listening:
            self._close_listener()
            assert self._main is not None
            self._main.abort_all(keep)
        elif not faults.refuse and not listening:
            self._open_listener()

    def _spec(self) -> tuple[str, ...]:
        f = self._faults
        if f.times is None:
            return f.spec
        return tuple(f"times={self._times_left}" if s.startswith("times=") else s for s in f.spec)

    def _take_faults(self) -> Faults:
        """The fault set for one model request, counting down ``times``."""
        faults = self._faults
        if faults.times is not None and self._times_left is not None:
            self._times_left -= 1
            if self._times_left <= 0:
                self._apply(NO_FAULTS)
        return faults

    # ------------------------------------------------------------------ dispatch

    async def _handle_main(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path.startswith("/_sim/"):
            return await self._handle_control(request, on_main=True)
        stats = self.stats
        stats.by_path[path] = stats.by_path.get(path, 0) + 1
        route = self.routes.get(path)
        if route is None:
            return error(404, f"Unknown request URL: {request.method} {path}", "invalid_request_error",
                          code="unknown_url")
        method, handler = route
        if request.method != method:
            return error(405, f"Method {request.method} not allowed for {path}", "invalid_request_error",
                          headers={"Allow": method})
        return await handler(request)

    async def _handle_control_port(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._handle_control(request, on_main=False)

    async def _handle_control(self, request: web.BaseRequest, *, on_main: bool) -> web.StreamResponse:
        path, method = request.path, request.method
        if path == "/_sim/state" and method == "GET":
            return self._state_response()
        if path == "/_sim/reset_stats" and method == "POST":
            self.stats.reset()
            return self._state_response()
        if path == "/_sim/faults" and method == "POST":
            try:
                data = orjson.loads(await request.read())
            except orjson.JSONDecodeError as exc:
                return error(400, f"invalid JSON body: {exc}", "invalid_request_error")
            specs = data.get("faults") if isinstance(data, dict) else None
            if not isinstance(specs, list):
                return error(400, 'body must be {"faults": ["name", "name=value", ...]}',
                              "invalid_request_error", param="faults")
            try:
                faults = parse_faults(specs)
            except (ValueError, TypeError) as exc:
                return error(400, str(exc), "invalid_request_error", param="faults")
            # Keep the connection carrying this request alive long enough to
            # answer it, then close it (the backend is going down).
            self._apply(faults, keep=request.transport if on_main else None)
            resp = self._state_response()
            if on_main and faults.refuse:
                resp.force_close()
            return resp
        if path in ("/_sim/state", "/_sim/reset_stats", "/_sim/faults"):
            return error(405, f"Method {method} not allowed for {path}", "invalid_request_error")
        return error(404, f"Unknown control URL: {method} {path}", "invalid_request_error")

    def _state_response(self) -> web.Response:
        state = {
            "model": self.model,
            "port": self._port,
            "listening": self._listen_sock is not None,
            "faults": list(self._spec()),
            "stats": asdict(self.stats),
        }
        return web.Response(body=orjson.dumps(state), headers=JSON_HEADERS)
