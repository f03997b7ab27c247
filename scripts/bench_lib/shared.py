"""Section 11 of `make bench`: what sharing state between replicas through Redis costs.

- Throughput: two proxies in front of the same simulator, one with its state in process,
  one with `state.url` on a redis-server of this run (Debian's, started here); wrk runs
  alternate between them (in process, Redis, in process, Redis ...), and the row is the
  ratio of the medians (target: at least 0.85). Twice: plain requests, then a new session
  key on every request (each a session entry to share: the most the request path hands
  the shared layer).
- Propagation: two replicas A and B on that Redis, in front of an ordered group whose
  first member's port refuses connections. Each trial sends one request to A (which opens
  that instance's circuit at its refusal, then moves on) and polls B's
  /admin/instances on one kept-alive connection until the circuit shows open there; the
  time is from the request sent to A until B shows it, so an upper bound of the time from
  the circuit opening on A to B applying it (target: p99 at most 100 ms). An admin enable
  on A then closes it everywhere for the next trial (health probes are off on both, so
  the instance stays first in A's plans).
"""

from __future__ import annotations

import http.client
import json
import shutil
import statistics
import threading
import time
from typing import TYPE_CHECKING, Any

from bench_lib.procs import LOCALHOST, Child, free_port
from bench_lib.table import RATIO

if TYPE_CHECKING:
    from bench import Bench

SECTION = "shared"
TITLE = ("11. replicas sharing state on Redis (Debian's redis-server, this run): wrk -t1 -c64 "
         "alternating (direct column = state in process, proxied = state on Redis); circuit "
         "propagation from replica A to replica B")
CHAT = "/v1/chat/completions"


def _redis(bench: Bench) -> tuple[Child, str]:
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    child = bench.sup.spawn("redis", [exe, "--port", str(port), "--bind", LOCALHOST,
                                      "--save", "", "--appendonly", "no"],
                            port=port, tags=["shared"])
    deadline = time.monotonic() + 20
    while True:
        try:
            conn = http.client.HTTPConnection(LOCALHOST, port, timeout=1)
            conn.connect()
            conn.close()
            break
        except OSError:
            if time.monotonic() > deadline or not child.alive():
                raise RuntimeError("redis-server did not start:\n" + child.log_tail()) from None
            time.sleep(0.05)
    return child, f"redis://{LOCALHOST}:{port}/0"


def _config(bench_mod: Any, instances: list[dict[str, Any]], group: list[str],
            state: dict[str, Any] | None, health: dict[str, Any]) -> str:
    doc = json.loads(bench_mod.proxy_config(
        instances, {"main": group}, health=health,
        timeouts={"connect_s": 1, "first_byte_s": 10, "idle_s": 10}, audit_db=None))
    if state is not None:
        doc["state"] = state
    return json.dumps(doc, indent=2)


def run(bench: Bench, bench_mod: Any) -> None:
    """Both measurements; rows go to `bench`."""
    sup = bench.sup
    _, url = _redis(bench)
    sim = sup.simulator("sim-shared", bench_mod.MODEL, words=20, tags=["shared"])
    bench.wait_ready([sim], "/v1/models")
    assert sim.port
    live = bench_mod.instance("live", sim.port, bench_mod.MODEL)
    health = {"interval_s": 5, "timeout_s": 1}
    proxies = {
        "local": sup.proxy("proxy-state-local", _config(bench_mod, [live], ["bench:live"], None,
                                                         health), tags=["shared"]),
        "redis": sup.proxy("proxy-state-redis", _config(
            bench_mod, [live], ["bench:live"], {"url": url, "prefix": "bench-tp:"}, health),
            tags=["shared"]),
    }
    dead = bench_mod.instance("dead", free_port(), bench_mod.MODEL)
    circuit = {"enabled": False, "cooldown_s": 60, "max_cooldown_s": 120}
    replicas = [sup.proxy(f"replica-{name}", _config(
        bench_mod, [dead, live], ["bench:dead", "bench:live"],
        {"url": url, "prefix": "bench-prop:"}, circuit), tags=["shared"]) for name in "ab"]
    bench.wait_ready([*proxies.values(), *replicas], "/readyz")
    try:
        _throughput(bench, proxies)
        _propagation(bench, replicas[0], replicas[1], 30 if bench.mode == "quick" else 100)
    finally:
        sup.stop_tagged("shared")


#: A new session key on every request (unique per run): each one is a session entry the
#: Redis replica shares, the most the request path ever hands the shared layer.
_NEW_SESSIONS = """
math.randomseed(os.time())
local run = tostring(math.random(1, 1000000000))
local n = 0
request = function()
  n = n + 1
  wrk.headers["x-session-id"] = "bench-" .. run .. "-" .. n
  return wrk.format()
end
"""


