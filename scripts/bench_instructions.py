#!/usr/bin/env python3
"""Instructions per request of the proxy, the least routing proxy and the bare aiohttp
pass-through, counted by valgrind (callgrind): the figure other load on the machine
hardly moves.

CPU time per request (scripts/bench_cpu.py) and requests/s (`make bench` section 9) move
by 10-30% from run to run on a shared machine; an instruction count by a few percent (how
many requests a turn of the event loop handles together still varies). Each server runs
under `valgrind --tool=callgrind` twice, serving `--base` requests
and then `--base + --requests` (after the same warm-up), and the difference of the two
totals over `--requests` is its cost per request, start-up and shutdown cancelled out.
The requests are the bench's chat request over 8 keep-alive connections. Servers: `pass`
(bench_lib/passthrough.py), `floor` (bench_lib/floor.py), `floor-errors` (the same with
the proxy's error middleware), `lean` (audit and request log
off) and `full` (audit store, metrics, the info request log to /dev/null); with
`--compare DIR`, `lean0` and `full0` are the proxy of another source tree (e.g. a `git
archive` of an earlier commit). Instructions are not time (a system call or a cache miss
is one instruction), so the ratios are close to, not equal to, the CPU ratios.

    .venv/bin/python scripts/bench_instructions.py [--requests 400] [--compare DIR]

valgrind is installed with apt-get when it is missing (`make bench-instructions` does it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import CHAT, MODEL, STREAM_MODEL, instance, proxy_config  # noqa: E402
from bench_lib.procs import LOCALHOST, Child, Supervisor  # noqa: E402
from bench_lib.wrk import ensure_tool  # noqa: E402

_COLLECTED = re.compile(rb"Collected : (\d+)")


async def send(url: str, model: str, count: int, connections: int = 8) -> None:
    """`count` chat requests over `connections` keep-alive connections; raises unless
    every one is answered 200."""
    body = json.dumps({"model": model, "max_tokens": 16, "messages": [
        {"role": "user", "content": "Say something about failover proxies please."}]}).encode()
    left = iter(range(count))
    async with aiohttp.ClientSession() as session:
        async def one_connection() -> None:
            for _ in left:
                async with session.post(url, data=body,
                                        headers={"Content-Type": "application/json"}) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"{url}: HTTP {resp.status}")
        await asyncio.gather(*(one_connection() for _ in range(connections)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="measured requests")
    parser.add_argument("--base", type=int, default=100, help="requests of the shorter run")
    parser.add_argument("--only", default="pass,floor,floor-errors,lean,full",
                        help="which servers")
    parser.add_argument("--compare", metavar="DIR",
                        help="also lean0 and full0: the proxy of another source tree")
    args = parser.parse_args()
    valgrind = ensure_tool("valgrind")
    workdir = Path(tempfile.mkdtemp(prefix="failover-instr-"))
    sup = Supervisor(workdir)
    try:
        sim, stream = sup.bench_simulators(MODEL, STREAM_MODEL)
        assert sim.port and stream.port

        def config(audit: bool) -> str:
            assert sim.port and stream.port
            return proxy_config(
                [instance("primary", sim.port, MODEL),
                 instance("stream", stream.port, STREAM_MODEL)],
                {"main": ["bench:primary"], "stream": ["bench:stream"]},
                health={"interval_s": 5, "timeout_s": 5},
                timeouts={"connect_s": 5, "first_byte_s": 60, "idle_s": 60},
                audit_db=workdir / "audit.db" if audit else None,
                log_level="info" if audit else "warning")

        def start(name: str, run: int) -> tuple[Child, str]:
            """The server `name` under callgrind (its summary to NAME-RUN.vg); the model
            its clients ask for."""
            assert sim.port
            wrap = [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null",
                    f"--log-file={workdir / f'{name}-{run}.vg'}"]
            label = f"{name}-{run}"
            if name == "pass":
                return sup.passthrough(label, sim.port, wrap=wrap), MODEL
            if name.startswith("floor"):
                return sup.floor(label, sim.port, MODEL, wrap=wrap,
                                 errors=name == "floor-errors"), "main"
            env = os.environ | {"PYTHONHASHSEED": "0"}
            if name.endswith("0"):
                env["PYTHONPATH"] = str(Path(args.compare).resolve())
            return sup.proxy(label, config(name.startswith("full")), log=False, wrap=wrap,
                             env=env), "main"

        def total(name: str, run: int, count: int) -> int:
            (workdir / "audit.db").unlink(missing_ok=True)
            child, model = start(name, run)
            sup.wait_ready([child], "/readyz", timeout=300.0)
            url = f"http://{LOCALHOST}:{child.port}{CHAT}"
            asyncio.run(send(url, model, 30))  # warm-up
            asyncio.run(send(url, model, count))
            sup.stop([child], grace=120.0)
            found = _COLLECTED.search((workdir / f"{name}-{run}.vg").read_bytes())
            if found is None:
                raise RuntimeError(f"{name}: no instruction count in valgrind's summary")
            return int(found.group(1))

        names = args.only.split(",") + (["lean0", "full0"] if args.compare else [])
        per_request: dict[str, float] = {}
        for name in names:
            short = total(name, 1, args.base)
            long = total(name, 2, args.base + args.requests)
            per_request[name] = (long - short) / args.requests
            print(f"{name:12s} {per_request[name] / 1000:7.1f}k instructions/request", flush=True)
        base = per_request.get("pass")
        if base:
            print("ratios to the pass-through: " + ", ".join(
                f"{name} x{value / base:.3f}" for name, value in per_request.items()))
    finally:
        sup.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
