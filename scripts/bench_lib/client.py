"""The benchmark's asyncio load client, run as its own process (never inside the proxy's).

    python scripts/bench_lib/client.py MODE 'JSON-ARGS'

Modes (each prints one JSON object on stdout, except `hold`, which prints two lines):

ttft     sequential streaming requests: time to the first content chunk, and total time
burst    N concurrent streaming requests, all at once (a warm-up)
rate     C concurrent streaming workers for D seconds: content chunks per second
latency  sequential non-streaming requests over several cases, interleaved, each case
         optionally preceded by an untimed admin POST (e.g. re-enable an instance)
hold     open N streams, wait until each has received its first content chunk, print a
         `ready` line, keep reading until a line arrives on stdin, then close them all
midstream sequential streams through a proxy whose first instance cuts every answer after
         `cut` content chunks: the gap between chunk `cut` and the next one (the
         continuation's first new text), whether the whole answer arrived; interleaved
         with the baseline, the fallback's own time to first token for the same prefill
         request sent to it directly
"""

from __future__ import annotations

import asyncio
import re
import resource
import sys
import time
from typing import Any

import aiohttp
import orjson

PROMPT = "Say hello to the benchmark."


def body(model: str, stream: bool, max_tokens: int | None = None) -> bytes:
    doc: dict[str, Any] = {"model": model, "stream": stream,
                           "messages": [{"role": "user", "content": PROMPT}]}
    if max_tokens is not None:
        doc["max_tokens"] = max_tokens
    return orjson.dumps(doc)


def content_of(line: bytes) -> str | None:
    """The delta content of an SSE `data:` line, or None (role chunk, finish, [DONE]...)."""
    if not line.startswith(b"data:"):
        return None
    payload = line[5:].strip()
    if not payload or payload == b"[DONE]":
        return None
    try:
        doc = orjson.loads(payload)
        return doc["choices"][0]["delta"].get("content") or None
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return None


def session(limit: int = 0, total: float | None = 60.0) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, force_close=False)
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=total, sock_connect=10),
        headers={"Content-Type": "application/json"}, skip_auto_headers=("User-Agent",))


async def one_stream(sess: aiohttp.ClientSession, url: str, payload: bytes) -> dict[str, Any]:
    t0 = time.perf_counter()
    ttft = None
    chunks = 0
    async with sess.post(url, data=payload) as resp:
        status = resp.status
        instance = resp.headers.get("x-route-instance")
        async for line in resp.content:
            if content_of(line) is not None:
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    return {"status": status, "ttft": ttft, "total": time.perf_counter() - t0,
            "chunks": chunks, "instance": instance}


async def mode_ttft(args: dict[str, Any]) -> dict[str, Any]:
    payload = body(args["model"], True, args.get("max_tokens"))
    ttfts: list[float] = []
    totals: list[float] = []
    errors: dict[str, int] = {}
    instances: dict[str, int] = {}
    chunks = 0
    async with session(limit=1) as sess:
        for i in range(args.get("warmup", 5) + args["n"]):
            try:
                r = await one_stream(sess, args["url"], payload)
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            if r["status"] != 200 or r["ttft"] is None:
                key = f"HTTP {r['status']}" if r["status"] != 200 else "no content"
                errors[key] = errors.get(key, 0) + 1
                continue
            if i < args.get("warmup", 5):
                continue
            ttfts.append(r["ttft"])
            totals.append(r["total"])
            chunks += r["chunks"]
            if r["instance"]:
                instances[r["instance"]] = instances.get(r["instance"], 0) + 1
    return {"ttft_s": ttfts, "total_s": totals, "chunks": chunks, "errors": errors,
            "instances": instances}


async def mode_burst(args: dict[str, Any]) -> dict[str, Any]:
    """`n` concurrent streaming requests (a warm-up); their statuses."""
    payload = body(args["model"], True, args.get("max_tokens"))
    async with session(limit=0) as sess:
        results = await asyncio.gather(*(one_stream(sess, args["url"], payload)
                                         for _ in range(args["n"])), return_exceptions=True)
    status: dict[str, int] = {}
    for r in results:
        key = type(r).__name__ if isinstance(r, BaseException) else str(r["status"])
        status[key] = status.get(key, 0) + 1
    return {"status": status}


async def mode_rate(args: dict[str, Any]) -> dict[str, Any]:
    payload = body(args["model"], True)
    concurrency, duration = args["concurrency"], args["duration"]
    counts = {"chunks": 0, "streams": 0}
    errors: dict[str, int] = {}

    async def worker(sess: aiohttp.ClientSession, deadline: float) -> None:
        while time.perf_counter() < deadline:
            try:
                r = await one_stream(sess, args["url"], payload)
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            if r["status"] != 200:
                errors[f"HTTP {r['status']}"] = errors.get(f"HTTP {r['status']}", 0) + 1
                continue
            counts["chunks"] += r["chunks"]
            counts["streams"] += 1

    async with session(limit=concurrency) as sess:
        warm = time.perf_counter() + args.get("warmup", 1.0)
        await asyncio.gather(*(worker(sess, warm) for _ in range(concurrency)))
        counts["chunks"] = counts["streams"] = 0
        errors.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(sess, t0 + duration) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {"chunks": counts["chunks"], "streams": counts["streams"], "elapsed_s": elapsed,
            "chunks_per_s": counts["chunks"] / elapsed, "errors": errors}


