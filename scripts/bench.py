#!/usr/bin/env python3
"""`make bench`: what the proxy costs, measured against the same simulated backends direct.

Starts simulators and proxies as subprocesses on free loopback ports, drives them from
separate load-generator processes (wrk for throughput, scripts/bench_lib/client.py for
streaming and sequential latency), prints one table and optionally writes it as JSON.
Every figure is measured in this run; nothing talks to anything but 127.0.0.1.

    .venv/bin/python scripts/bench.py [--quick] [--json FILE] [--only baseline,...]
    BENCH_PEERS=litellm .venv/bin/python scripts/bench.py     # also measure LiteLLM

Sections: 1 non-streaming throughput/latency, 2 streaming TTFT and chunk rate, 3 failover
added latency, 4 one of two instances dead, 5 proxy memory, 6 planning cost, 7 audit store,
8 peers, 9 the proxy against a bare aiohttp pass-through (and --workers 2 against 1), 10
prefix-cache affinity and load on three real llama-servers (scripts/bench_lib/affinity.py), 11
replicas sharing state on Redis (scripts/bench_lib/shared.py).
Rows for features the proxy lacks print as n/a (see FAILOVER_CASES).

    .venv/bin/python scripts/bench.py --only affinity      # one section (or a few: a,b)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import select
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench_lib import affinity, peers
from bench_lib import shared as shared_state
from bench_lib.procs import (
    LOCALHOST,
    ROOT,
    Child,
    PortHolder,
    StartError,
    Supervisor,
    free_port,
    http_get,
    machine_busy_seconds,
    raise_nofile,
)
from bench_lib.table import DELTA, RATIO, Row, not_available, render
from bench_lib.wrk import WrkResult, ensure_wrk, run_wrk, write_post_script, wrk_version

CLIENT = str(Path(__file__).resolve().parent / "bench_lib" / "client.py")
CHAT = "/v1/chat/completions"
MODEL = "bench-model"
STREAM_MODEL = "bench-stream"
SLOW_MODEL = "bench-slow"
TWIN_MODEL = "bench-twin"
PROMPT = "Say hello to the benchmark."
MIB = 1024.0

SECTIONS = {
    "nonstream": "1. non-streaming chat, wrk -t1 (direct = simulator; proxied = proxy -> same simulator)",
    "stream": "2. streaming, asyncio client process (simulator --words 50, no chunk delay)",
    "failover": "3. failover added latency, sequential (direct column = proxied healthy request;"
                " mid-stream: the fallback's own time to first token)",
    "dead": "4. one of two instances dead, wrk -t1 -c64 (direct column = both healthy)",
    "memory": "5. proxy memory (VmRSS from /proc; simulator --words 1000 --chunk-delay 0.5)",
    "planning": "6. route planning (scripts/bench_planner.py)",
    "audit": "7. audit store, wrk -t1 -c64 as in 1 (direct column = audit off, proxied = on; "
             "info logging to /dev/null)",
    "peers": "8. peers, same wrk load (direct = the same simulator, this run)",
    "baseline": "9. against a bare aiohttp pass-through (scripts/bench_lib/passthrough.py: one "
                "ClientSession, uvloop, no routing), wrk -t1, same simulators (direct column = "
                "pass-through)",
    affinity.SECTION: affinity.TITLE,
    shared_state.SECTION: shared_state.TITLE,
}


@dataclass(frozen=True)
class Settings:
    wrk_s: int  # seconds per measured wrk run
    warm_s: int  # seconds of wrk warm-up before each measured run
    ttft_n: int  # sequential streaming requests for TTFT
    rate_s: float  # seconds of the concurrent streaming run
    rate_conc: int
    fail_n: int  # requests per failover case
    hang_n: int  # requests for the hung-backend case (each costs first_byte_s)
    streams: int  # concurrent open streams for the memory figure
    planner_rounds: int
    mid_n: int  # sequential mid-stream continuations
    audit_pairs: int  # alternating (audit on, audit off) wrk runs


FULL = Settings(wrk_s=10, warm_s=1, ttft_n=200, rate_s=5.0, rate_conc=16, fail_n=200,
                hang_n=20, streams=1000, planner_rounds=20000, mid_n=50, audit_pairs=3)
# Quick stays under a minute with sections 3 and 7 included: fewer streams held open for
# the memory figure, fewer sequential requests; every figure is still measured.
QUICK = Settings(wrk_s=2, warm_s=1, ttft_n=40, rate_s=2.0, rate_conc=16, fail_n=30,
                 hang_n=3, streams=200, planner_rounds=2000, mid_n=20, audit_pairs=1)

#: Mid-stream case: the first twin cuts every answer after MID_CUT of MID_WORDS words.
MID_WORDS = 60
MID_CUT = 20

HANG_FIRST_BYTE_S = 0.5
MEMORY_CHUNK_DELAY_S = 0.5


@dataclass(frozen=True)
class FailoverCase:
    """One failover row: a proxy model group whose first member fails in some way.

    `reset` is an instance re-enabled through the admin API before every request (that
    resets its circuit, so each request discovers the failure afresh). A case with
    `unavailable` set prints as n/a; to add it, give it a `group` and drop `unavailable`.
    """

    key: str
    metric: str
    group: str | None
    reset: str | None = None
    limit: str = "fail_n"  # which Settings field bounds its request count
    stream: bool = False  # measure a whole streamed answer instead of a JSON one
    unavailable: str = ""
    expect: str = ""


FAILOVER_CASES = (
    FailoverCase("refused_first", "connection refused, first discovery", "refused",
                 reset="bench:dead", expect="~1 connect attempt"),
    FailoverCase("known_dead", "instance already known dead (circuit open)", "refused",
                 expect="~0"),
    FailoverCase("status_503", "HTTP 503 (one same-instance retry, then next)", "s503",
                 reset="bench:p503"),
    FailoverCase("hang", f"hung backend, first_byte_s={HANG_FIRST_BYTE_S:g}", "hang",
                 reset="bench:phang", limit="hang_n", expect=f"~{HANG_FIRST_BYTE_S * 1000:.0f} ms"),
    # Measured by bench_midstream (a streaming client and a proxy of its own).
    FailoverCase("midstream", "mid-stream continuation", "midstream", reset="bench:cut",
                 limit="mid_n", stream=True),
)


def _on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pct(values: list[float], p: float) -> float | None:
    """The p-th percentile (nearest rank) of `values`, or None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100.0 * len(ordered) + 0.5) - 1))
    return ordered[k]


def ms(x: float | None) -> float | None:
    return None if x is None else x * 1000.0


