#!/usr/bin/env python3
"""The least a routing proxy does beyond the bare pass-through (passthrough.py), as a
yardstick for what the real proxy's own work can cost.

Per request, on top of the pass-through: the JSON body parsed and its `model` looked up
to pick an upstream and the model name it serves there (the body re-serialised with that
name), the four `x-route-*`/`x-request-id` headers with ids from a counter, one Prometheus
counter and one histogram. No failover, no timeouts, no error shapes, no plan, no
audit, no log: a proxy that did less would not be a routing proxy. With `--errors`, the
proxy's own OpenAI-shaped error middleware (proxy.api.middleware.openai_errors), which
issue 15 asks for, is added. `make bench` section 9 and scripts/bench_instructions.py
measure it beside the pass-through and the proxy.

    python scripts/bench_lib/floor.py --port P --upstream http://127.0.0.1:Q --model NAME [--errors]
    (clients ask for model `main`; NAME is the upstream's model)
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import orjson
from aiohttp import web
from passthrough import SESSION, serve
from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry()
REQUESTS = Counter("requests", "Requests", ["model", "instance", "outcome"], registry=REGISTRY)
DURATION = Histogram("request_duration_seconds", "Duration", registry=REGISTRY)
_PREFIX = os.urandom(8).hex()
_COUNT = itertools.count(1)


def new_id() -> str:
    return f"{_PREFIX}{next(_COUNT):08x}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="scheme://host:port of the backend")
    parser.add_argument("--model", required=True, help="the model the backend serves")
    parser.add_argument("--errors", action="store_true", help="with the proxy's error middleware")
    args = parser.parse_args()
    routes = {"main": ("bench:primary", args.upstream.rstrip("/"), args.model)}

    async def relay(request: web.Request) -> web.Response:
        started = time.perf_counter()
        body = orjson.loads(await request.read())
        instance, base, model = routes[body["model"]]
        body["model"] = model
        async with request.app[SESSION].post(
                base + request.path, data=orjson.dumps(body),
                headers={"Content-Type": "application/json"}) as upstream:
            data = await upstream.read()
        REQUESTS.labels(model, instance, "ok").inc()
        DURATION.observe(time.perf_counter() - started)
        return web.Response(status=upstream.status, body=data, headers={
            "x-request-id": new_id(), "x-route-plan-id": new_id(),
            "x-route-instance": instance, "x-route-attempts": "1",
            "Content-Type": upstream.headers.get("Content-Type", "application/json")})

    if args.errors:
        from proxy.api.middleware import openai_errors
        app = web.Application(middlewares=[openai_errors])
    else:
        app = web.Application()
    serve(app, relay, args.port)

if __name__ == "__main__":
    main()
