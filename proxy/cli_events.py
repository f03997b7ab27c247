"""`failover-proxy events`: the audit trail read straight from the store (SQLite or
PostgreSQL, proxy.audit.database), as a table or JSON; `--sum` adds up the tokens and cost
of a period by instance and model (proxy.audit.schema.sum_usage).

Its errors name the store by its URL without the password."""

from __future__ import annotations

import argparse
import sys
import time

import orjson

from proxy.api.admin import parse_event_query
from proxy.api.errors import ProxyError
from proxy.audit.database import StoreError, StoreUnavailable, open_database
from proxy.audit.schema import query_events, sum_usage


def run(args: argparse.Namespace, url: str) -> int:
    """Exit 0 with the rows printed; 2 on a malformed filter; 1 when the store cannot be
    read (no database there, PostgreSQL unreachable)."""
    params = {k: str(v) for k, v in (("request_id", args.request_id), ("type", args.type),
                                     ("instance", args.instance), ("since", args.since),
                                     ("until", args.until), ("limit", args.limit))
              if v is not None}
    if args.sum and (args.request_id or args.type or args.instance):
        print("events: --sum adds up a period (--since, --until); it takes no --request-id, "
              "--type or --instance", file=sys.stderr)
        return 2
    try:
        query = parse_event_query(params)
    except ProxyError as exc:
        print(f"events: {exc.message}", file=sys.stderr)
        return 2
    try:
        db = open_database(url, readonly=True)
        try:
            if args.sum:
                sums = sum_usage(db, query.since, query.until)
            else:
                rows = query_events(db, query)
        finally:
            db.close()
    except StoreUnavailable as exc:
        print(f"events: cannot reach the audit database: {exc}", file=sys.stderr)
        return 1
    except StoreError as exc:
        print(f"events: {exc}", file=sys.stderr)
        return 1
    out = sums if args.sum else rows
    if args.json:
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif args.sum:
        print(period(query.since, query.until))
        print(format_sums(sums))
    else:
        print(format_events(rows))
    return 0


def add_arguments(events: argparse.ArgumentParser) -> None:
    where = events.add_mutually_exclusive_group()
    where.add_argument("--config", "-c", help="read the store named by this config")
    where.add_argument("--store", help="a store url: sqlite:///PATH or "
                                       "postgresql://USER:PASS@HOST:PORT/DB "
                                       "(default: the store of ./failover-proxy.yaml if "
                                       "there is one, else sqlite:///./data/audit.db)")
    events.add_argument("--request-id", help="only this request")
    events.add_argument("--type", help="only this event type, e.g. REROUTED")
    events.add_argument("--instance", help="only events about this instance")
    events.add_argument("--since", help="unix seconds, ISO-8601, or an age: 15m, 2h, 1d")
    events.add_argument("--until", help="before this time (same forms as --since)")
    events.add_argument("--limit", type=int, default=50, help="newest N (default 50)")
    events.add_argument("--sum", action="store_true",
                        help="tokens and cost of the requests in --since/--until, by instance "
                             "and model, instead of the events")
    events.add_argument("--json", action="store_true", help="JSON for scripts")


def _stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def period(since: float | None, until: float | None) -> str:
    """`requests from 2026-11-30 14:00:00 to now` for the head of a sum."""
    return (f"requests from {'the start' if since is None else _stamp(since)} to "
            f"{'now' if until is None else _stamp(until)}")


def format_sums(rows: list[dict[str, object]]) -> str:
    """sum_usage rows as a table with a total line; ESTIMATED is how many of the requests
    came without usage (their tokens are the estimate), NO USAGE how many have no figures
    (failed before an answer)."""
    from proxy.cli import text_table

    header = ("INSTANCE", "MODEL", "REQUESTS", "PROMPT", "COMPLETION", "CACHED", "COST",
              "ESTIMATED", "NO USAGE")
    keys = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost",
            "estimated", "no_usage")
    table: list[tuple[str, ...]] = [header]
    totals = dict.fromkeys(keys, 0.0)
    for row in rows:
        for key in keys:
            totals[key] += float(row[key])  # type: ignore[arg-type]
        table.append((str(row["instance"] or "-"), str(row["model"] or "-"),
                      *(_figure(key, row[key]) for key in keys)))
    if len(rows) > 1:
        table.append(("total", "", *(_figure(key, totals[key]) for key in keys)))
    return text_table(table) + ("\n(no requests)" if not rows else "")


def _figure(key: str, value: object) -> str:
    if key == "cost":
        return f"{float(value):.6f}".rstrip("0").rstrip(".")  # type: ignore[arg-type]
    return str(int(value))  # type: ignore[call-overload]


def format_events(rows: list[dict[str, object]]) -> str:
    """Events as a readable table, oldest first."""
    from proxy.cli import text_table

    header = ("TIME", "TYPE", "REQUEST", "INSTANCE", "REASON", "FROM -> TO", "DETAIL")
    table: list[tuple[str, ...]] = [header]
    for row in reversed(rows):
        ts = float(row["ts"])  # type: ignore[arg-type]
        stamp = _stamp(ts) + f".{int(ts % 1 * 1000):03d}"
        move = ""
        if row.get("from_instance") or row.get("to_instance"):
            move = f"{row.get('from_instance') or '-'} -> {row.get('to_instance') or '-'}"
        detail = row.get("detail")
        text = ""
        if isinstance(detail, dict):
            text = ", ".join(f"{k}={v}" for k, v in detail.items() if v not in (None, [], {}))
        table.append((stamp, str(row["type"]), str(row.get("request_id") or "-")[:24],
                      str(row.get("instance") or "-"), str(row.get("reason_code") or "-"),
                      move or "-", text[:100]))
    return text_table(table) + ("\n(no events)" if len(table) == 1 else "")