async def mode_latency(args: dict[str, Any]) -> dict[str, Any]:
    """Cases: [{name, url, model, reset_url?, n?}]; rounds interleave the cases."""
    cases = args["cases"]
    out: dict[str, dict[str, Any]] = {
        c["name"]: {"latency_s": [], "status": {}, "instances": {}, "attempts": {}} for c in cases}
    rounds = max(c.get("n", args["n"]) for c in cases)
    warmup = args.get("warmup", 3)
    async with session(limit=1, total=30.0) as sess:
        for i in range(warmup + rounds):
            for case in cases:
                if i - warmup >= case.get("n", args["n"]) or (i < warmup and case.get("no_warmup")):
                    continue
                if case.get("reset_url"):
                    async with sess.post(case["reset_url"], data=b"{}") as r:
                        await r.read()
                payload = body(case["model"], False)
                t0 = time.perf_counter()
                try:
                    async with sess.post(case["url"], data=payload) as resp:
                        await resp.read()
                        dt = time.perf_counter() - t0
                        status = str(resp.status)
                        inst = resp.headers.get("x-route-instance", "-")
                        attempts = resp.headers.get("x-route-attempts", "-")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    dt, status, inst, attempts = None, type(exc).__name__, "-", "-"
                if i < warmup:
                    continue
                rec = out[case["name"]]
                if dt is not None and status == "200":
                    rec["latency_s"].append(dt)
                rec["status"][status] = rec["status"].get(status, 0) + 1
                rec["instances"][inst] = rec["instances"].get(inst, 0) + 1
                rec["attempts"][attempts] = rec["attempts"].get(attempts, 0) + 1
    return out


class _Holder:
    """The streams `hold` keeps open: how many have their first content chunk, how many
    failed (by why), and the chunks read; `settled` once every stream is one or the other."""

    def __init__(self, n: int, url: str, payload: bytes) -> None:
        self.n, self.url, self.payload = n, url, payload
        self.first = 0
        self.chunks = 0
        self.failed: dict[str, int] = {}
        self.settled = asyncio.Event()

    def _check(self) -> None:
        if self.first + sum(self.failed.values()) >= self.n:
            self.settled.set()

    def _fail(self, key: str) -> None:
        self.failed[key] = self.failed.get(key, 0) + 1
        self._check()

    async def hold_one(self, sess: aiohttp.ClientSession) -> None:
        got = False
        try:
            async with sess.post(self.url, data=self.payload) as resp:
                if resp.status != 200:
                    self._fail(f"HTTP {resp.status}")
                    return
                async for line in resp.content:
                    if content_of(line) is None:
                        continue
                    self.chunks += 1
                    if not got:
                        got = True
                        self.first += 1
                        self._check()
            if not got:
                self._fail("no content")
        except (aiohttp.ClientError, TimeoutError) as exc:
            if not got:
                self._fail(type(exc).__name__)


async def mode_hold(args: dict[str, Any]) -> None:
    n, timeout = args["n"], args.get("timeout", 60.0)
    holder = _Holder(n, args["url"], body(args["model"], True))
    t0 = time.perf_counter()
    async with session(limit=0, total=None) as sess:
        # Ramp up in small batches: a burst of 1000 connects overflows accept queues, and
        # the SYN retransmits that follow would be measured instead of the proxy.
        batch, pause = args.get("batch", 50), args.get("pause", 0.1)
        tasks = []
        for i in range(n):
            tasks.append(asyncio.create_task(holder.hold_one(sess)))
            if (i + 1) % batch == 0:
                await asyncio.sleep(pause)
        try:
            await asyncio.wait_for(holder.settled.wait(), timeout)
        except TimeoutError:
            pass
        ready = {"ready": holder.first, "failed": holder.failed,
                 "open_s": time.perf_counter() - t0,
                 "still_open": sum(1 for t in tasks if not t.done())}
        sys.stdout.write(orjson.dumps(ready).decode() + "\n")
        sys.stdout.flush()
        # Keep the streams open (and read them) until the parent says we are done.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    sys.stdout.write(orjson.dumps({"closed": n, "chunks": holder.chunks}).decode() + "\n")
    sys.stdout.flush()


_INDEX = re.compile(r"(\d+)$")


def complete_answer(text: str, words: int) -> bool:
    """Whether `text` is a whole simulator answer: `words` words, the i-th ending in i."""
    parts = text.split()
    if len(parts) != words:
        return False
    for i, word in enumerate(parts):
        m = _INDEX.search(word)
        if m is None or int(m.group(1)) != i:
            return False
    return True


def _count(d: dict[str, int], key: str) -> None:
    d[key] = d.get(key, 0) + 1


