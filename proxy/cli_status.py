"""`failover-proxy status`: the running proxy's own view (GET /admin/status, see
proxy.api.status) as a terminal table: instances, circuits, load, the hour's tallies and
the latest reroutes; `--watch` redraws it."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from typing import Any

from proxy.audit.tally import SAMPLE_EVERY_S, WINDOW_S


class StatusError(Exception):
    """The proxy could not be asked (not running, refused the key, not a proxy)."""


async def fetch_status(url: str, admin_key: str | None, timeout_s: float = 5.0) -> dict[str, Any]:
    """GET {url}/admin/status. Raises StatusError with a one-line explanation."""
    import aiohttp

    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    target = url.rstrip("/") + "/admin/status"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s, \
                s.get(target, headers=headers) as resp:
            if resp.status in (401, 403):
                raise StatusError(f"{url} refused the admin key (HTTP {resp.status}): give "
                                  "--admin-key or set PROXY_ADMIN_KEY")
            if resp.status != 200:
                raise StatusError(f"{target} answered HTTP {resp.status}: is this a "
                                  "failover-proxy?")
            doc = await resp.json(content_type=None)
    except aiohttp.InvalidURL:
        raise StatusError(f"not a URL: {url}") from None
    except (aiohttp.ClientConnectionError, TimeoutError) as exc:
        raise StatusError(f"no proxy answers at {url} ({type(exc).__name__})") from None
    except ValueError:
        raise StatusError(f"{target} did not answer JSON: is this a failover-proxy?") from None
    if not isinstance(doc, dict) or "instances" not in doc:
        raise StatusError(f"{target} did not answer a status: is this a failover-proxy?")
    return doc


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def format_status(doc: dict[str, Any], url: str) -> str:
    """The status document as a terminal page: a header, the instance table, the last
    hour's tallies and the latest reroutes."""
    from proxy.cli import text_table

    lines = [f"failover-proxy {doc.get('version')} at {url}   up {_age(doc['uptime_s'])}   "
             f"in flight {doc.get('inflight', 0)}   audit {_audit(doc)}",
             ""]
    table: list[tuple[str, ...]] = [("INSTANCE", "STATE", "CIRCUIT", "LOAD", "LATENCY",
                                     "FINGERPRINT", "REASON")]
    for row in doc["instances"]:
        ewma, probe = row.get("latency_ewma_ms"), row.get("last_probe_ms")
        latency = (f"{ewma:.0f} ms" if isinstance(ewma, (int, float))
                   else f"{probe:.0f} ms probe" if isinstance(probe, (int, float)) else "-")
        table.append((str(row["id"]), str(row["state"]), str(row["circuit"]),
                      str(row.get("inflight", 0)), latency, str(row.get("fingerprint") or "-"),
                      str(row.get("reason") or "")))
    lines.append(text_table(table))
    hour = doc["last_hour"]
    span = "last hour" if hour["window_s"] >= WINDOW_S - SAMPLE_EVERY_S \
        else f"since start ({_age(hour['window_s'])})"
    reroutes = sum(hour["reroutes"].values())
    tokens = hour.get("tokens")
    lines += ["", f"{span}: {_n(hour['requests'], 'request')}"
              + (f" ({_counts(hour['outcomes'])})" if hour["outcomes"] else "")
              + f"; {_n(reroutes, 'reroute')}"
              + (f" ({_counts(hour['reroutes'])})" if reroutes else "")
              + f"; {hour['blocked']} blocked; {_n(hour['resumed'], 'stream')} resumed"]
    if tokens is not None:  # (a proxy older than this command has no token figures)
        lines.append(f"tokens: {tokens['prompt']} prompt ({tokens['cached']} cached), "
                     f"{tokens['completion']} completion; cost {hour.get('cost', 0):g}")
        guessed = hour.get("tokens_estimated") or {}
        if guessed.get("prompt") or guessed.get("completion"):
            lines.append(f"estimated (answers without usage): {guessed['prompt']} prompt, "
                         f"{guessed['completion']} completion; cost "
                         f"{hour.get('cost_estimated', 0):g}")
    recent = doc.get("recent") or []
    lines += ["", "recent reroutes:" if recent else "recent reroutes: none"]
    if recent:
        events: list[tuple[str, ...]] = [("TIME", "TYPE", "REASON", "FROM -> TO", "REQUEST",
                                          "DETAIL")]
        for e in recent[-10:]:
            detail = e.get("detail") or {}
            text = detail.get("detail") or detail.get("message") or detail.get("mode") or ""
            events.append((time.strftime("%H:%M:%S", time.localtime(e["ts"])), e["type"],
                           str(e.get("reason_code") or "-"),
                           f"{e.get('from_instance') or '-'} -> {e.get('to_instance') or '-'}",
                           str(e.get("request_id") or "-"), str(text)[:80]))
        lines.append(text_table(events))
    return "\n".join(lines)


def run(url: str, admin_key: str | None, watch: bool, interval_s: float = 2.0) -> int:
    """`failover-proxy status`: print the table once (exit 1 when the proxy cannot be
    asked), or with `watch` redraw it every `interval_s` until Ctrl-C (errors are shown
    and retried: the proxy may be restarting)."""
    if not watch:
        try:
            doc = asyncio.run(fetch_status(url, admin_key))
        except StatusError as exc:
            print(f"status: {exc}", file=sys.stderr)
            return 1
        print(format_status(doc, url))
        return 0
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    # Ctrl-C (SIGINT) stops it even when started from a script in the background, where
    # the shell leaves SIGINT ignored and Python would then never raise KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:
            try:
                page = format_status(asyncio.run(fetch_status(url, admin_key)), url)
            except StatusError as exc:
                page = f"status: {exc} (retrying every {interval_s:g}s)"
            stamp = time.strftime("%H:%M:%S")
            sys.stdout.write(f"{clear}{page}\n\n{stamp}, every {interval_s:g}s; Ctrl-C stops\n")
            sys.stdout.flush()
            time.sleep(interval_s)
    except KeyboardInterrupt:
        return 0


def _audit(doc: dict[str, Any]) -> str:
    """`on`, `off`, or `on, database away` (rows wait, up to store.queue_size)."""
    if not doc.get("audit"):
        return "off"
    return "on, database away" if doc.get("audit_available") is False else "on"
