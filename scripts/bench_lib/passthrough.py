#!/usr/bin/env python3
"""A bare aiohttp reverse proxy: the baseline `make bench` holds the proxy against.

One `ClientSession`, uvloop, no routing, no failover, no audit, no metrics, no logs: every
POST is sent to one upstream and its answer (whole or streamed) relayed as it arrives.
Whatever the real proxy costs above this is the price of its own work.

    python scripts/bench_lib/passthrough.py --port P --upstream http://127.0.0.1:Q
"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
import uvloop
from aiohttp import web

SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session")
UPSTREAM: web.AppKey[str] = web.AppKey("upstream")


async def relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    async with request.app[SESSION].post(
            request.app[UPSTREAM] + request.path, data=body,
            headers={"Content-Type": "application/json"}) as upstream:
        content_type = upstream.headers.get("Content-Type", "application/json")
        if not content_type.startswith("text/event-stream"):
            return web.Response(status=upstream.status, body=await upstream.read(),
                                headers={"Content-Type": content_type})
        resp = web.StreamResponse(status=upstream.status, headers={"Content-Type": content_type})
        await resp.prepare(request)
        async for data in upstream.content.iter_any():
            await resp.write(data)
        await resp.write_eof()
        return resp


async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await app[SESSION].close()


async def ready(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def serve(app: web.Application, handler: Any, port: int) -> None:
    """Serve `handler` for every POST (and GET /readyz) on 127.0.0.1:port with one
    ClientSession (`app[SESSION]`), uvloop and no access log, until SIGINT or SIGTERM."""
    app.cleanup_ctx.append(session_ctx)
    app.router.add_get("/readyz", ready)
    app.router.add_post("/{tail:.*}", handler)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None,
                loop=uvloop.new_event_loop())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="scheme://host:port of the backend")
    args = parser.parse_args()
    app = web.Application()
    app[UPSTREAM] = args.upstream.rstrip("/")
    serve(app, relay, args.port)


if __name__ == "__main__":
    main()