def _throughput(bench: Bench, proxies: dict[str, Child]) -> None:
    plain = bench.script_for("main")
    sessions = bench.script_for("main", name="main-sessions")
    sessions.write_text(sessions.read_text() + _NEW_SESSIONS)
    for label, script, what in (("state", plain, ""),
                                ("state-sessions", sessions, ", a new session each")):
        rps: dict[str, list[float]] = {"local": [], "redis": []}
        p99: dict[str, list[float]] = {"local": [], "redis": []}
        cpu_us: dict[str, list[float]] = {"local": [], "redis": []}
        pairs = max(1, bench.s.audit_pairs)
        for i in range(pairs):
            for mode in ("local", "redis"):
                proxy = proxies[mode]
                res = bench.wrk_run(f"{label}-{mode}-{i + 1}",
                                    f"http://{LOCALHOST}:{proxy.port}{CHAT}", script, 64,
                                    watch=proxy)
                rps[mode].append(res.rps or 0.0)
                if res.p99_ms is not None:
                    p99[mode].append(res.p99_ms)
                if res.requests:
                    cpu_us[mode].append(res.cpu_s / res.requests * 1e6)
        local, redis = statistics.median(rps["local"]), statistics.median(rps["redis"])
        bench.raw[f"shared_throughput{what and '_sessions'}"] = {"rps": rps, "p99_ms": p99,
                                                                 "cpu_us": cpu_us}
        bench.row(SECTION, f"requests/s, 64 conns{what}", local, redis, "req/s", RATIO,
                  f"median of {pairs} alternating runs each; ratio = Redis/in process "
                  "(target >= 0.85)")
        if p99["local"] and p99["redis"]:
            bench.row(SECTION, f"latency p99, 64 conns{what}", statistics.median(p99["local"]),
                      statistics.median(p99["redis"]), "ms", RATIO)
        if cpu_us["local"] and cpu_us["redis"]:
            # Less sensitive to other work on the machine than requests/s.
            bench.row(SECTION, f"proxy CPU per request{what}", statistics.median(cpu_us["local"]),
                      statistics.median(cpu_us["redis"]), "us", RATIO,
                      "the proxy process's own (Redis's is not counted)")


def _get(conn: http.client.HTTPConnection, method: str, path: str,
         body: bytes | None = None) -> Any:
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {data[:200]!r}")
    return json.loads(data)


def _circuit(conn: http.client.HTTPConnection) -> str:
    rows = _get(conn, "GET", "/admin/instances")["instances"]
    return str(next(r["circuit"] for r in rows if r["id"] == "bench:dead"))


def _wait(conn: http.client.HTTPConnection, want: str, timeout: float = 5.0) -> float:
    """Poll until the dead instance's circuit reads `want`; the time it read so."""
    deadline = time.perf_counter() + timeout
    while True:
        if _circuit(conn) == want:
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise RuntimeError(f"replica B did not show the circuit {want} within {timeout:g}s")


def _send(conn: http.client.HTTPConnection, body: bytes, errors: list[BaseException]) -> None:
    try:
        _get(conn, "POST", CHAT, body)
    except Exception as exc:  # noqa: BLE001 - reported by the caller
        errors.append(exc)


def _propagation(bench: Bench, a: Child, b: Child, trials: int) -> None:
    body = json.dumps({"model": "main", "messages": [{"role": "user", "content": "hi"}]}).encode()
    conn_a = http.client.HTTPConnection(LOCALHOST, a.port, timeout=10)
    conn_admin = http.client.HTTPConnection(LOCALHOST, a.port, timeout=10)
    conn_b = http.client.HTTPConnection(LOCALHOST, b.port, timeout=10)
    times: list[float] = []
    misses = 0
    for _ in range(trials):
        _wait(conn_b, "closed")
        errors: list[BaseException] = []
        sender = threading.Thread(target=_send, args=(conn_a, body, errors))
        t0 = time.perf_counter()
        sender.start()
        try:
            seen = _wait(conn_b, "open")
        except RuntimeError:
            misses += 1
            seen = None
        sender.join()
        if errors:
            raise RuntimeError(f"request to replica A failed: {errors[0]}")
        if seen is not None:
            times.append((seen - t0) * 1000.0)
        _get(conn_admin, "POST", "/admin/instances/bench:dead/enable")
    for conn in (conn_a, conn_admin, conn_b):
        conn.close()
    bench.raw["shared_propagation_ms"] = times
    if not times:
        bench.note("shared: no circuit opened on A was seen on B")
        return
    ordered = sorted(times)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    note = f"{len(times)} trials; request sent to A -> B's admin API shows it open"
    if misses:
        note += f"; {misses} not seen within 5 s"
    bench.row(SECTION, "circuit open on A seen on B, p50", None, p50, "ms", "", note)
    bench.row(SECTION, "circuit open on A seen on B, p99", None, p99, "ms", "",
              f"target <= 100 ms; max {ordered[-1]:.1f} ms")
