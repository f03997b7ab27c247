"""Section 10 of `make bench`: load spreading and prefix-cache affinity on three real
`llama-server` processes loading the same tiny model (the test models of `make llama`),
through the proxy and, in the same run, with a client-side round-robin over the same
servers.

- Affinity workload: a dozen conversations, each turn re-sending the whole history, turns
  of different conversations interleaved in a seeded random order; once one request at a
  time, once with three conversations in flight. Reported: the share of prompt tokens
  llama.cpp took from its cache, sum(timings.cache_n) / sum(cache_n + prompt_n).
- Load workload: two dozen concurrent one-turn requests, three rounds alternated with the
  round-robin; reported: the largest share one server took, and p50/p95 latency.

Each run's prompts carry a tag of their own, so no run finds another's prefixes cached.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from bench_lib.procs import LOCALHOST, ROOT, Child, Supervisor, free_port
from bench_lib.table import DELTA, Row

SECTION = "affinity"
TITLE = ("10. three real llama-servers (tiny models of `make llama`, -np 4): prefix-cache "
         "affinity and load (direct column = client-side round-robin over the same servers)")
CONVERSATIONS = 12
TURNS = 6
LOAD_REQUESTS = 24
LOAD_ROUNDS = 3
FILLER = ("Keep the answer short and refer to the earlier turns of this review where it "
          "helps; the diff touches the routing, the transport and the configuration. ")


class BenchLike(Protocol):
    sup: Supervisor
    workdir: Path

    def log(self, msg: str) -> None: ...

    def note(self, msg: str) -> None: ...

    def row(self, *args: Any, **kwargs: Any) -> Row: ...


def _script(arg: str) -> str:
    return subprocess.run(["bash", str(ROOT / "scripts" / "build_llama_server.sh"), arg],
                          check=True, capture_output=True, text=True, timeout=30).stdout.strip()


def _post(url: str, doc: dict[str, Any], timeout: float = 120.0) -> tuple[dict[str, Any], str]:
    """(JSON answer, x-route-instance or '') of one POST."""
    req = urllib.request.Request(url, data=json.dumps(doc).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body: dict[str, Any] = json.loads(resp.read())
        return body, resp.headers.get("x-route-instance") or ""


class Target:
    """Where requests go: the proxy (one URL), or a round-robin over the servers."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self._next = 0
        self._lock = threading.Lock()

    def url(self) -> str:
        with self._lock:
            url = self.urls[self._next % len(self.urls)]
            self._next += 1
        return url


def affinity_run(target: Target, tag: str, lanes: int) -> tuple[float, Counter[str]]:
    """The conversation workload with `lanes` requests in flight; (cache share, who served)."""
    rng = random.Random(7)
    order = [k for k in range(CONVERSATIONS) for _ in range(TURNS)]
    rng.shuffle(order)  # each conversation's turns stay in order; conversations interleave
    # Each conversation its own task from its first words on. (With one system prompt
    # shared by all, llama-server's default --slot-prompt-similarity 0.10 puts interleaved
    # conversations in the one slot that has it, whatever the proxy does: see the README.)
    histories = [[{"role": "system", "content": f"[{tag}] You are reviewer {k} of a proxy. "
                   + FILLER * 4}] for k in range(CONVERSATIONS)]
    turn_of = [0] * CONVERSATIONS
    cached = prompt = 0
    served: Counter[str] = Counter()
    lock = threading.Lock()

    def lane(n: int) -> None:
        nonlocal cached, prompt
        for k in order:
            if k % lanes != n:
                continue
            history = histories[k]
            history.append({"role": "user",
                            "content": f"Turn {turn_of[k]}: what about part {turn_of[k]}? "})
            turn_of[k] += 1
            body, who = _post(target.url(), {"model": "tiny", "messages": history,
                                             "max_tokens": 8, "temperature": 0})
            history.append({"role": "assistant",
                            "content": body["choices"][0]["message"]["content"]})
            timings = body.get("timings") or {}
            with lock:
                cached += int(timings.get("cache_n", 0))
                prompt += int(timings.get("prompt_n", 0))
                served[who] += 1

    with ThreadPoolExecutor(lanes) as pool:
        list(pool.map(lane, range(lanes)))
    return cached / max(1, cached + prompt), served


def load_run(target: Target, tag: str) -> tuple[list[float], Counter[str]]:
    """Two dozen concurrent one-turn requests; (latencies in ms, who served)."""
    def one(n: int) -> tuple[float, str]:
        started = time.perf_counter()
        _, who = _post(target.url(), {"model": "tiny", "max_tokens": 16, "temperature": 0,
                                      "messages": [{"role": "user",
                                                    "content": f"[{tag}] request {n}: " + FILLER}]})
        return (time.perf_counter() - started) * 1000.0, who

    with ThreadPoolExecutor(LOAD_REQUESTS) as pool:
        results = list(pool.map(one, range(LOAD_REQUESTS)))
    return [ms for ms, _ in results], Counter(who for _, who in results)


