#!/usr/bin/env python3
"""CPU per request of the proxy against the bare aiohttp pass-through, in one run.

Wall-clock throughput on a shared machine is noise; the CPU time a server process uses per
request (user + system, from /proc) is not, or much less. The throughput ratio at
saturation is about the inverse of the CPU ratio when the proxy is the bottleneck, so this
is what to watch while making the proxy cheaper (`make bench` section 9 has the throughput).

Starts one simulator, the pass-through (scripts/bench_lib/passthrough.py), the full proxy
(audit store, metrics, the info request log to /dev/null) and the lean one (audit and the
request log off), all in front of that simulator; then rounds of wrk -c64 runs, the three
alternating, and prints the median CPU per request of each. `--stream` adds rounds of the
concurrent streaming client (CPU per content chunk).

    .venv/bin/python scripts/bench_cpu.py [--rounds 5] [--seconds 4] [--stream]
    .venv/bin/python scripts/bench_cpu.py --hold    # keeps them running (ports printed)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import CHAT, MODEL, STREAM_MODEL, chat_body, instance, proxy_config  # noqa: E402
from bench_lib.procs import LOCALHOST, Child, Supervisor, raise_nofile  # noqa: E402
from bench_lib.wrk import ensure_wrk, run_wrk, write_post_script  # noqa: E402

CLIENT = str(Path(__file__).resolve().parent / "bench_lib" / "client.py")


def _config(sim: Child, stream: Child, audit_db: Path | None, log_level: str) -> str:
    assert sim.port and stream.port
    return proxy_config(
        [instance("primary", sim.port, MODEL), instance("stream", stream.port, STREAM_MODEL)],
        {"main": ["bench:primary"], "stream": ["bench:stream"]},
        health={"interval_s": 5, "timeout_s": 1},
        timeouts={"connect_s": 1, "first_byte_s": 10, "idle_s": 10},
        audit_db=audit_db, log_level=log_level)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4, help="per measured wrk run")
    parser.add_argument("--conns", type=int, default=64)
    parser.add_argument("--stream", action="store_true", help="also CPU per streamed chunk")
    parser.add_argument("--only", default="pass,floor,full,lean",
                        help="which servers to measure (floor: bench_lib/floor.py)")
    parser.add_argument("--hold", action="store_true", help="start them, print ports, wait")
    parser.add_argument("--compare", metavar="DIR",
                        help="also measure full0 and lean0: the proxy of another source tree "
                             "(e.g. a `git archive` of an earlier commit), same run")
    args = parser.parse_args()
    raise_nofile()
    wrk = ensure_wrk()
    workdir = Path(tempfile.mkdtemp(prefix="failover-cpu-"))
    sup = Supervisor(workdir)
    try:
        sim, stream = sup.bench_simulators(MODEL, STREAM_MODEL)
        assert sim.port and stream.port
        servers = {
            "pass": sup.passthrough("pass", sim.port),
            "pass-stream": sup.passthrough("pass-stream", stream.port),
            "floor": sup.floor("floor", sim.port, MODEL),
            "full": sup.proxy("full", _config(sim, stream, workdir / "audit.db", "info"),
                              log=False),
            "lean": sup.proxy("lean", _config(sim, stream, None, "warning")),
        }
        if args.compare:
            for name, text in (("full0", _config(sim, stream, workdir / "audit0.db", "info")),
                               ("lean0", _config(sim, stream, None, "warning"))):
                cfg = workdir / f"{name}.json"
                cfg.write_text(text)
                servers[name] = sup.spawn(
                    name, [sys.executable, "-m", "proxy", "serve", "--config", str(cfg),
                           "--port", "0"], env=os.environ | {"PYTHONPATH": args.compare},
                    log=name != "full0")
        sup.wait_ready(list(servers.values()), "/readyz")
        if args.hold:
            print(json.dumps({k: v.port for k, v in servers.items()} | {"sim": sim.port}),
                  flush=True)
            print(json.dumps({k: v.pid for k, v in servers.items()}), flush=True)
            while True:
                time.sleep(3600)
        direct = write_post_script(workdir / "direct.lua",
                                   json.dumps(chat_body(MODEL)).encode())
        routed = write_post_script(workdir / "routed.lua",
                                   json.dumps(chat_body("main")).encode())
        names = args.only.split(",") + (["full0", "lean0"] if args.compare else [])
        per_req: dict[str, list[float]] = {n: [] for n in names}
        rps: dict[str, list[float]] = {n: [] for n in names}
        for name in names:  # warm-up
            run_wrk(sup, wrk, f"http://{LOCALHOST}:{servers[name].port}{CHAT}",
                    direct if name == "pass" else routed, args.conns, 1)
        for _ in range(args.rounds):
            for name in names:
                child = servers[name]
                cpu0 = child.cpu_seconds()
                res = run_wrk(sup, wrk, f"http://{LOCALHOST}:{child.port}{CHAT}",
                              direct if name == "pass" else routed, args.conns, args.seconds)
                cpu = child.cpu_seconds() - cpu0
                if res.error_count or not res.requests:
                    print(f"{name}: {res.problems()}", file=sys.stderr)
                    continue
                per_req[name].append(cpu / res.requests * 1e6)
                rps[name].append(res.rps)
        base = statistics.median(per_req["pass"]) if per_req.get("pass") else None
        for name in names:
            if not per_req[name]:
                continue
            med = statistics.median(per_req[name])
            ratio = f"  x{med / base:.2f} of pass" if base else ""
            spread = ", ".join(f"{v:.0f}" for v in per_req[name])
            print(f"{name:5s} CPU/request {med:6.1f} us{ratio}   "
                  f"(runs: {spread}; req/s median {statistics.median(rps[name]):.0f})")
        if args.stream:
            _stream_rounds(sup, servers, args.rounds)
    finally:
        sup.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _stream_rounds(sup: Supervisor, servers: dict[str, Child], rounds: int) -> None:
    import subprocess

    targets = [("pass-stream", STREAM_MODEL), ("lean", "stream")]
    if "lean0" in servers:
        targets.append(("lean0", "stream"))
    per_chunk: dict[str, list[float]] = {name: [] for name, _ in targets}
    for _ in range(rounds):
        for name, model in targets:
            child = servers[name]
            cpu0 = child.cpu_seconds()
            spec = {"url": f"http://{LOCALHOST}:{child.port}{CHAT}", "model": model,
                    "concurrency": 16, "duration": 3.0, "warmup": 0.5}
            out = subprocess.run([sys.executable, CLIENT, "rate", json.dumps(spec)],
                                 capture_output=True, check=True).stdout
            cpu = child.cpu_seconds() - cpu0
            result = json.loads(out.decode().strip().splitlines()[-1])
            # (the warm-up's chunks are not counted, its CPU is: a small overstatement
            # that is the same for both)
            chunks = result["chunks"]
            per_chunk[name].append(cpu / chunks * 1e6)
    base = statistics.median(per_chunk["pass-stream"])
    for name, values in per_chunk.items():
        med = statistics.median(values)
        print(f"{name:11s} CPU/chunk {med:5.1f} us  x{med / base:.2f}   "
              f"(runs: {', '.join(f'{v:.1f}' for v in values)})")


if __name__ == "__main__":
    sys.exit(main())