async def _streamed(sess: aiohttp.ClientSession, url: str,
                    payload: bytes) -> tuple[int, str, list[float], list[str]]:
    """One streamed answer: (status, x-route-instance, arrival time and text of each content
    chunk)."""
    times: list[float] = []
    pieces: list[str] = []
    async with sess.post(url, data=payload) as resp:
        status = resp.status
        inst = resp.headers.get("x-route-instance", "-")
        async for line in resp.content:
            text = content_of(line)
            if text is not None:
                times.append(time.perf_counter())
                pieces.append(text)
    return status, inst, times, pieces


async def _first_content_s(sess: aiohttp.ClientSession, url: str,
                           doc: dict[str, Any]) -> tuple[int, float | None]:
    """(status, seconds to the first content chunk or None) of one streamed request."""
    t0 = time.perf_counter()
    first = None
    async with sess.post(url, data=orjson.dumps(doc)) as resp:
        status = resp.status
        async for line in resp.content:
            if first is None and content_of(line) is not None:
                first = time.perf_counter() - t0
    return status, first


async def _direct_baseline(sess: aiohttp.ClientSession, args: dict[str, Any], prefix: str,
                           errors: dict[str, int], measured: bool) -> float | None:
    """The baseline: what the fallback itself takes to start continuing the answer (the
    prefill request the proxy sends it, sent directly); None when it failed (counted in
    `errors` when `measured`)."""
    doc = {"model": args["direct_model"], "stream": True,
           "messages": [{"role": "user", "content": PROMPT},
                        {"role": "assistant", "content": prefix}]}
    try:
        status, first = await _first_content_s(sess, args["direct_url"], doc)
    except (aiohttp.ClientError, TimeoutError) as exc:
        if measured:
            _count(errors, type(exc).__name__)
        return None
    if (status != 200 or first is None) and measured:
        _count(errors, f"HTTP {status}" if status != 200 else "no content")
    return first if status == 200 else None


def _note_answer(out: dict[str, Any], status: int, pieces: list[str], words: int) -> bool:
    """Count one measured answer; True when it was a 200 (whole or not)."""
    _count(out["chunks"], str(len(pieces)))
    if status != 200:
        _count(out["errors"], f"HTTP {status}")
        return False
    whole = "".join(pieces)
    if complete_answer(whole, words):
        out["complete"] += 1
    elif len(out["incomplete"]) < 3:
        out["incomplete"].append(whole[-160:])
    return True


async def mode_midstream(args: dict[str, Any]) -> dict[str, Any]:
    """Args: url, model, n, warmup, cut, words, reset_url, direct_url, direct_model.

    Round i: POST reset_url (untimed: closes the first instance's circuit, so the cut is
    met afresh), one streamed answer through the proxy (arrival time of every content
    chunk), then the same prefill request the proxy sends the fallback (the original
    messages plus the first `cut` chunks' text as an assistant message), sent to the
    fallback directly: its time to first content chunk.
    """
    cut, words = args["cut"], args["words"]
    payload = body(args["model"], True)
    gaps: list[float] = []
    ttft_direct: list[float] = []
    totals: list[float] = []
    out: dict[str, Any] = {"complete": 0, "incomplete": [], "instances": {}, "errors": {},
                           "direct_errors": {}, "reset_errors": {}, "chunks": {}}
    prefix: str | None = None
    async with session(limit=0, total=60.0) as sess:
        for i in range(args.get("warmup", 3) + args["n"]):
            measured = i >= args.get("warmup", 3)
            async with sess.post(args["reset_url"], data=b"{}") as r:
                await r.read()
                if r.status != 200 and measured:
                    _count(out["reset_errors"], f"HTTP {r.status}")
            t0 = time.perf_counter()
            try:
                status, inst, times, pieces = await _streamed(sess, args["url"], payload)
            except (aiohttp.ClientError, TimeoutError) as exc:
                if measured:
                    _count(out["errors"], type(exc).__name__)
                continue
            total = time.perf_counter() - t0
            if len(pieces) >= cut:
                prefix = "".join(pieces[:cut])
            if measured:
                _count(out["instances"], inst)
                if _note_answer(out, status, pieces, words):
                    if len(times) > cut:
                        gaps.append(times[cut] - times[cut - 1])
                    totals.append(total)
            if prefix is not None:
                first = await _direct_baseline(sess, args, prefix, out["direct_errors"], measured)
                if first is not None and measured:
                    ttft_direct.append(first)
    out |= {"gap_s": gaps, "direct_ttft_s": ttft_direct, "total_s": totals, "prefix": prefix}
    return out


MODES = {"ttft": mode_ttft, "rate": mode_rate, "latency": mode_latency, "burst": mode_burst,
         "midstream": mode_midstream}


def main() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY
                                                    else 65536, hard))
    mode, args = sys.argv[1], orjson.loads(sys.argv[2])
    try:
        import uvloop
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        if mode == "hold":
            runner.run(mode_hold(args))
            return 0
        result = runner.run(MODES[mode](args))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