def post_json(url: str, doc: dict[str, Any], timeout: float = 10.0,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return resp.status, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


def chat_body(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": PROMPT}]}


# --------------------------------------------------------------------------- configs


def instance(inst_id: str, port: int, model: str,
             capabilities: tuple[str, ...] = ()) -> dict[str, Any]:
    meta: dict[str, Any] = {"model": model, "tags": ["general"], "ctx": 8192}
    if capabilities:
        meta["capabilities"] = list(capabilities)
    return {"id": inst_id, "base_url": f"http://{LOCALHOST}:{port}/v1", "metadata": meta}


def proxy_config(instances: list[dict[str, Any]], groups: dict[str, list[str]],
                 health: dict[str, Any], timeouts: dict[str, Any], audit_db: Path | None,
                 log_level: str = "warning") -> str:
    """A proxy config; `audit_db=None` turns the audit store off."""
    return json.dumps({
        "server": {"host": LOCALHOST},
        # The proxy's default audit store, in the work folder instead of ./data.
        "store": {"url": f"sqlite:///{audit_db}"} if audit_db is not None else {"enabled": False},
        # Per-request log lines are at info level: keep them off during load (except in
        # section 7, which compares production settings, info, with the logs to /dev/null).
        "logging": {"format": "json", "level": log_level},
        "health": health,
        "timeouts": timeouts,
        "models": {name: {"instances": members, "strategy": "ordered"}
                   for name, members in groups.items()},
        "providers": [{"provider_id": "bench", "instances": instances}],
    }, indent=2)


def children_cpu_s(pid: int) -> float:
    """User + system CPU used so far by the live child processes of `pid` (the proxy's
    audit writer), from /proc."""
    total = 0.0
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            kids = [int(k) for k in fh.read().split()]
    except OSError:
        return 0.0
    for kid in kids:
        try:
            with open(f"/proc/{kid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


# --------------------------------------------------------------------------- the run


class Bench:
    def __init__(self, settings: Settings, mode: str, workdir: Path,
                 only: frozenset[str] | None = None) -> None:
        self.s = settings
        #: The sections to measure (keys of SECTIONS); None: all of them.
        self.only = only
        self.mode = mode
        self.workdir = workdir
        self.sup = Supervisor(workdir)
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.raw: dict[str, Any] = {}
        self.durations: dict[str, float] = {}
        self.foreign: dict[str, float] = {}  # % of the machine used by others, per section
        self.keep_logs = False
        self.wrk = ""
        self.facts: dict[str, Any] = {}

    # ------------------------------------------------------------------ helpers

    def wants(self, section: str) -> bool:
        return self.only is None or section in self.only

    def log(self, msg: str) -> None:
        print(f"bench: {msg}", file=sys.stderr, flush=True)

    def note(self, msg: str) -> None:
        if msg not in self.notes:
            self.notes.append(msg)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Time a section, and how much of the machine other processes used meanwhile."""
        t0 = time.monotonic()
        busy0, ours0 = machine_busy_seconds(), self.sup.cpu_seconds()
        try:
            yield
        finally:
            elapsed = time.monotonic() - t0
            foreign = (machine_busy_seconds() - busy0) - (self.sup.cpu_seconds() - ours0)
            share = max(0.0, foreign) / (elapsed * (os.cpu_count() or 1)) if elapsed > 0 else 0.0
            self.durations[name] = round(elapsed, 1)
            self.foreign[name] = round(share * 100, 1)
            if share > 0.10:
                self.note(f"other processes used {share * 100:.0f}% of the machine's CPU during "
                          f"section {name}: its figures are lower than on an idle machine")

    def client(self, mode: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Run the load client in its own process; its JSON answer."""
        child = self.sup.spawn(f"client-{mode}", [sys.executable, CLIENT, mode, json.dumps(args)],
                               stdout=subprocess.PIPE)
        try:
            out, _ = child.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.sup.stop([child])
            raise RuntimeError(f"load client ({mode}) did not finish within {timeout:g}s") from None
        self.sup.stop([child])
        if child.proc.returncode != 0 or not out.strip():
            raise RuntimeError(f"load client ({mode}) failed (exit {child.proc.returncode}):\n"
                               + child.log_tail())
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        return result

    def wrk_run(self, label: str, url: str, script: Path, conns: int,
                watch: Child | None = None) -> WrkResult:
        """A warm-up run, then the measured one; wrk's complaints become notes.

        With `watch`, the CPU time that process used during the measured run is recorded
        in `res.cpu_s`.
        """
        run_wrk(self.sup, self.wrk, url, script, conns, self.s.warm_s)
        self.log(f"  wrk {label} -c{conns} {self.s.wrk_s}s")
        cpu0 = watch.cpu_seconds() if watch is not None else 0.0
        res = run_wrk(self.sup, self.wrk, url, script, conns, self.s.wrk_s)
        if watch is not None:
            res.cpu_s = watch.cpu_seconds() - cpu0
        self.raw.setdefault("wrk", {})[f"{label}@c{conns}"] = res.as_dict()
        problems = res.problems()
        if problems:
            self.note(f"wrk {label} -c{conns}: {problems}")
        return res

    def script_for(self, model: str, headers: dict[str, str] | None = None,
                   name: str = "") -> Path:
        doc = json.dumps(chat_body(model), separators=(",", ":")).encode()
        return write_post_script(self.workdir / f"post-{name or model}.lua", doc, headers)

    def wait_ready(self, children: list[Child], path: str, timeout: float = 30.0) -> None:
        self.sup.wait_ready(children, path, timeout)

    def row(self, *args: Any, **kwargs: Any) -> Row:
        r = Row(*args, **kwargs)
        self.rows.append(r)
        return r

    def wrk_rows(self, section: str, prefix: str, base: WrkResult, other: WrkResult,
                 conns: int, p50_note: str = "", which: tuple[str, ...] = ("rps", "p50", "p99")
                 ) -> None:
        err = "" if not other.error_count else f"errors: {other.problems()}"
        suffix = f"{conns} conn" + ("s" if conns > 1 else "")
        if "rps" in which:
            self.row(section, f"{prefix}requests/s, {suffix}", base.rps, other.rps, "req/s", RATIO,
                     err)
        if "p50" in which:
            self.row(section, f"{prefix}latency p50, {suffix}", base.p50_ms, other.p50_ms, "ms",
                     DELTA, p50_note)
        if "p99" in which:
            self.row(section, f"{prefix}latency p99, {suffix}", base.p99_ms, other.p99_ms, "ms",
                     DELTA)

    # ------------------------------------------------------------------ machine

    def machine_facts(self) -> None:
        cpu_model = ""
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        versions = {}
        for mod in ("aiohttp", "uvloop", "orjson"):
            try:
                import importlib.metadata as md
                versions[mod] = md.version(mod)
            except Exception:  # noqa: BLE001 - a missing package is only a fact
                versions[mod] = "-"
        git = subprocess.run(["git", "log", "-1", "--format=%h %s"], cwd=ROOT, capture_output=True,
                             text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "proxy"], cwd=ROOT,
                               capture_output=True, text=True, check=False).stdout.strip()
        busy0, t0 = machine_busy_seconds(), time.monotonic()
        time.sleep(1.0)
        idle_busy = (machine_busy_seconds() - busy0) / ((time.monotonic() - t0) * (os.cpu_count() or 1))
        self.facts = {
            "busy_before_pct": round(idle_busy * 100, 1),
            "loadavg_before": os.getloadavg()[0],
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "mode": self.mode,
            "cpus": os.cpu_count(),
            "cpu_model": cpu_model,
            "kernel": platform.release(),
            "python": platform.python_version(),
            "versions": versions,
            "wrk": wrk_version(self.wrk) if self.wrk else "not used",
            "git": git[:72],
            "proxy_tree": "uncommitted changes under proxy/" if dirty else "clean",
            "nofile": raise_nofile(),
        }

    def header(self) -> str:
        f = self.facts
        v = f["versions"]
        return "\n".join([
            f"failover-proxy benchmark ({f['mode']})  {f['date']}",
            f"machine: {f['cpus']} CPUs ({f['cpu_model']}), Linux {f['kernel']}, "
            f"Python {f['python']}, aiohttp {v['aiohttp']}, uvloop {v['uvloop']}, {f['wrk']}",
            f"code: {f['git']} ({f['proxy_tree']})",
            f"machine busy before start: {f['busy_before_pct']:g}% of all CPUs "
            f"(load average {f['loadavg_before']:.2f}); other processes' share per section "
            "is listed at the end",
            f"load: wrk {self.s.wrk_s}s per run after {self.s.warm_s}s warm-up; all processes on "
            "these CPUs (load generator, proxy and simulators compete for them)",
        ])

    # ------------------------------------------------------------------ sections

    def main_group(self, peer: str | None, peer_exe: Path | None) -> None:
        """Rows 1, 2, 4 and 8 share one proxy in front of three simulators; 7 runs proxies
        of its own in front of the same two (before 4 kills one of them)."""
        sup = self.sup
        primary = sup.simulator("sim-primary", MODEL, words=20, tags=["main"])
        secondary = sup.simulator("sim-secondary", MODEL, words=20, tags=["main"])
        stream = sup.simulator("sim-stream", STREAM_MODEL, words=50, tags=["main"])
        self.wait_ready([primary, secondary, stream], "/v1/models")
        assert primary.port and secondary.port and stream.port
        cfg = proxy_config(
            [instance("primary", primary.port, MODEL), instance("secondary", secondary.port, MODEL),
             instance("stream", stream.port, STREAM_MODEL)],
            {"main": ["bench:primary", "bench:secondary"], "stream": ["bench:stream"]},
            health={"interval_s": 5, "timeout_s": 1},
            timeouts={"connect_s": 1, "first_byte_s": 10, "idle_s": 10},
            audit_db=self.workdir / "audit-main.db")
        proxy = sup.proxy("proxy-main", cfg, tags=["main"])
        # Section 7's two proxies start now too (idle until then), so that their start-up
        # overlaps this one instead of adding to the run.
        audit = self.audit_proxies(primary, secondary)
        base = self.baseline_children(primary, secondary, stream)
        self.wait_ready([proxy, *audit.values(), *base.values()], "/readyz")

        if self.wants("nonstream") or self.wants("peers"):
            with self.timed("1 non-streaming"):
                self.log("[1] non-streaming: wrk direct vs proxied")
                direct64 = self.bench_nonstream(primary, proxy)
            if self.wants("peers"):
                with self.timed("8 peers"):
                    self.bench_peers(peer, peer_exe, primary, direct64)
        if self.wants("stream"):
            with self.timed("2 streaming"):
                self.log("[2] streaming: TTFT and chunks/s")
                self.bench_stream(stream, proxy)
        if self.wants("baseline"):
            with self.timed("9 pass-through"):
                self.log("[9] against a bare aiohttp pass-through")
                self.bench_baseline(base, proxy, audit["on"])
        if self.wants("audit"):
            with self.timed("7 audit"):
                self.log("[7] audit store: events written, throughput on vs off")
                self.bench_audit(audit)
        if self.wants("dead"):
            with self.timed("4 one instance dead"):
                self.log("[4] one of two instances dead")
                self.bench_dead(primary, proxy)
        self.scan_logs([primary, secondary, stream, proxy])
        sup.stop_tagged("main")

    def bench_nonstream(self, sim: Child, proxy: Child) -> dict[int, WrkResult]:
        direct_url = f"http://{LOCALHOST}:{sim.port}{CHAT}"
        proxy_url = f"http://{LOCALHOST}:{proxy.port}{CHAT}"
        direct_script, proxy_script = self.script_for(MODEL), self.script_for("main")
        results: dict[tuple[str, int], WrkResult] = {}
        for conns in (1, 64):
            results["direct", conns] = self.wrk_run("direct", direct_url, direct_script, conns,
                                                    watch=sim)
            results["proxied", conns] = self.wrk_run("proxied", proxy_url, proxy_script, conns,
                                                     watch=proxy)
        d1, p1 = results["direct", 1], results["proxied", 1]
        d64, p64 = results["direct", 64], results["proxied", 64]
        self.wrk_rows("nonstream", "", d1, p1, 1, p50_note="delta = added latency p50 @1 client")
        self.wrk_rows("nonstream", "", d64, p64, 64, p50_note="")
        for row in self.rows[-3:]:
            if row.metric.startswith("requests/s"):
                row.note = (row.note + "; " if row.note else "") + "ratio = proxied/direct"
        # CPU per request: direct = the simulator's, proxied = the proxy's own (not the
        # simulator behind it). Shows whether the proxy process is the bottleneck.
        for conns, d, p in ((1, d1, p1), (64, d64, p64)):
            if d.requests and p.requests:
                busy = p.cpu_s / p.duration_s * 100
                self.row("nonstream", f"CPU per request, {conns} conn" + ("s" if conns > 1 else ""),
                         d.cpu_s / d.requests * 1e6, p.cpu_s / p.requests * 1e6, "us", RATIO,
                         f"simulator vs proxy process; proxy busy {busy:.0f}% of a core")
        return {1: d1, 64: d64}

    def bench_stream(self, sim: Child, proxy: Child) -> None:
        s = self.s
        targets = {"direct": (f"http://{LOCALHOST}:{sim.port}{CHAT}", STREAM_MODEL),
                   "proxied": (f"http://{LOCALHOST}:{proxy.port}{CHAT}", "stream")}
        ttft: dict[str, dict[str, Any]] = {}
        rate: dict[str, dict[str, Any]] = {}
        for name, (url, model) in targets.items():
            ttft[name] = self.client("ttft", {"url": url, "model": model, "n": s.ttft_n,
                                              "warmup": 10}, timeout=120)
        for name, (url, model) in targets.items():
            rate[name] = self.client("rate", {"url": url, "model": model, "concurrency": s.rate_conc,
                                              "duration": s.rate_s, "warmup": 1.0},
                                     timeout=s.rate_s + 60)
        self.raw["stream"] = {"ttft": {k: {kk: vv for kk, vv in v.items() if kk not in
                                          ("ttft_s", "total_s")} |
                                      {"p50_ms": ms(pct(v["ttft_s"], 50))}
                                      for k, v in ttft.items()}, "rate": rate}
        for name in targets:
            for what, res in (("TTFT", ttft[name]), ("chunks/s", rate[name])):
                if res["errors"]:
                    self.note(f"streaming {what} {name}: errors {res['errors']}")
        per_stream = {k: (v["chunks"] / len(v["ttft_s"]) if v["ttft_s"] else 0) for k, v in ttft.items()}
        if per_stream["direct"] != per_stream["proxied"]:
            self.note(f"streaming: content chunks per stream differ: {per_stream}")
        d, p = ttft["direct"], ttft["proxied"]
        n_note = f"n={len(p['ttft_s'])} sequential"
        self.row("stream", "time to first token p50", ms(pct(d["ttft_s"], 50)),
                 ms(pct(p["ttft_s"], 50)), "ms", DELTA, n_note)
        self.row("stream", "time to first token p99", ms(pct(d["ttft_s"], 99)),
                 ms(pct(p["ttft_s"], 99)), "ms", DELTA)
        self.row("stream", "whole 50-word stream p50", ms(pct(d["total_s"], 50)),
                 ms(pct(p["total_s"], 50)), "ms", DELTA)
        self.row("stream", f"content chunks/s, {s.rate_conc} concurrent streams",
                 rate["direct"]["chunks_per_s"], rate["proxied"]["chunks_per_s"], "chunks/s", RATIO,
                 f"{per_stream['proxied']:.0f} chunks/stream, {s.rate_s:g}s")

    def baseline_children(self, primary: Child, secondary: Child,
                          stream: Child) -> dict[str, Child]:
        """Section 9's processes (not yet ready): pass-throughs in front of the primary and
        the streaming simulator, a lean proxy (audit and request log off), and the same
        proxy with `--workers 1` and `--workers 2` on fixed ports (SO_REUSEPORT needs one)."""
        assert primary.port and secondary.port and stream.port
        sup = self.sup
        children = {"pass": sup.passthrough("passthrough", primary.port, tags=["main"]),
                    "pass-stream": sup.passthrough("passthrough-stream", stream.port,
                                                   tags=["main"]),
                    "floor": sup.floor("floor", primary.port, MODEL, tags=["main"])}
        lean = proxy_config(
            [instance("primary", primary.port, MODEL), instance("secondary", secondary.port, MODEL),
             instance("stream", stream.port, STREAM_MODEL)],
            {"main": ["bench:primary", "bench:secondary"], "stream": ["bench:stream"]},
            health={"interval_s": 5, "timeout_s": 1},
            timeouts={"connect_s": 1, "first_byte_s": 10, "idle_s": 10}, audit_db=None)
        children["lean"] = sup.proxy("proxy-lean", lean, tags=["main"])
        for workers in (1, 2):
            cfg = self.workdir / f"proxy-w{workers}.json"
            cfg.write_text(lean)
            port = free_port()
            children[f"w{workers}"] = sup.spawn(
                f"proxy-w{workers}", [sys.executable, "-m", "proxy", "serve", "--config", str(cfg),
                                      "--port", str(port), "--workers", str(workers)],
                port=port, tags=["main"])
        return children

    def bench_baseline(self, base: dict[str, Child], proxy: Child, full: Child) -> None:
        """The proxy against a bare aiohttp pass-through in front of the same simulator.

        `full` runs with everything on (audit store, metrics, the info request log to
        /dev/null: section 7's audit-on proxy); `lean` with the audit store and the request
        log off. Runs alternate (pass-through, full, lean) so drift hits all three alike;
        each figure is the better of two measured runs.
        """
        script_direct, script_proxy = self.script_for(MODEL), self.script_for("main")

        def url(child: Child) -> str:
            return f"http://{LOCALHOST}:{child.port}{CHAT}"

        targets = {"pass": (base["pass"], script_direct), "full": (full, script_proxy),
                   "lean": (base["lean"], script_proxy), "floor": (base["floor"], script_proxy)}
        best: dict[tuple[str, int], WrkResult] = {}
        for conns in (64, 1):
            for round_no in range(2):
                for name, (child, script) in targets.items():
                    res = self.wrk_run(f"base-{name}-{round_no + 1}", url(child), script, conns,
                                       watch=child)
                    prev = best.get((name, conns))
                    if prev is None or res.rps > prev.rps:
                        best[name, conns] = res
        p64 = best["pass", 64]
        targets_note = {"full": "target >= 0.75", "lean": "target >= 0.90",
                        "floor": "the least a routing proxy does (bench_lib/floor.py)"}
        for name, label in (("full", "proxy with audit + metrics + request log on"),
                            ("lean", "proxy with audit and request log off"),
                            ("floor", "least routing proxy")):
            res = best[name, 64]
            self.row("baseline", f"requests/s, 64 conns, {label}", p64.rps, res.rps,
                     "req/s", RATIO, targets_note[name])
            if res.requests and p64.requests:
                self.row("baseline", f"CPU per request, 64 conns, {label}",
                         p64.cpu_s / p64.requests * 1e6, res.cpu_s / res.requests * 1e6, "us",
                         RATIO, "pass-through process vs proxy process")
        self.row("baseline", "latency p50, 1 conn, proxy with audit and request log off",
                 best["pass", 1].p50_ms, best["lean", 1].p50_ms, "ms", DELTA)
        rates = self.baseline_streaming(base)
        workers = self.baseline_workers(base, script_proxy)
        self.raw["baseline"] = {f"{k[0]}@c{k[1]}": v.as_dict() for k, v in best.items()} | {
            "stream": rates, "workers": {k: v.as_dict() for k, v in workers.items()}}

    def baseline_streaming(self, base: dict[str, Child]) -> dict[str, Any]:
        """Streaming through the bare pass-through and the lean proxy: the same concurrent
        streaming client as section 2."""
        s = self.s
        rates = {}
        for name, child, model in (("pass", base["pass-stream"], STREAM_MODEL),
                                   ("lean", base["lean"], "stream")):
            rates[name] = self.client("rate", {"url": f"http://{LOCALHOST}:{child.port}{CHAT}",
                                               "model": model, "concurrency": s.rate_conc,
                                               "duration": s.rate_s, "warmup": 1.0},
                                      timeout=s.rate_s + 60)
            if rates[name]["errors"]:
                self.note(f"pass-through streaming {name}: errors {rates[name]['errors']}")
        self.row("baseline", f"content chunks/s, {s.rate_conc} concurrent streams",
                 rates["pass"]["chunks_per_s"], rates["lean"]["chunks_per_s"], "chunks/s", RATIO,
                 "target >= 0.75")
        return rates

    def baseline_workers(self, base: dict[str, Child], script: Path) -> dict[str, WrkResult]:
        """--workers 2 against 1, same lean config, alternating."""
        workers: dict[str, WrkResult] = {}
        for round_no in range(2):
            for name in ("w1", "w2"):
                res = self.wrk_run(f"workers-{name}-{round_no + 1}",
                                   f"http://{LOCALHOST}:{base[name].port}{CHAT}", script, 64)
                if name not in workers or res.rps > workers[name].rps:
                    workers[name] = res
        self.row("baseline", "requests/s, 64 conns: --workers 2 (proxied) vs 1 (direct column)",
                 workers["w1"].rps, workers["w2"].rps, "req/s", RATIO,
                 f"{os.cpu_count()} cores shared with wrk and the simulator")
        return workers

    def bench_dead(self, primary: Child, proxy: Child) -> None:
        url = f"http://{LOCALHOST}:{proxy.port}{CHAT}"
        script = self.script_for("main")
        healthy = self.wrk_run("both-healthy", url, script, 64)
        self.sup.kill(primary)  # SIGKILL: the backend process is gone, its port refuses
        t0 = time.monotonic()
        served_by: dict[str, int] = {}
        state = "?"
        deadline = t0 + 20.0
        # Discovery: traffic finds the refusal (circuit opens); the next probe marks it DOWN.
        while time.monotonic() < deadline:
            status, headers = post_json(url, chat_body("main"))
            inst = headers.get("x-route-instance", f"HTTP {status}")
            served_by[inst] = served_by.get(inst, 0) + 1
            _, body = http_get(f"http://{LOCALHOST}:{proxy.port}/admin/instances")
            for item in json.loads(body)["instances"]:
                if item["id"] == "bench:primary":
                    state = f"{item['state']}/circuit {item['circuit']}"
            if state.startswith("DOWN"):
                break
            time.sleep(0.1)
        discovered = time.monotonic() - t0
        if not state.startswith("DOWN"):
            self.note(f"one-dead: primary not marked DOWN within 20s (state {state})")
        dead = self.wrk_run("primary-dead", url, script, 64)
        self.raw["dead"] = {"discovery_s": round(discovered, 2), "primary_state": state,
                            "served_during_discovery": served_by}
        self.wrk_rows("dead", "", healthy, dead, 64)
        self.rows[-3].note = ((self.rows[-3].note + "; ") if self.rows[-3].note else "") + \
            f"primary SIGKILLed, {state} after {discovered:.1f}s"

    def failover_group(self) -> None:
        sup = self.sup
        sec = sup.simulator("sim-f-secondary", MODEL, tags=["failover"])
        p503 = sup.simulator("sim-f-503", MODEL, faults=["status=503"], tags=["failover"])
        phang = sup.simulator("sim-f-hang", MODEL, faults=["hang"], tags=["failover"])
        # Twins for the mid-stream case: the first cuts every answer after MID_CUT words.
        cut = sup.simulator("sim-f-cut", TWIN_MODEL, words=MID_WORDS,
                            faults=[f"die_after={MID_CUT}"], tags=["failover"])
        twin = sup.simulator("sim-f-twin", TWIN_MODEL, words=MID_WORDS, tags=["failover"])
        self.wait_ready([sec, p503, phang, cut, twin], "/v1/models")
        dead = PortHolder()  # refuses connections; nobody else can take it meanwhile
        try:
            self.failover_cases(sec, p503, phang, dead.port, (cut, twin))
        finally:
            dead.close()
        self.scan_logs([sec, p503, phang, cut, twin])
        sup.stop_tagged("failover")

    def failover_cases(self, sec: Child, p503: Child, phang: Child, dead_port: int,
                       twins: tuple[Child, Child]) -> None:
        sup, s = self.sup, self.s
        assert sec.port and p503.port and phang.port
        cfg = proxy_config(
            [instance("secondary", sec.port, MODEL), instance("dead", dead_port, MODEL),
             instance("p503", p503.port, MODEL), instance("phang", phang.port, MODEL)],
            {"healthy": ["bench:secondary"], "refused": ["bench:dead", "bench:secondary"],
             "s503": ["bench:p503", "bench:secondary"], "hang": ["bench:phang", "bench:secondary"]},
            # No probes: only the requests themselves discover (and re-discover) failures.
            # A long cooldown keeps a known-dead instance's circuit open between rounds.
            health={"enabled": False, "cooldown_s": 60, "max_cooldown_s": 60},
            timeouts={"connect_s": 1, "first_byte_s": HANG_FIRST_BYTE_S, "idle_s": 10},
            audit_db=self.workdir / "audit-failover.db")
        proxy = sup.proxy("proxy-failover", cfg, tags=["failover"])
        mid = self.midstream_proxy(*twins)  # starts alongside, to save time
        self.wait_ready([proxy], "/healthz")
        self.wait_ready([mid], "/readyz")
        base = f"http://{LOCALHOST}:{proxy.port}"
        cases: list[dict[str, Any]] = [{"name": "healthy", "url": base + CHAT, "model": "healthy"}]
        for case in FAILOVER_CASES:
            if case.unavailable or case.group is None or case.stream:
                continue
            spec: dict[str, Any] = {"name": case.key, "url": base + CHAT, "model": case.group,
                                    "n": getattr(s, case.limit)}
            if case.reset:
                spec["reset_url"] = f"{base}/admin/instances/{case.reset}/enable"
            if case.limit == "hang_n":
                spec["no_warmup"] = True
            cases.append(spec)
        rounds_s = s.fail_n * 0.01 + s.hang_n * HANG_FIRST_BYTE_S
        res = self.client("latency", {"cases": cases, "n": s.fail_n, "warmup": 3},
                          timeout=60 + rounds_s * 3)
        self.raw["failover"] = {k: {kk: vv for kk, vv in v.items() if kk != "latency_s"} |
                                {"p50_ms": ms(pct(v["latency_s"], 50)), "n": len(v["latency_s"])}
                                for k, v in res.items()}
        healthy = ms(pct(res["healthy"]["latency_s"], 50))
        for case in FAILOVER_CASES:
            if case.unavailable or case.group is None:
                self.rows.append(not_available("failover", case.metric, case.unavailable))
                continue
            if case.stream:
                self.bench_midstream(case, mid, twins[1])
                continue
            r = res[case.key]
            lat = r["latency_s"]
            bad = {k: v for k, v in r["status"].items() if k != "200"}
            if bad:
                self.note(f"failover {case.key}: non-200 answers {bad}")
            attempts = max(r["attempts"].items(), key=lambda kv: kv[1])[0] if r["attempts"] else "-"
            inst = max(r["instances"].items(), key=lambda kv: kv[1])[0] if r["instances"] else "-"
            note = f"n={len(lat)}, attempts={attempts}, served by {inst}"
            if case.expect:
                note += f"; expect {case.expect}"
            self.row("failover", case.metric, healthy, ms(pct(lat, 50)), "ms", DELTA, note)
        self.scan_logs([proxy])

    def midstream_proxy(self, cut: Child, twin: Child) -> Child:
        """The mid-stream case's proxy (not yet ready): group `midstream` = the twin that
        cuts, then the prefill-capable twin."""
        assert cut.port and twin.port
        cfg = proxy_config(
            [instance("cut", cut.port, TWIN_MODEL),
             instance("twin", twin.port, TWIN_MODEL, capabilities=("prefill",))],
            {"midstream": ["bench:cut", "bench:twin"]},
            # Probes: one round at start (fingerprints), then none during the run. The cut
            # opens the first twin's circuit; the case's `reset` closes it before each request.
            health={"interval_s": 3600, "timeout_s": 1},
            timeouts={"connect_s": 1, "first_byte_s": 10, "idle_s": 10},
            audit_db=self.workdir / "audit-midstream.db")
        return self.sup.proxy("proxy-midstream", cfg, tags=["failover"])

    def bench_midstream(self, case: FailoverCase, proxy: Child, twin: Child) -> None:
        """Mid-stream continuation: the gap the client sees at the cut, against what the
        fallback itself needs to start the same continuation (its TTFT, asked directly)."""
        s = self.s
        assert twin.port and case.reset
        cut_id = case.reset
        base = f"http://{LOCALHOST}:{proxy.port}"
        n = getattr(s, case.limit)
        warmup = 3
        res = self.client("midstream", {
            "url": base + CHAT, "model": case.group, "n": n, "warmup": warmup, "cut": MID_CUT,
            "words": MID_WORDS, "reset_url": f"{base}/admin/instances/{case.reset}/enable",
            "direct_url": f"http://{LOCALHOST}:{twin.port}{CHAT}", "direct_model": TWIN_MODEL,
        }, timeout=60 + n * 0.5)
        resumed = self.metric_total(proxy, "failover_proxy_streams_resumed_total")
        gaps, direct = res["gap_s"], res["direct_ttft_s"]
        gap50, ttft50 = ms(pct(gaps, 50)), ms(pct(direct, 50))
        self.raw["midstream"] = {
            "n": n, "warmup": warmup, "words": MID_WORDS, "cut_after": MID_CUT,
            "complete": res["complete"], "instances": res["instances"],
            "chunks_per_answer": res["chunks"], "errors": res["errors"],
            "direct_errors": res["direct_errors"], "reset_errors": res["reset_errors"],
            "incomplete_tails": res["incomplete"], "resumed_total": resumed,
            "gap_p50_ms": gap50, "gap_p90_ms": ms(pct(gaps, 90)),
            "gap_p99_ms": ms(pct(gaps, 99)), "fallback_ttft_p50_ms": ttft50,
            "fallback_ttft_p90_ms": ms(pct(direct, 90)),
            "added_p50_ms": None if gap50 is None or ttft50 is None else gap50 - ttft50,
            "whole_answer_p50_ms": ms(pct(res["total_s"], 50)),
        }
        for what, errs in (("proxied", res["errors"]), ("fallback direct", res["direct_errors"]),
                           ("admin enable", res["reset_errors"])):
            if errs:
                self.note(f"mid-stream {what}: errors {errs}")
        if res["complete"] != n:
            self.note(f"mid-stream: only {res['complete']}/{n} streamed answers were complete "
                      f"({MID_WORDS} words, indices 0..{MID_WORDS - 1}); chunks per answer "
                      f"{res['chunks']}; e.g. ...{res['incomplete'][:1]}")
        other = {k: v for k, v in res["instances"].items() if k != cut_id}
        if other:
            self.note(f"mid-stream: answers not started on {cut_id} (so not cut): {other}")
        if resumed is not None and resumed != n + warmup:
            self.note(f"mid-stream: the proxy counted {resumed:g} resumed streams for "
                      f"{n + warmup} requests")
        note = (f"gap at the cut (chunk {MID_CUT} -> {MID_CUT + 1}) vs the fallback's direct "
                f"TTFT with the prefill; {res['complete']}/{n} complete, "
                f"started on {cut_id}: {res['instances'].get(cut_id, 0)}/{n}")
        self.row("failover", case.metric, ttft50, gap50, "ms", DELTA, note)
        self.scan_logs([proxy])
        self.sup.stop([proxy])

    def metric_total(self, proxy: Child, name: str) -> float | None:
        """The sum of a Prometheus series over its labels, from GET /metrics, or None."""
        try:
            status, body = http_get(f"http://{LOCALHOST}:{proxy.port}/metrics", 5.0)
        except OSError as exc:
            self.note(f"{proxy.name}: /metrics unreadable ({exc})")
            return None
        if status != 200:
            self.note(f"{proxy.name}: /metrics answered HTTP {status}")
            return None
        family = name.removesuffix("_total")
        total, known = 0.0, False
        for line in body.decode(errors="replace").splitlines():
            if line.startswith(f"# TYPE {family} "):
                known = True  # a labelled counter has no samples until it first counts
            elif line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
                total += float(line.rsplit(None, 1)[1])
                known = True
        if not known:
            self.note(f"{proxy.name}: no metric {name} in /metrics")
            return None
        return total

    def memory_group(self) -> None:
        sup, s = self.sup, self.s
        # 1000 words, one every 0.5 s: streams stay open for minutes while the relay load
        # stays small (2,000 chunks/s for 1000 streams; at 0.05 s it would be 20,000/s,
        # more than this 2-core machine can relay, and the figure would measure backlog).
        slow = sup.simulator("sim-slow", SLOW_MODEL, words=1000, chunk_delay=MEMORY_CHUNK_DELAY_S,
                             tags=["memory"])
        self.wait_ready([slow], "/v1/models")
        assert slow.port
        cfg = proxy_config([instance("slow", slow.port, SLOW_MODEL)], {"slow": ["bench:slow"]},
                           health={"interval_s": 5, "timeout_s": 1},
                           timeouts={"connect_s": 1, "first_byte_s": 30, "idle_s": 30},
                           audit_db=self.workdir / "audit-memory.db")
        proxy = sup.proxy("proxy-memory", cfg, tags=["memory"])
        self.wait_ready([proxy], "/readyz")
        url = f"http://{LOCALHOST}:{proxy.port}{CHAT}"
        # Warm up the code paths (short answers via max_tokens), then let it settle.
        warm = self.client("burst", {"url": url, "model": "slow", "n": 20, "max_tokens": 2},
                           timeout=60)
        if set(warm["status"]) != {"200"}:
            self.note(f"memory: warm-up answers {warm['status']}")
        time.sleep(1.0)
        idle = self.rss_mib(proxy)
        hold = sup.spawn("client-hold", [sys.executable, CLIENT, "hold",
                                         json.dumps({"url": url, "model": "slow", "n": s.streams,
                                                     "timeout": 60})],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, tags=["memory"])
        assert hold.proc.stdout is not None and hold.proc.stdin is not None
        ready = json.loads(self.read_line(hold, 90))
        sim_state = self.sim_state(slow)
        loaded = self.rss_mib(proxy)
        hold.proc.stdin.write(b"close\n")
        hold.proc.stdin.flush()
        closed = json.loads(self.read_line(hold, 60))
        hold.proc.wait(timeout=30)
        time.sleep(2.0)
        after = self.rss_mib(proxy)
        self.raw["memory"] = {"idle_mib": idle, "open_mib": loaded, "after_mib": after,
                              "client": ready, "closed": closed,
                              "sim_inflight": sim_state.get("stats", {}).get("inflight")}
        if ready["ready"] != s.streams:
            self.note(f"memory: only {ready['ready']}/{s.streams} streams got a first chunk "
                      f"(failed: {ready['failed']})")
        n = ready["ready"]
        self.row("memory", "proxy RSS, idle (after warm-up)", None, idle, "MiB")
        self.row("memory", f"proxy RSS, {s.streams} open streams", None, loaded, "MiB", DELTA,
                 f"{n}/{s.streams} streams had a first chunk in {ready['open_s']:.1f}s",
                 base=idle)
        if n:
            self.row("memory", "RSS per open stream", None, (loaded - idle) * MIB / n, "KiB",
                     note="(open - idle) / streams")
        self.row("memory", "proxy RSS, after the streams closed", None, after, "MiB", DELTA,
                 base=idle)
        self.scan_logs([slow, proxy])
        sup.stop_tagged("memory")

    def sim_state(self, sim: Child) -> dict[str, Any]:
        """A simulator's /_sim/state, or {} (with a note) when it cannot be read."""
        try:
            status, body = http_get(f"http://{LOCALHOST}:{sim.port}/_sim/state", 5.0)
            state = json.loads(body)
        except (OSError, ValueError) as exc:
            self.note(f"{sim.name}: /_sim/state unreadable ({exc})")
            return {}
        if status != 200 or not isinstance(state, dict):
            self.note(f"{sim.name}: /_sim/state answered HTTP {status}")
            return {}
        return state

    @staticmethod
    def rss_mib(child: Child, samples: int = 5) -> float:
        values = []
        for _ in range(samples):
            values.append(child.rss_kib() / MIB)
            time.sleep(0.1)
        return statistics.median(values)

    @staticmethod
    def read_line(child: Child, timeout: float) -> str:
        assert child.proc.stdout is not None
        fd = child.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or child.proc.poll() is not None and not select.select([fd], [], [], 0)[0]:
                raise RuntimeError(f"{child.name}: no answer within {timeout:g}s:\n{child.log_tail()}")
            if select.select([fd], [], [], min(left, 0.5))[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"{child.name} closed its output:\n{child.log_tail()}")
                buf += chunk
        return buf.decode()

    def bench_planning(self) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_planner import measure

        rounds = self.s.planner_rounds
        us = measure(instances=10, rounds=rounds)
        self.row("planning", "route plan per request, 10 instances", None, us, "us",
                 note=f"best of 15 x {rounds // 5} plans, in-process")

    def audit_proxies(self, primary: Child, secondary: Child) -> dict[str, Child]:
        """Section 7's proxies (not yet ready): in front of section 1's simulators, the same
        but for the audit store (on: SQLite in the work folder; off: `store.enabled:
        false`), both at the production log level (info) with their output to /dev/null."""
        assert primary.port and secondary.port
        proxies: dict[str, Child] = {}
        for mode in ("on", "off"):
            cfg = proxy_config(
                [instance("primary", primary.port, MODEL),
                 instance("secondary", secondary.port, MODEL)],
                {"main": ["bench:primary", "bench:secondary"]},
                health={"interval_s": 5, "timeout_s": 1},
                timeouts={"connect_s": 1, "first_byte_s": 10, "idle_s": 10},
                audit_db=self.audit_db if mode == "on" else None, log_level="info")
            proxies[mode] = self.sup.proxy(f"proxy-audit-{mode}", cfg, tags=["audit"], log=False)
        return proxies

    @property
    def audit_db(self) -> Path:
        return self.workdir / "audit-on.db"

    def bench_audit(self, proxies: dict[str, Child]) -> None:
        """wrk runs alternate between the audit-on and audit-off proxies (on, off, on,
        off...); each run is a warm-up and a measured run, as in section 1.

        Rows written by a measured run: the on-proxy's row count once its writer has
        caught up after the run, minus the count once it had caught up after the warm-up
        (the last count after SIGTERM, when the proxy has flushed its queue and exited).
        """
        sup, s = self.sup, self.s
        db = self.audit_db
        script = self.script_for("main")
        runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
        exit_code: int | None = -1
        try:
            for i in range(s.audit_pairs):
                for mode in ("on", "off"):
                    proxy = proxies[mode]
                    url = f"http://{LOCALHOST}:{proxy.port}{CHAT}"
                    label = f"audit-{mode}-{i + 1}"
                    run_wrk(sup, self.wrk, url, script, 64, s.warm_s)
                    before = self.audit_rows(db, settle=True) if mode == "on" else None
                    dropped0 = self.metric_total(proxy, "failover_proxy_events_dropped_total") \
                        if mode == "on" else None
                    self.log(f"  wrk {label} -c64 {s.wrk_s}s")
                    cpu0 = proxy.cpu_seconds()
                    writer0 = children_cpu_s(proxy.pid)
                    res = run_wrk(sup, self.wrk, url, script, 64, s.wrk_s)
                    res.cpu_s = proxy.cpu_seconds() - cpu0
                    self.raw.setdefault("wrk", {})[f"{label}@c64"] = res.as_dict()
                    if res.problems():
                        self.note(f"wrk {label} -c64: {res.problems()}")
                    run: dict[str, Any] = {"rps": res.rps, "requests": res.requests,
                                           "elapsed_s": res.elapsed_s or float(s.wrk_s),
                                           "p50_ms": res.p50_ms, "p99_ms": res.p99_ms,
                                           "cpu_us_per_request": (res.cpu_s / res.requests * 1e6
                                                                  if res.requests else None)}
                    if mode == "on":
                        self.audit_rows(db, settle=True)  # the writer has caught up
                        writer_s = children_cpu_s(proxy.pid) - writer0
                        run["writer_cpu_us_per_request"] = (writer_s / res.requests * 1e6
                                                            if res.requests else None)
                        dropped = self.metric_total(proxy, "failover_proxy_events_dropped_total")
                        last = i == s.audit_pairs - 1
                        if last:  # SIGTERM: the proxy flushes its queue, then exits 0
                            exit_code = sup.terminate(proxy)
                        after = self.audit_rows(db, settle=not last)
                        assert before is not None
                        run |= {"rows": {k: after[k] - before[k] for k in after},
                                "dropped": (None if dropped is None or dropped0 is None
                                            else dropped - dropped0),
                                "dropped_total": dropped}
                        run["rows_total"] = sum(run["rows"].values())
                        run["rows_per_s"] = run["rows_total"] / run["elapsed_s"]
                        # One route_plans row per request served (wrk does not count
                        # the <= 64 still in flight when it stops; the proxy serves them).
                        plans = run["rows"]["route_plans"]
                        run["rows_per_request"] = run["rows_total"] / plans if plans else None
                    runs[mode].append(run)
        finally:
            sup.stop_tagged("audit")
        self.audit_rows_report(runs, exit_code)

    def audit_rows_report(self, runs: dict[str, list[dict[str, Any]]],
                          exit_code: int | None) -> None:
        on, off = runs["on"], runs["off"]
        self.raw["audit"] = {"runs": runs, "on_exit_code": exit_code}
        if exit_code != 0:
            self.note(f"audit: the audit-on proxy did not exit 0 after SIGTERM (exit "
                      f"{exit_code}); rows still queued may be missing")
        rates = [r["rows_per_s"] for r in on]
        rows = {k: sum(r["rows"][k] for r in on) for k in on[0]["rows"]}
        per_req = [r["rows_per_request"] for r in on if r["rows_per_request"] is not None]
        dropped = [r["dropped"] for r in on if r["dropped"] is not None]
        total_dropped = on[-1]["dropped_total"]
        seconds = sum(r["elapsed_s"] for r in on)
        self.row("audit", "audit events written/s", None, statistics.median(rates), "rows/s",
                 note=f"median of {len(on)} x {self.s.wrk_s}s; in {seconds:.0f}s: "
                      + " + ".join(f"{v} {k}" for k, v in rows.items())
                      + (f"; {statistics.median(per_req):.2f} rows/request served"
                         if per_req else ""))
        self.row("audit", "audit rows dropped (writer behind)", None,
                 float(sum(dropped)) if dropped else None, "rows",
                 note=f"failover_proxy_events_dropped_total in the measured runs; "
                      f"{total_dropped:g} in all (with warm-ups)"
                      if total_dropped is not None else "metric not readable")
        if dropped and sum(dropped):
            self.note(f"audit: {sum(dropped):g} audit rows dropped during the measured runs "
                      "(queue full): events/s counts only the rows written")
        rps_on = statistics.median(r["rps"] for r in on)
        rps_off = statistics.median(r["rps"] for r in off)
        cpu_on = [r["cpu_us_per_request"] for r in on if r["cpu_us_per_request"]]
        cpu_off = [r["cpu_us_per_request"] for r in off if r["cpu_us_per_request"]]
        note = f"median of {len(on)} alternating runs each"
        if cpu_on and cpu_off:
            note += (f"; proxy CPU/request {statistics.median(cpu_off):.0f} us off, "
                     f"{statistics.median(cpu_on):.0f} us on")
        writer = [r["writer_cpu_us_per_request"] for r in on if r["writer_cpu_us_per_request"]]
        if writer:  # another process, on the other core (shared with wrk and the simulator)
            note += f", its audit writer process {statistics.median(writer):.0f} us"
        self.row("audit", "throughput, audit on vs off", rps_off, rps_on, "req/s", RATIO, note)
        if rps_off and rps_on / rps_off < 0.9:
            self.note(f"audit: throughput with the audit store on is {rps_on / rps_off:.0%} of "
                      "off (below 90%)")

    def audit_rows(self, db: Path, settle: bool) -> dict[str, int]:
        """Rows in the audit database's three tables. With `settle`, the proxy is running:
        wait until the counts stop changing (its background writer has caught up)."""
        def count() -> dict[str, int]:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)
            try:
                return {t: int(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])
                        for t in ("events", "route_plans", "lineage")}
            finally:
                conn.close()

        last = count()
        if not settle:
            return last
        stable, deadline = 0, time.monotonic() + 30.0
        while stable < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
            now = count()
            stable = stable + 1 if now == last else 0
            last = now
        if stable < 3:
            self.note("audit: the row count was still changing 30s after the load stopped")
        return last

    def prepare_peer(self, peer: str | None) -> Path | None:
        if peer is None:
            return None
        if peer != "litellm":
            self.note(f"peers: unknown peer {peer!r} (known: litellm); skipped")
            return None
        self.log("[8] installing LiteLLM into its own venv (first time only)")
        exe, what = peers.ensure_litellm(self.workdir / "litellm-install.log")
        self.raw["litellm_install"] = what
        if exe is None:
            self.note(f"peers: LiteLLM install failed, skipped: {what}")
            self.rows.append(not_available("peers", "litellm", f"install failed: {what[:80]}"))
        return exe

    def bench_peers(self, peer: str | None, exe: Path | None,
                    sim: Child, direct: dict[int, WrkResult]) -> None:
        if peer is None:
            self.rows.append(not_available("peers", "litellm", "not requested; BENCH_PEERS=litellm"))
            return
        if exe is None:
            return
        self.log("[8] LiteLLM proxy, same wrk load")
        port = free_port()
        cfg = self.workdir / "litellm.yaml"
        cfg.write_text(peers.litellm_config(MODEL, MODEL, f"http://{LOCALHOST}:{sim.port}/v1"))
        key = "sk-bench-" + secrets.token_hex(16)
        auth = {"Authorization": f"Bearer {key}"}
        child = self.sup.spawn("litellm", [str(exe), "--config", str(cfg), "--host", LOCALHOST,
                                           "--port", str(port), "--num_workers", "1"],
                               port=port, env=peers.litellm_env(key), tags=["peer"])
        try:
            self.wait_ready([child], "/health/liveliness", timeout=180)
        except StartError as exc:
            self.note(f"peers: LiteLLM did not start: {str(exc).splitlines()[0]}")
            self.rows.append(not_available("peers", "litellm", "did not start (see notes)"))
            self.sup.stop([child])
            return
        status, _ = post_json(f"http://{LOCALHOST}:{port}{CHAT}", chat_body(MODEL), 30, auth)
        if status != 200:
            self.note(f"peers: LiteLLM answered HTTP {status} to a test request; see {child.log_path}")
        url = f"http://{LOCALHOST}:{port}{CHAT}"
        script = self.script_for(MODEL, auth, name="litellm")
        version = peers.litellm_version()
        res = {c: self.wrk_run("litellm", url, script, c) for c in (1, 64)}
        self.wrk_rows("peers", f"litellm {version}: ", direct[1], res[1], 1, which=("rps", "p50"))
        self.wrk_rows("peers", f"litellm {version}: ", direct[64], res[64], 64)
        self.scan_logs([child])
        self.sup.stop([child])

    def scan_logs(self, children: list[Child]) -> None:
        """Tracebacks or error-level lines in a child's log are worth a note."""
        for child in children:
            if child.log_path is None or not child.log_path.exists():
                continue
            text = child.log_path.read_text(errors="replace")
            errors = [ln for ln in text.splitlines()
                      if "Traceback" in ln or '"level":"error"' in ln or '"level": "error"' in ln]
            if errors:
                self.keep_logs = True  # the note points into the work folder
                self.note(f"{child.name} logged {len(errors)} error line(s), e.g.: "
                          f"{errors[0][:160]} (log: {child.log_path})")

    # ------------------------------------------------------------------ whole run

    def run(self, peer: str | None) -> None:
        if self.only is None or self.only - {"planning", "affinity"}:
            self.wrk = ensure_wrk()
        self.machine_facts()
        if self.wants("planning"):
            with self.timed("6 planning"):
                self.log("[6] planning cost")
                self.bench_planning()
        if self.only is None or self.only & {"nonstream", "peers", "stream", "baseline",
                                             "audit", "dead"}:
            peer_exe = self.prepare_peer(peer) if self.wants("peers") else None
            self.main_group(peer, peer_exe)
        if self.wants("failover"):
            with self.timed("3 failover"):
                self.log("[3] failover added latency")
                self.failover_group()
        if self.wants("memory"):
            with self.timed("5 memory"):
                self.log(f"[5] memory with {self.s.streams} open streams")
                self.memory_group()
        if self.wants("affinity"):
            with self.timed("10 affinity"):
                self.log("[10] prefix-cache affinity and load, three llama-servers")
                affinity.run(self, self.affinity_planning)
        if self.wants("shared"):
            with self.timed("11 shared state"):
                self.log("[11] replicas sharing state on Redis")
                shared_state.run(self, sys.modules[__name__])

    def affinity_planning(self, on: bool, history: int) -> float:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_planner import measure

        return measure(instances=10, rounds=self.s.planner_rounds, history=history,
                       affinity=on)

    def report(self, total_s: float) -> str:
        order = list(SECTIONS)
        rows = sorted(self.rows, key=lambda r: order.index(r.section))
        lines = [self.header(), "", render(rows, SECTIONS)]
        if self.notes:
            lines += ["", "notes:"] + [f"  - {n}" for n in self.notes]
        took = ", ".join(f"{k} {v:g}s" for k, v in self.durations.items())
        others = ", ".join(f"{k} {v:g}%" for k, v in self.foreign.items())
        lines += ["", f"took {total_s:.0f}s ({took})",
                  f"CPU used by other processes (share of the machine): {others}"]
        return "\n".join(lines)

    def as_json(self, total_s: float) -> dict[str, Any]:
        order = list(SECTIONS)
        return {
            "machine": self.facts,
            "settings": asdict(self.s),
            "sections": SECTIONS,
            "rows": [r.as_dict() for r in sorted(self.rows, key=lambda r: order.index(r.section))],
            "notes": self.notes,
            "durations_s": self.durations | {"total": round(total_s, 1)},
            "foreign_cpu_pct": self.foreign,
            "raw": self.raw,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (under a minute)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the child processes' logs (their folder is printed)")
    parser.add_argument("--only", "--sections", metavar="SECTIONS",
                        help="run only these sections (comma-separated: " + ", ".join(SECTIONS)
                        + ")")
    args = parser.parse_args(argv)
    only = None
    if args.only:
        only = frozenset(s.strip() for s in args.only.split(",") if s.strip())
        if not only or only - set(SECTIONS):
            parser.error(f"--only: choose from {', '.join(SECTIONS)}")
    peer = os.environ.get("BENCH_PEERS", "").strip() or None

    # Also when started with SIGINT ignored (a background job of a script): Ctrl-C, kill
    # and a closed terminal all end in the same teardown.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="failover-bench-"))
    bench = Bench(QUICK if args.quick else FULL, "quick" if args.quick else "full", workdir,
                  only)
    started = time.monotonic()
    code = 0
    try:
        bench.run(peer)
    except KeyboardInterrupt:
        print("\nbench: interrupted; stopping every child process", file=sys.stderr)
        code = 130
    except Exception as exc:  # noqa: BLE001 - report what was measured, then fail
        traceback.print_exc()
        print(f"bench: failed: {exc}", file=sys.stderr)
        bench.note(f"run aborted: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        code = 1
        args.keep_logs = True
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the teardown short
        bench.sup.stop_all()
        left = bench.sup.leftovers()
        if left:
            bench.note("processes still alive after teardown: " + ", ".join(left))
    total = time.monotonic() - started
    if code != 130:
        print(bench.report(total), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(bench.as_json(total), indent=2) + "\n")
            print(f"bench: wrote {args.json}", file=sys.stderr)
    if args.keep_logs or bench.keep_logs:
        print(f"bench: logs kept in {workdir}", file=sys.stderr)
    else:
        _rmtree(workdir)
    return code


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
