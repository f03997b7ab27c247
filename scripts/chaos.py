#!/usr/bin/env python3
"""`make chaos`: simulated backends killed and restarted at random under load.

Three simulators serve the same model (twins, each declaring the `prefill` capability),
the proxy sits in front of them, and concurrent clients (the official `openai` SDK) send
a mix of streaming and non-streaming chat requests with distinct prompts. Meanwhile a
chaos driver kills simulators and restarts them on the same port, never all at once.
Every answer is checked word for word against `proxy.simtext.answer_text`:

- a non-streaming request must get 200 and exactly the expected text;
- a stream that ends normally (finish reason, [DONE]) must carry exactly the expected
  text: no word missing or twice. A stream that ends with an error event (the SDK raises
  `openai.APIError`) "failed loudly"; that is allowed only where continuation was
  impossible, which here means no other twin had been up long enough for the proxy to
  know (GRACE_S, about one health round) before the failure;
- once the load stops and the proxy is idle, no connection or task is left behind: the
  proxy's upstream pool holds exactly the connections the simulators still see, none is
  checked out, no client connection is open, and the background tasks are the ones
  there were before the load (in-process mode).

Two modes. `subprocess` (the default here): simulators are `python -m proxy simulate`
processes killed with SIGKILL, the proxy is `python -m proxy serve`, and leaks are
counted from outside (`ss`, /proc/PID/fd, /metrics, the simulators' control ports).
`inproc`: simulators and the proxy run in this event loop (kill = `Simulator.stop()`),
so the pool and `asyncio.all_tasks()` can be inspected directly; tests/test_chaos.py runs
this mode for a few seconds.

    .venv/bin/python scripts/chaos.py [--duration 60] [--clients 20] [--seed N]
                                      [--mode subprocess|inproc] [--keep]

Prints a summary; exits 1 on any violation, 0 otherwise. Only 127.0.0.1 is used, and the
run is bounded in time (--duration plus a short drain) and count (--max-requests).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import openai  # noqa: E402
import yaml  # noqa: E402

from proxy.sim.text import answer_text  # noqa: E402

MODEL = "twin"
PROVIDER = "chaos"
HEALTH_INTERVAL_S = 0.3
#: Generous, so that a live simulator is not marked DOWN only because this (possibly busy)
#: machine answered a probe late; a dead one is refused at once anyway.
HEALTH_TIMEOUT_S = 1.0
#: How long a restarted simulator must have been up before the proxy can be expected to
#: know (one jittered health round plus slack for the probe itself): a loud stream failure
#: counts as "continuation was possible" only if another twin was up that long before it.
GRACE_S = HEALTH_INTERVAL_S * 1.1 + 0.4

# Request outcomes.
OK = "ok"                      # non-stream: 200 and the exact text
FAILED = "failed"              # non-stream: anything else
COMPLETE = "complete"          # stream: ended normally with the exact text
LOUD = "failed_loudly"         # stream: ended with an error event (openai.APIError)
TRUNCATED = "truncated"        # stream: ended as if complete, but the text is wrong
BROKEN = "broken"              # stream: cut without an error event (a transport error)
NOT_STARTED = "not_started"    # stream: refused before the first byte (HTTP error)


# --------------------------------------------------------------------------- options


@dataclass
class Options:
    duration: float = 60.0
    clients: int = 20
    seed: int | None = None
    mode: str = "subprocess"
    words: int = 40
    chunk_delay: float = 0.005
    #: Share of streaming requests.
    stream_share: float = 0.6
    #: Hard cap on the number of requests, whatever the duration.
    max_requests: int = 200_000
    #: Seconds between two chaos actions, and how long a killed simulator stays down.
    kill_every: tuple[float, float] = (0.3, 1.0)
    down_for: tuple[float, float] = (0.2, 1.5)
    #: Share of chaos actions that kill two simulators at once (never the last one up).
    double_kill_share: float = 0.25
    #: How long the idle proxy may take to settle before leftovers count as leaks.
    settle_s: float = 10.0
    workdir: Path | None = None
    keep: bool = False
    quiet: bool = False

    def proxy_doc(self, proxy_port: int, sim_ports: list[int], workdir: Path) -> dict[str, Any]:
        return {
            "server": {"host": "127.0.0.1", "port": proxy_port},
            "timeouts": {"connect_s": 0.5, "first_byte_s": 2, "idle_s": 1, "total_s": 30},
            "health": {"interval_s": HEALTH_INTERVAL_S, "timeout_s": HEALTH_TIMEOUT_S},
            "retry": {"max_retry_after_s": 1},
            "store": {"url": f"sqlite:///{workdir}/audit.db"},
            "logging": {"format": "json", "level": "info"},
            "providers": [{"provider_id": PROVIDER, "instances": [
                {"id": f"s{n}", "base_url": f"http://127.0.0.1:{port}",
                 "metadata": {"model": MODEL, "capabilities": ["prefill"]}}
                for n, port in enumerate(sim_ports)]}],
        }


# --------------------------------------------------------------------------- results


@dataclass
class Outcome:
    client: int
    seq: int
    stream: bool
    prompt: str
    started: float
    status: str = ""
    detail: str = ""
    ended: float = 0.0
    request_id: str | None = None
    instance: str | None = None
    received_words: int = 0


@dataclass
class Report:
    options: Options
    seed: int
    outcomes: list[Outcome] = field(default_factory=list)
    kills: int = 0
    double_kills: int = 0
    restarts: int = 0
    #: (monotonic time, "down" | "up", backend name)
    timeline: list[tuple[float, str, str]] = field(default_factory=list)
    #: Loud failures judged "continuation was possible" (violations), with why.
    loud_possible: list[tuple[Outcome, str]] = field(default_factory=list)
    loud_impossible: list[tuple[Outcome, str]] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    leak_facts: list[str] = field(default_factory=list)
    upstream_cuts: int | None = None
    resumed: float | None = None
    reroutes: dict[str, float] = field(default_factory=dict)
    log_events: Counter[str] = field(default_factory=Counter)
    logs_by_request: dict[str, list[str]] = field(default_factory=dict)
    elapsed: float = 0.0
    workdir: Path | None = None
    setup_error: str | None = None

    def by_status(self, *statuses: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.status in statuses]

    @property
    def violations(self) -> list[str]:
        out = []
        if self.setup_error:
            out.append(f"setup: {self.setup_error}")
        for o in self.by_status(FAILED):
            out.append(f"non-stream request failed: {self._describe(o)}")
        for o in self.by_status(NOT_STARTED):
            out.append(f"stream refused before it started: {self._describe(o)}")
        for o in self.by_status(TRUNCATED):
            out.append(f"stream presented as complete but wrong: {self._describe(o)}")
        for o in self.by_status(BROKEN):
            out.append(f"stream cut without an error event: {self._describe(o)}")
        for o, why in self.loud_possible:
            out.append(f"stream failed loudly although continuation was possible ({why}): "
                       f"{self._describe(o)}")
        out += [f"leak: {leak}" for leak in self.leaks]
        return out

    def _describe(self, o: Outcome) -> str:
        text = (f"client {o.client} #{o.seq} request_id={o.request_id} "
                f"instance={o.instance} after {o.ended - o.started:.2f}s: {o.detail}")
        lines = self.logs_by_request.get(o.request_id or "", [])
        if lines:
            text += "\n      proxy log: " + "\n      proxy log: ".join(lines[:6])
        text += "\n      backends: " + self.alive_story(o.started, o.ended)
        return text

    def alive_story(self, start: float, end: float) -> str:
        """What the chaos did to the backends around [start, end]."""
        t0 = self.timeline[0][0] if self.timeline else start
        events = [f"{t - t0:.2f}s {name} {what}" for t, what, name in self.timeline
                  if start - GRACE_S <= t <= end + 0.2]
        return (f"request {start - t0:.2f}s..{end - t0:.2f}s; "
                + (", ".join(events) if events else "no kill or restart around it"))

    def summary(self) -> str:
        o = self.options
        whole = [x for x in self.outcomes if not x.stream]
        streams = [x for x in self.outcomes if x.stream]
        lines = [
            f"chaos: mode={o.mode} seed={self.seed} duration={o.duration:g}s clients={o.clients} "
            f"words={o.words} chunk_delay={o.chunk_delay:g}s (ran {self.elapsed:.1f}s)",
            f"  requests          {len(self.outcomes)} (non-stream {len(whole)}, stream {len(streams)})",
            f"  non-stream        ok {len(self.by_status(OK))}, failed {len(self.by_status(FAILED))}",
            f"  streams           complete {len(self.by_status(COMPLETE))}, "
            f"failed loudly {len(self.by_status(LOUD))} "
            f"(continuation impossible {len(self.loud_impossible)}, "
            f"possible {len(self.loud_possible)}), truncated {len(self.by_status(TRUNCATED))}, "
            f"cut without error {len(self.by_status(BROKEN))}, "
            f"refused before start {len(self.by_status(NOT_STARTED))}",
            f"  chaos             kills {self.kills} (of which {self.double_kills} double), "
            f"restarts {self.restarts}",
        ]
        cuts = "n/a" if self.upstream_cuts is None else str(self.upstream_cuts)
        resumed = "n/a" if self.resumed is None else f"{self.resumed:g}"
        reroutes = ", ".join(f"{k} {v:g}" for k, v in sorted(self.reroutes.items())) or "none"
        lines.append(f"  failover          streams resumed {resumed}, upstream streams cut {cuts}; "
                     f"reroutes: {reroutes}")
        lines.append("  leaked            connections/tasks: "
                     + ("none" if not self.leaks else f"{len(self.leaks)} problem(s)"))
        for fact in self.leak_facts:
            lines.append(f"                    {fact}")
        noisy = [(k, v) for k, v in self.log_events.most_common() if k]
        if noisy:
            lines.append("  proxy log         warnings/errors: "
                         + ", ".join(f"{k} {v}" for k, v in noisy[:12]))
        for outcome, why in self.loud_impossible[:3]:
            lines.append(f"  allowed loud failure ({why}): {outcome.detail[:240]}\n"
                         f"      backends: {self.alive_story(outcome.started, outcome.ended)}")
        if len(self.loud_impossible) > 3:
            lines.append(f"  ... and {len(self.loud_impossible) - 3} more allowed loud failures")
        problems = self.violations
        if problems:
            lines.append(f"VIOLATIONS ({len(problems)}), grouped, one example each:")
            groups: dict[str, list[str]] = {}
            for p in problems:
                groups.setdefault(_pattern(p), []).append(p)
            for examples in sorted(groups.values(), key=len, reverse=True)[:12]:
                lines.append(f"  - {len(examples)} x " + examples[0])
            if len(groups) > 12:
                lines.append(f"  ... and {len(groups) - 12} more kinds")
        if self.workdir is not None:
            lines.append(f"  files             {self.workdir}")
        lines.append("result: " + ("OK" if not problems else f"FAIL ({len(problems)} violations)"))
        return "\n".join(lines)


def _pattern(violation: str) -> str:
    """A violation with its particulars (ids, ports, counts, times) blanked, for grouping."""
    first = violation.split("\n")[0]
    first = re.sub(r"request_id=\S+|client \d+ #\d+|after [\d.]+s|127\.0\.0\.1:\d+", "", first)
    first = re.sub(rf"{PROVIDER}:s\d|\bs\d\b", "sX", first)
    return re.sub(r"\d+", "N", first)


def diff_words(got: str, expected: str) -> str:
    g, e = got.split(" ") if got else [], expected.split(" ")
    i = 0
    while i < min(len(g), len(e)) and g[i] == e[i]:
        i += 1
    return (f"{len(g)} words where {len(e)} were expected; first difference at word {i}: "
            f"got {g[i:i + 3]!r}, expected {e[i:i + 3]!r}")


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_listening(port: int, timeout: float = 20.0,
                         alive: Callable[[], bool] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"the process for port {port} exited")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise RuntimeError(f"nothing listening on {port} after {timeout:g}s")


async def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """A GET on a connection of its own, closed afterwards (leaves no pooled socket)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session, session.get(
            url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        return resp.status, await resp.read()


def metric_values(text: str, name: str) -> dict[str, float]:
    """Samples of one metric from Prometheus text: labels string -> value."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name):
            rest = line[len(name):]
            if rest[:1] not in ("{", " "):
                continue
            labels, _, value = rest.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[labels.strip()] = float(value)
    return out


# --------------------------------------------------------------------------- backends


class InprocBackend:
    """A simulator in this event loop; killed with `Simulator.stop()` (listener closed,
    every connection aborted), restarted with `start()` on the same port."""

    def __init__(self, name: str, opts: Options) -> None:
        from proxy.sim.simulator import Simulator

        self.name = name
        self.sim = Simulator(MODEL, words=opts.words, chunk_delay=opts.chunk_delay)
        self.alive = False

    @property
    def port(self) -> int:
        return self.sim.port

    async def start(self) -> None:
        await self.sim.start()
        self.alive = True

    async def kill(self) -> None:
        self.alive = False
        await self.sim.stop()

    async def state(self) -> dict[str, int] | None:
        s = self.sim.stats
        return {"open_connections": s.open_connections, "inflight": s.inflight,
                "aborted": s.aborted}

    async def close(self) -> None:
        self.alive = False
        await self.sim.stop()


class ProcBackend:
    """A `python -m proxy simulate` process; killed with SIGKILL, restarted on the same port
    (its control port answers /_sim/state without counting as a connection)."""

    def __init__(self, name: str, opts: Options, workdir: Path) -> None:
        self.name = name
        self.opts = opts
        self.port = free_port()
        self.control_port = free_port()
        self.log = workdir / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.alive = False

    async def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "simulate", "--port", str(self.port),
                "--model", MODEL, "--words", str(self.opts.words),
                "--chunk-delay", str(self.opts.chunk_delay),
                "--control-port", str(self.control_port),
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        proc = self.proc
        await wait_listening(self.port, alive=lambda: proc.returncode is None)
        self.alive = True

    async def kill(self) -> None:
        self.alive = False
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    async def state(self) -> dict[str, int] | None:
        try:
            status, body = await http_get(f"http://127.0.0.1:{self.control_port}/_sim/state", 2)
        except (TimeoutError, OSError, aiohttp.ClientError):
            return None
        if status != 200:
            return None
        stats = json.loads(body)["stats"]
        return {k: int(stats[k]) for k in ("open_connections", "inflight", "aborted")}

    async def close(self) -> None:
        self.alive = False
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


Backend = InprocBackend | ProcBackend


# --------------------------------------------------------------------------- the proxy


class InprocProxy:
    """The proxy app served in this event loop."""

    def __init__(self) -> None:
        self.port = free_port()
        self.runner: Any = None
        self.app: Any = None

    async def start(self, doc: dict[str, Any]) -> None:
        from proxy.api.server import start
        from proxy.app import create_app
        from proxy.config import parse_config

        self.app = create_app(parse_config(doc, "<chaos>"))
        # served the way `failover-proxy serve` serves it
        self.runner = await start(self.app, "127.0.0.1", self.port, shutdown_timeout=1.0)

    def pool(self) -> Any:
        """The proxy's upstream aiohttp ClientSession."""
        from proxy.api.state import STATE

        return self.app[STATE].client

    def inbound_connections(self) -> int:
        server = self.runner.server if self.runner is not None else None
        return len(server.connections) if server is not None else 0

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def pool_census(session: Any) -> tuple[Counter[int], int]:
    """(open idle connections per upstream port, connections in use) of an aiohttp
    ClientSession's connector. aiohttp 3.14 has no public figures for this: read its
    connector's `_conns` (idle, per connection key) and `_acquired` (in use); a
    diagnostic of this script only."""
    connector = session.connector
    idle: Counter[int] = Counter()
    for key, conns in connector._conns.items():
        idle[key.port] += sum(1 for proto, _ in conns if proto.is_connected())
    return idle, len(connector._acquired)


class ProcProxy:
    """`python -m proxy serve` with a YAML config; logs go to a file."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.log = workdir / "proxy.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, doc: dict[str, Any]) -> None:
        path = self.workdir / "proxy.yaml"
        path.write_text(yaml.safe_dump(doc))
        with open(self.log, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "serve", "--config", str(path),
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        proc = self.proc
        await wait_listening(self.port, alive=lambda: proc.returncode is None)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def socket_table(pid: int) -> list[tuple[str, int, int]]:
    """(state, local port, peer port) of every TCP socket `pid` owns, from `ss`."""
    try:
        out = subprocess.run(["ss", "-tanpH"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = []
    for line in out.splitlines():
        if f"pid={pid}," not in line:
            continue
        parts = line.split()
        if len(parts) < 5:
            continue
        local, peer = parts[3].rpartition(":")[2], parts[4].rpartition(":")[2]
        rows.append((parts[0], int(local) if local.isdigit() else 0,
                     int(peer) if peer.isdigit() else 0))
    return rows


def socket_fds(pid: int) -> int:
    """How many of the process's file descriptors are sockets (/proc/PID/fd)."""
    n = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    n += 1
    return n


# --------------------------------------------------------------------------- tasks


def _task_kind(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    name = getattr(coro, "__qualname__", None) or type(coro).__name__
    return str(name)


def task_census(exclude: set[asyncio.Task[Any]]) -> tuple[Counter[str], int]:
    """(kinds of the loop's tasks other than connection handlers, connection handler tasks)."""
    kinds: Counter[str] = Counter()
    handlers = 0
    for task in asyncio.all_tasks():
        if task in exclude or task.done():
            continue
        kind = _task_kind(task)
        if kind == "RequestHandler.start":
            handlers += 1  # one per open server-side connection; checked with the connections
        else:
            kinds[kind] += 1
    return kinds, handlers


# --------------------------------------------------------------------------- the run


class Chaos:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(1 << 32)
        self.seed = seed
        self.report = Report(opts, seed)
        self.backends: list[Backend] = []
        self.proxy: InprocProxy | ProcProxy | None = None
        self.count = 0
        self.deadline = 0.0
        self.log_entries: list[dict[str, Any]] = []
        self._restarts: set[asyncio.Task[None]] = set()

    def say(self, text: str) -> None:
        if not self.opts.quiet:
            print(text, flush=True)

    # ----------------------------------------------------------------- set-up

    async def start(self, workdir: Path) -> None:
        opts = self.opts
        if opts.mode == "inproc":
            self.backends = [InprocBackend(f"s{n}", opts) for n in range(3)]
            self.proxy = InprocProxy()
        else:
            self.backends = [ProcBackend(f"s{n}", opts, workdir) for n in range(3)]
            self.proxy = ProcProxy(workdir)
        await asyncio.gather(*(b.start() for b in self.backends))
        doc = opts.proxy_doc(self.proxy.port, [b.port for b in self.backends], workdir)
        await self.proxy.start(doc)
        now = time.monotonic()
        for b in self.backends:
            self.report.timeline.append((now, "up", b.name))

    # ----------------------------------------------------------------- load

    async def client_loop(self, client: openai.AsyncOpenAI, n: int) -> None:
        rng = random.Random(self.seed * 1000 + n)
        seq = 0
        while time.monotonic() < self.deadline and self.count < self.opts.max_requests:
            self.count += 1
            stream = rng.random() < self.opts.stream_share
            outcome = await self.one(client, n, seq, stream)
            self.report.outcomes.append(outcome)
            seq += 1

    async def one(self, client: openai.AsyncOpenAI, n: int, seq: int, stream: bool) -> Outcome:
        prompt = f"chaos {self.seed} client {n} request {seq}: tell me a long story"
        expected = answer_text(MODEL, prompt, self.opts.words)
        o = Outcome(n, seq, stream, prompt, time.monotonic())
        messages: Any = [{"role": "user", "content": prompt}]
        try:
            if stream:
                await self._stream(client, messages, expected, o)
            else:
                raw = await client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=messages)
                o.request_id = raw.headers.get("x-request-id")
                o.instance = raw.headers.get("x-route-instance")
                parsed = raw.parse()
                if inspect.isawaitable(parsed):
                    parsed = await parsed
                text = parsed.choices[0].message.content or ""
                o.received_words = len(text.split())
                if text == expected:
                    o.status = OK
                else:
                    o.status, o.detail = FAILED, "wrong text: " + diff_words(text, expected)
        except openai.APIStatusError as exc:
            o.status = NOT_STARTED if stream else FAILED
            o.request_id = o.request_id or exc.response.headers.get("x-request-id")
            o.detail = f"HTTP {exc.status_code}: {exc.message}"
        except Exception as exc:  # connection errors, timeouts: all failures here
            o.status = BROKEN if (stream and o.request_id) else (NOT_STARTED if stream else FAILED)
            o.detail = f"{type(exc).__name__}: {exc}"
        o.ended = time.monotonic()
        return o

    async def _stream(self, client: openai.AsyncOpenAI, messages: Any, expected: str,
                      o: Outcome) -> None:
        resp = await client.chat.completions.create(model=MODEL, messages=messages, stream=True)
        o.request_id = resp.response.headers.get("x-request-id")
        o.instance = resp.response.headers.get("x-route-instance")
        pieces: list[str] = []
        finish = None
        try:
            async for chunk in resp:
                for choice in chunk.choices:
                    if choice.delta.content:
                        pieces.append(choice.delta.content)
                    if choice.finish_reason:
                        finish = choice.finish_reason
        except (openai.APIConnectionError, openai.APIStatusError):
            raise
        except openai.APIError as exc:  # the error event: the stream failed loudly
            o.status, o.detail = LOUD, str(exc)
            o.received_words = len("".join(pieces).split())
            return
        text = "".join(pieces)
        o.received_words = len(text.split())
        if finish is None:
            o.status = TRUNCATED
            o.detail = "ended without a finish reason or error: " + diff_words(text, expected)
        elif text != expected:
            o.status = TRUNCATED
            o.detail = f"finish_reason={finish} but " + diff_words(text, expected)
        else:
            o.status = COMPLETE

    # ----------------------------------------------------------------- chaos

    async def chaos_loop(self) -> None:
        rng = random.Random(self.seed ^ 0x5EED)
        opts = self.opts
        while True:
            await asyncio.sleep(rng.uniform(*opts.kill_every))
            if time.monotonic() >= self.deadline:
                return
            alive = [b for b in self.backends if b.alive]
            if len(alive) <= 1:
                continue  # never the last one
            count = 2 if (len(alive) >= 3 and rng.random() < opts.double_kill_share) else 1
            victims = rng.sample(alive, count)
            if count == 2:
                self.report.double_kills += 1
            for victim in victims:
                await victim.kill()
                self.report.kills += 1
                self.report.timeline.append((time.monotonic(), "down", victim.name))
                task = asyncio.create_task(self.restart_later(victim, rng.uniform(*opts.down_for)))
                self._restarts.add(task)
                task.add_done_callback(self._restarts.discard)

    async def restart_later(self, backend: Backend, after: float) -> None:
        await asyncio.sleep(after)
        await backend.start()
        self.report.restarts += 1
        self.report.timeline.append((time.monotonic(), "up", backend.name))

    # ----------------------------------------------------------------- judging

    def judge_loud_failures(self) -> None:
        """Sort loud failures into "continuation impossible" (no other twin up for the
        whole grace period before the failure) and "possible" (violations)."""
        report = self.report
        for o in report.by_status(LOUD):
            failed = set(re.findall(rf"{PROVIDER}:(s\d)", o.detail))
            up = [b.name for b in self.backends
                  if b.name not in failed and self.up_throughout(b.name, o.ended - GRACE_S, o.ended)]
            if up:
                report.loud_possible.append((o, f"{', '.join(up)} up throughout the last "
                                                f"{GRACE_S:.2f}s"))
            else:
                report.loud_impossible.append((o, f"no other twin up for {GRACE_S:.2f}s before"))

    def up_throughout(self, name: str, start: float, end: float) -> bool:
        state = False
        for t, what, who in self.report.timeline:
            if who != name:
                continue
            if t <= start:
                state = what == "up"
            elif t <= end and what == "down":
                return False
            elif t <= end and what == "up" and not state:
                return False  # came up inside the window: not up throughout
        return state

    # ----------------------------------------------------------------- leaks

    async def check_leaks(self, baseline: Any) -> None:
        """Wait for the idle proxy to settle, then record whatever is left over."""
        deadline = time.monotonic() + self.opts.settle_s
        problems: list[str] = []
        facts: list[str] = []
        while True:
            problems, facts = await (self._inproc_leaks(baseline) if self.opts.mode == "inproc"
                                     else self._process_leaks(baseline))
            if not problems or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)
        self.report.leaks = problems
        self.report.leak_facts = facts

    async def _sim_states(self) -> dict[str, dict[str, int] | None]:
        return {b.name: await b.state() for b in self.backends}

    async def _inproc_leaks(self, baseline: Any) -> tuple[list[str], list[str]]:
        proxy = self.proxy
        assert isinstance(proxy, InprocProxy)
        base_kinds: Counter[str] = baseline
        problems, facts = [], []
        states = await self._sim_states()
        idle, acquired = pool_census(proxy.pool())
        inbound = proxy.inbound_connections()
        bound = len(self.backends) * (self.opts.clients + 2)
        sims_open = 0
        for b in self.backends:
            st = states[b.name] or {}
            sims_open += st.get("open_connections", 0)
            if st.get("open_connections", 0) != idle[b.port]:
                problems.append(f"{b.name} has {st.get('open_connections')} open connections, "
                                f"the proxy's pool holds {idle[b.port]} idle ones to it")
            if st.get("inflight", 0):
                problems.append(f"{b.name} still has {st.get('inflight')} requests in flight")
        if acquired:
            problems.append(f"{acquired} upstream connections still checked out of the pool")
        if sum(idle.values()) > bound:
            problems.append(f"the upstream pool holds {sum(idle.values())} connections (> {bound})")
        if inbound:
            problems.append(f"{inbound} client connections still open on the proxy")
        kinds, handlers = task_census({t for t in [asyncio.current_task()] if t} | self._restarts)
        extra = kinds - base_kinds
        if extra:
            problems.append("tasks left over: " + ", ".join(f"{k} x{v}" for k, v in extra.items()))
        if handlers != sims_open + inbound:
            problems.append(f"{handlers} connection handler tasks for {sims_open + inbound} "
                            "open server-side connections")
        facts.append(f"upstream pool: {sum(idle.values())} idle, {acquired} checked out; "
                     f"simulators see {sims_open} open; proxy client connections {inbound}")
        facts.append(f"tasks: {sum(kinds.values())} besides connection handlers "
                     f"(baseline {sum(base_kinds.values())}), {handlers} connection handlers")
        return problems, facts

    async def _process_leaks(self, baseline: Any) -> tuple[list[str], list[str]]:
        proxy = self.proxy
        assert isinstance(proxy, ProcProxy)
        base_unaccounted: int = baseline
        problems, facts = [], []
        inflight = None
        with contextlib.suppress(OSError, asyncio.TimeoutError, aiohttp.ClientError):
            status, body = await http_get(f"http://127.0.0.1:{proxy.port}/metrics")
            if status == 200:
                inflight = sum(metric_values(body.decode(),
                                             "failover_proxy_inflight_requests").values())
        states = await self._sim_states()
        table = socket_table(proxy.pid)
        fds = socket_fds(proxy.pid)
        established = [r for r in table if r[0] == "ESTAB"]
        inbound = [r for r in established if r[1] == proxy.port]
        close_wait = [r for r in table if r[0] == "CLOSE-WAIT"]
        listening = [r for r in table if r[0] == "LISTEN"]
        unaccounted = fds - len(established) - len(listening) - len(close_wait)
        sims_open = 0
        for b in self.backends:
            assert isinstance(b, ProcBackend)
            st = states[b.name]
            out = sum(1 for r in established if r[2] == b.port)
            if st is None:
                problems.append(f"{b.name}: no state from its control port")
                continue
            sims_open += st["open_connections"]
            if st["open_connections"] != out:
                problems.append(f"{b.name} has {st['open_connections']} open connections, the "
                                f"proxy process holds {out} to it")
            if st["inflight"]:
                problems.append(f"{b.name} still has {st['inflight']} requests in flight")
        if inflight:
            problems.append(f"the proxy reports {inflight:g} requests in flight")
        if inbound:
            problems.append(f"{len(inbound)} client connections still open on the proxy")
        if close_wait:
            problems.append(f"{len(close_wait)} proxy sockets in CLOSE-WAIT (peer gone, never "
                            "closed)")
        bound = len(self.backends) * (self.opts.clients + 2)
        pool = len(established) - len(inbound)
        if pool > bound:
            problems.append(f"the proxy holds {pool} upstream connections (> {bound})")
        if unaccounted > base_unaccounted:
            problems.append(f"{unaccounted - base_unaccounted} more sockets in /proc/"
                            f"{proxy.pid}/fd than TCP connections explain (baseline "
                            f"{base_unaccounted}, now {unaccounted})")
        facts.append(f"proxy pid {proxy.pid}: {fds} socket fds, {len(established)} established "
                     f"({len(inbound)} from clients, {pool} upstream), {len(close_wait)} "
                     f"close-wait; simulators see {sims_open} open; inflight "
                     f"{'n/a' if inflight is None else f'{inflight:g}'}")
        facts.append("tasks: not visible in subprocess mode (use --mode inproc)")
        return problems, facts

    async def baseline(self) -> Any:
        if self.opts.mode == "inproc":
            kinds, _ = task_census({t for t in [asyncio.current_task()] if t})
            return kinds
        proxy = self.proxy
        assert isinstance(proxy, ProcProxy)
        table = socket_table(proxy.pid)
        est = sum(1 for r in table if r[0] in ("ESTAB", "LISTEN", "CLOSE-WAIT"))
        return socket_fds(proxy.pid) - est

    # ----------------------------------------------------------------- metrics and logs

    async def collect_metrics(self) -> None:
        assert self.proxy is not None
        with contextlib.suppress(OSError, asyncio.TimeoutError, aiohttp.ClientError):
            status, body = await http_get(f"http://127.0.0.1:{self.proxy.port}/metrics")
            if status == 200:
                text = body.decode()
                resumed = metric_values(text, "failover_proxy_streams_resumed_total")
                self.report.resumed = sum(resumed.values())
                reasons: dict[str, float] = {}
                for labels, value in metric_values(text, "failover_proxy_reroutes_total").items():
                    m = re.search(r'reason="([^"]*)"', labels)
                    reason = m.group(1) if m else "?"
                    reasons[reason] = reasons.get(reason, 0.0) + value
                self.report.reroutes = reasons
        if self.opts.mode == "inproc":
            cuts = 0
            for b in self.backends:
                st = await b.state()
                cuts += (st or {}).get("aborted", 0)
            self.report.upstream_cuts = cuts

    def collect_logs(self) -> None:
        entries = self.log_entries
        if self.opts.mode != "inproc":
            proxy = self.proxy
            assert isinstance(proxy, ProcProxy)
            entries = []
            with contextlib.suppress(OSError):
                for line in proxy.log.read_text(errors="replace").splitlines():
                    if line.startswith("{"):
                        with contextlib.suppress(ValueError):
                            entries.append(json.loads(line))
                    elif "Traceback" in line or "Error handling request" in line:
                        entries.append({"event": line.strip()[:80], "log_level": "error"})
        wanted = {o.request_id for o in self.report.outcomes
                  if o.status not in (OK, COMPLETE) and o.request_id}
        for entry in entries:
            level = str(entry.get("log_level") or entry.get("level") or "")
            if level in ("warning", "error", "critical"):
                self.report.log_events[str(entry.get("event"))] += 1
            rid = entry.get("request_id")
            if rid in wanted:
                shown = {k: v for k, v in entry.items() if k not in ("timestamp", "request_id")}
                self.report.logs_by_request.setdefault(str(rid), []).append(
                    json.dumps(shown, default=str)[:400])

    # ----------------------------------------------------------------- main

    async def run(self) -> Report:
        opts = self.opts
        report = self.report
        workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="chaos-"))
        workdir.mkdir(parents=True, exist_ok=True)
        report.workdir = workdir
        started = time.monotonic()
        capture: Any = contextlib.nullcontext([])
        if opts.mode == "inproc":
            import structlog.testing

            capture = structlog.testing.capture_logs()
        client: openai.AsyncOpenAI | None = None
        try:
            with capture as entries:
                self.log_entries = entries
                try:
                    await self.start(workdir)
                except Exception as exc:
                    report.setup_error = f"{type(exc).__name__}: {exc}"
                    return report
                await asyncio.sleep(0.6)  # the first health rounds
                baseline = await self.baseline()
                assert self.proxy is not None
                self.say(f"chaos: seed {self.seed}, {opts.clients} clients for {opts.duration:g}s "
                         f"against {[b.port for b in self.backends]} via :{self.proxy.port}")
                client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{self.proxy.port}/v1",
                                            api_key="chaos", max_retries=0, timeout=30)
                self.deadline = time.monotonic() + opts.duration
                chaos = asyncio.create_task(self.chaos_loop())
                await asyncio.gather(*(self.client_loop(client, n) for n in range(opts.clients)))
                chaos.cancel()
                await asyncio.gather(chaos, return_exceptions=True)
                # Let pending restarts finish, then bring back whatever is still down.
                await asyncio.gather(*self._restarts, return_exceptions=True)
                for b in self.backends:
                    if not b.alive:
                        await b.start()
                        report.restarts += 1
                        report.timeline.append((time.monotonic(), "up", b.name))
                await client.close()
                client = None
                await self.collect_metrics()
                await self.check_leaks(baseline)
                self.judge_loud_failures()
        finally:
            if client is not None:
                await client.close()
            for task in list(self._restarts):
                task.cancel()
            if self.proxy is not None:
                with contextlib.suppress(Exception):
                    await self.proxy.close()
            for b in self.backends:
                with contextlib.suppress(Exception):
                    await b.close()
            self.collect_logs()
            report.elapsed = time.monotonic() - started
            if not opts.keep and opts.workdir is None and not report.violations:
                shutil.rmtree(workdir, ignore_errors=True)
                report.workdir = None
        return report


async def run(opts: Options) -> Report:
    """Run one chaos session; see the module docstring."""
    return await Chaos(opts).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (60)")
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients (20)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (printed)")
    parser.add_argument("--mode", choices=("subprocess", "inproc"), default="subprocess",
                        help="simulators/proxy as processes (SIGKILL) or in this process")
    parser.add_argument("--words", type=int, default=40, help="words per answer (40)")
    parser.add_argument("--chunk-delay", type=float, default=0.005,
                        help="seconds between streamed chunks (0.005)")
    parser.add_argument("--max-requests", type=int, default=200_000,
                        help="stop after this many requests, whatever the duration")
    parser.add_argument("--keep", action="store_true", help="keep the logs and audit db")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.clients < 1 or args.words < 1 or args.max_requests < 1:
        parser.error("--duration, --clients, --words and --max-requests must be positive")
    opts = Options(duration=args.duration, clients=args.clients, seed=args.seed, mode=args.mode,
                   words=args.words, chunk_delay=args.chunk_delay,
                   max_requests=args.max_requests, keep=args.keep)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        report = runner.run(run(opts))
    print(report.summary(), flush=True)
    return 1 if report.violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
