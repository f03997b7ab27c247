#!/usr/bin/env python3
"""Planning cost per request: requirements + filters + scores + plan, for N instances."""

from __future__ import annotations

import argparse
import time

import orjson

from proxy.api.inbound import CHAT, parse_request
from proxy.config import parse_config
from proxy.health.registry import Registry
from proxy.health.states import READY
from proxy.routing.planner import Planner


def measure(instances: int = 10, rounds: int = 20000) -> float:
    """Microseconds per plan (best of 5 runs of `rounds` plans)."""
    config = parse_config({"providers": [{"provider_id": "p", "instances": [
        {"id": f"i{n}", "base_url": f"http://127.0.0.1:{20000 + n}",
         "metadata": {"model": f"m{n % 3}", "tags": ["coding"] if n % 2 else ["general"],
                      "ctx": 8192 * (1 + n % 4), "capabilities": ["tools", "json"]}}
        for n in range(instances)]}]})
    registry = Registry(config.instances)
    for n, state in enumerate(registry.states):
        state.state = READY
        state.ttfb_ewma_ms = 20.0 + n
    planner = Planner(config, registry)
    body = orjson.dumps({"model": "auto", "max_tokens": 256, "user": "bench", "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "fix this python bug: the loop never ends " * 5}]})
    req = parse_request(CHAT, body, "r")
    headers: dict[str, str] = {}
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(rounds):
            planner.plan(req, headers)
        best = min(best, (time.perf_counter() - t0) / rounds * 1e6)
    return best


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20000)
    args = parser.parse_args()
    print(f"planning cost, {args.instances} instances: "
          f"{measure(args.instances, args.rounds):.1f} us per request")