def _wait_probed_idle(proxy: Child, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://{LOCALHOST}:{proxy.port}/admin/instances"
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=5) as resp:
            instances = json.loads(resp.read())["instances"]
        if all(i["server_busy"] == 0 and i["server_queued"] == 0 for i in instances):
            return
        time.sleep(0.2)
    raise RuntimeError("the proxy's probes still see the servers busy")


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def start_servers(bench: BenchLike, model: str, tag: str) -> list[Child]:
    binary, cache = _script("--path"), _script("--cache")
    path = Path(cache) / "models" / f"{model}.gguf"
    if not Path(binary).exists() or not path.exists():
        raise RuntimeError(f"llama.cpp or {path.name} is missing: run `make llama`")
    servers = []
    for name in ("a", "b", "c"):
        port = free_port()
        servers.append(bench.sup.spawn(
            f"llama-{tag}-{name}", [binary, "-m", str(path), "--host", LOCALHOST, "--port",
                                    str(port), "-c", "8192", "-np", "4", "-t", "1",
                                    "--no-webui", "--alias", "tiny"], port=port,
            tags=[f"llama-{tag}"]))
    bench.sup.wait_ready(servers, "/health", 60)
    return servers


def start_proxy(bench: BenchLike, servers: list[Child], tag: str) -> Child:
    config = json.dumps({
        "server": {"host": LOCALHOST},
        "store": {"enabled": False},
        "logging": {"format": "json", "level": "warning"},
        "health": {"interval_s": 1, "timeout_s": 2},
        "timeouts": {"first_byte_s": 120, "idle_s": 60, "total_s": 300},
        "providers": [{"provider_id": "llamacpp", "instances": [
            {"id": name, "base_url": f"http://{LOCALHOST}:{srv.port}/v1",
             "metadata": {"model": "tiny"}} for name, srv in zip("abc", servers, strict=True)]}],
    })
    proxy = bench.sup.proxy(f"proxy-{tag}", config, tags=[f"llama-{tag}"])
    bench.sup.wait_ready([proxy], "/readyz", 30)
    return proxy


def run(bench: BenchLike, planning_us: Callable[[bool, int], float]) -> None:
    """Measure section 10 and add its rows."""
    servers = start_servers(bench, "tiny-a", "aff")
    proxy = start_proxy(bench, servers, "aff")
    direct = Target([f"http://{LOCALHOST}:{s.port}/v1/chat/completions" for s in servers])
    proxied = Target([f"http://{LOCALHOST}:{proxy.port}/v1/chat/completions"])
    for lanes, label in ((1, "one at a time"), (3, "three in flight")):
        bench.log(f"  affinity workload, {label}")
        rr, _ = affinity_run(direct, f"rr{lanes}", lanes)
        share, served = affinity_run(proxied, f"px{lanes}", lanes)
        bench.row(SECTION, f"prompt tokens from cache, {CONVERSATIONS} conversations x {TURNS} "
                  f"turns, {label}", round(rr, 3), round(share, 3), "share", DELTA,
                  "by " + ", ".join(f"{k.split(':')[-1]}={v}" for k, v in sorted(served.items())))
    bench.sup.stop_tagged("llama-aff")

    servers = start_servers(bench, "tiny-slow", "load")
    proxy = start_proxy(bench, servers, "load")
    direct = Target([f"http://{LOCALHOST}:{s.port}/v1/chat/completions" for s in servers])
    proxied = Target([f"http://{LOCALHOST}:{proxy.port}/v1/chat/completions"])
    bench.log(f"  load workload, {LOAD_REQUESTS} concurrent")
    load_run(proxied, "warm")  # the first requests of a fresh server are slower
    rr_ms: list[float] = []
    px_ms: list[float] = []
    largest = 0.0
    served: Counter[str] = Counter()
    for n in range(LOAD_ROUNDS):  # alternated: the machine's other work hits both alike
        rr_ms += load_run(direct, f"rr{n}")[0]
        # The round-robin's requests are other clients' load to the proxy, read by its
        # probes (every second): wait until they have seen the servers idle again.
        _wait_probed_idle(proxy)
        ms, served = load_run(proxied, f"px{n}")
        px_ms += ms
        largest = max(largest, max(served.values()) / LOAD_REQUESTS)
    bench.row(SECTION, f"largest share of {LOAD_REQUESTS} concurrent requests on one server",
              round(1 / 3, 3), round(largest, 3), "share", DELTA,
              f"worst of {LOAD_ROUNDS} rounds; last by "
              + ", ".join(f"{k.split(':')[-1]}={v}" for k, v in sorted(served.items())))
    bench.row(SECTION, f"latency p50, {LOAD_REQUESTS} concurrent (tiny-slow, 16 tokens)",
              round(statistics.median(rr_ms), 1), round(statistics.median(px_ms), 1), "ms", DELTA)
    bench.row(SECTION, f"latency p95, {LOAD_REQUESTS} concurrent",
              round(_pct(rr_ms, 95), 1), round(_pct(px_ms, 95), 1), "ms", DELTA)
    bench.sup.stop_tagged("llama-load")
    for history, what in ((0, "2-message request"), (20, "20-message history, a prefix hit"),
                          (100, "100-message history, a prefix hit")):
        # Off and on alternated, three times each: the machine's other work hits both alike.
        best = {False: float("inf"), True: float("inf")}
        for _ in range(3):
            for on in (False, True):
                best[on] = min(best[on], planning_us(on, history))
        bench.row(SECTION, f"route plan per request, 10 instances, {what}",
                  round(best[False], 2), round(best[True], 2), "us", DELTA,
                  "direct = affinity off; in-process, best of 3 x 15 runs, off and on alternated")
