#!/usr/bin/env python3
"""Planning cost per request: requirements + filters + scores + plan, for N instances.

    .venv/bin/python scripts/bench_planner.py            # one plan, 10 instances
    .venv/bin/python scripts/bench_planner.py --cases    # parse, plan and served per case

`--cases` prints, for the request `scripts/bench_cpu.py` sends (one user message to a
group of one instance) and for 10 instances with histories of 2, 20 and 100 messages,
affinity off and on, what `parse_request`, `Planner.plan` and `Planner.served` cost each.
Run it with `PYTHONPATH=<another tree>` to measure that tree's proxy package (before and
after a change, in the same minute). Times are CPU time of this thread (time.thread_time):
on a shared machine, wall-clock time counts the turns other processes take.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import orjson

from proxy.api.inbound import CHAT, parse_request
from proxy.config import parse_config
from proxy.health.registry import Registry
from proxy.health.states import READY
from proxy.routing.planner import Planner, RoutePlan

#: scripts/bench.py's PROMPT, the one message of the request bench_cpu.py sends.
BENCH_PROMPT = "Say hello to the benchmark."


def _best(call: Callable[[], Any], runs: int, repeats: int) -> float:
    """Microseconds per call: the best of `repeats` runs of `runs` calls (CPU time)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        for _ in range(runs):
            call()
        best = min(best, (time.thread_time() - t0) / runs * 1e6)
    return best


def _setup(instances: int, history: int, affinity: bool) -> tuple[Planner, bytes]:
    """A planner over `instances` ready instances and the body of a chat request of
    `history` messages (two at least) whose prefix (all but its last two messages) one
    instance served before."""
    config = parse_config({"routing": {"affinity": {"enabled": affinity}},
                           "providers": [{"provider_id": "p", "instances": [
        {"id": f"i{n}", "base_url": f"http://127.0.0.1:{20000 + n}",
         "metadata": {"model": f"m{n % 3}", "tags": ["coding"] if n % 2 else ["general"],
                      "ctx": 8192 * (1 + n % 4), "capabilities": ["tools", "json"]}}
        for n in range(instances)]}]})
    registry = Registry(config.instances)
    for n, state in enumerate(registry.states):
        state.state = READY
        state.ttfb_ewma_ms = 20.0 + n
    planner = Planner(config, registry)
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "fix this python bug: the loop never ends " * 5}]
    for n in range(history - len(messages)):
        messages.append({"role": "assistant" if n % 2 == 0 else "user",
                         "content": f"turn {n}: the loop ends when the counter wraps " * 4})
    body = orjson.dumps({"model": "auto", "max_tokens": 256, "user": "bench",
                         "messages": messages})
    if len(messages) > 2:  # (two: nothing before it)
        before = parse_request(CHAT, orjson.dumps({"model": "auto",
                                                   "messages": messages[:-2]}), "r0")
        planner.served(planner.plan(before, {}), registry.states[5].id)
    return planner, body


def _bench_setup() -> tuple[Planner, bytes]:
    """The proxy scripts/bench_cpu.py measures (a group `main` of one instance, ordered;
    another instance beside it) and the body it sends."""
    config = parse_config({"store": {"enabled": False}, "models": {
        "main": {"instances": ["bench:primary"], "strategy": "ordered"},
        "stream": {"instances": ["bench:stream"], "strategy": "ordered"}},
        "providers": [{"provider_id": "bench", "instances": [
            {"id": name, "base_url": f"http://127.0.0.1:{port}/v1",
             "metadata": {"model": name, "tags": ["general"], "ctx": 8192}}
            for name, port in (("primary", 20001), ("stream", 20002))]}]})
    registry = Registry(config.instances)
    for state in registry.states:
        state.state = READY
    body = orjson.dumps({"model": "main", "stream": False,
                         "messages": [{"role": "user", "content": BENCH_PROMPT}]})
    return Planner(config, registry), body


def measure(instances: int = 10, rounds: int = 20000, history: int = 0,
            affinity: bool = True, repeats: int = 15) -> float:
    """Microseconds per plan: the best of `repeats` runs of `rounds // 5` plans (on a
    shared, noisy machine the minimum is the figure that repeats). With `history`, the
    request is a conversation of that many messages whose prefix (all but its last two
    messages) an instance served before: a prefix-cache affinity hit (routing.affinity is
    on by default; `affinity=False` turns it off)."""
    planner, body = _setup(instances, history, affinity)
    req = parse_request(CHAT, body, "r")
    headers: dict[str, str] = {}
    return _best(lambda: planner.plan(req, headers), max(1, rounds // 5), repeats)


def measure_request(planner: Planner, body: bytes, rounds: int = 20000,
                    repeats: int = 15) -> dict[str, float]:
    """Microseconds per request of `parse_request`, `Planner.plan` and `Planner.served`
    (each plan served once, by its selected instance, as after an answer)."""
    runs = max(1, rounds // 5)
    req = parse_request(CHAT, body, "r")
    headers: dict[str, str] = {}
    parse = _best(lambda: parse_request(CHAT, body, "r"), runs, repeats)
    plan = _best(lambda: planner.plan(req, headers), runs, repeats)
    served = float("inf")
    for _ in range(repeats):
        plans = [planner.plan(req, headers) for _ in range(runs)]
        served = min(served, _served(planner, plans))
    return {"parse": parse, "plan": plan, "served": served,
            "total": parse + plan + served}


def _served(planner: Planner, plans: list[RoutePlan]) -> float:
    t0 = time.thread_time()
    for plan in plans:
        planner.served(plan, plan.selected)
    return (time.thread_time() - t0) / len(plans) * 1e6


def cases(rounds: int, repeats: int) -> list[tuple[str, dict[str, float]]]:
    """(name, measure_request's figures) of every case `--cases` prints."""
    rows = [("bench_cpu request", measure_request(*_bench_setup(), rounds, repeats))]
    for history in (2, 20, 100):
        for affinity in (False, True):
            name = f"10 inst, {history:3} msgs, affinity {'on ' if affinity else 'off'}"
            rows.append((name, measure_request(*_setup(10, history, affinity), rounds,
                                               repeats)))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--history", type=int, default=0,
                        help="messages of a conversation whose prefix is cached (0: two)")
    parser.add_argument("--cases", action="store_true",
                        help="parse, plan and served per request, for every case")
    args = parser.parse_args()
    if args.cases:
        print(f"{'us per request':34} {'parse':>7} {'plan':>7} {'served':>7} {'total':>7}")
        for name, us in cases(args.rounds, args.repeats):
            print(f"{name:34} " + " ".join(f"{us[k]:7.2f}"
                                           for k in ("parse", "plan", "served", "total")))
    else:
        print(f"planning cost, {args.instances} instances: "
              f"{measure(args.instances, args.rounds, args.history):.1f} us per request")
