"""The audit database's contents: the rows the writer inserts in batches, retention, and
the queries of the admin API and the `events` command (events, a request's plans, token and
cost sums), written once for both backends against proxy.audit.database.Database (the
tables themselves, in each dialect, are in proxy/audit/sqlite.py and postgres.py). No event
loop: used by the writer process, by readers, and by proxy.audit.store in a worker thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.audit.database import Database, StoreError

__all__ = ["SCHEMA_VERSION", "EVENT", "PLAN", "LINEAGE", "StoreError", "EventQuery",
           "query_events", "query_plans", "write_rows", "apply_retention", "sum_usage"]

#: Bump when the schema changes, and add the step to both backends' MIGRATIONS.
SCHEMA_VERSION = 2

EVENT_COLUMNS = ("id", "ts", "type", "request_id", "plan_id", "instance", "reason_code",
                 "from_instance", "to_instance", "detail")

# Row kinds on the queue.
EVENT = 0
PLAN = 1
LINEAGE = 2


@dataclass(frozen=True, slots=True)
class EventQuery:
    """Filters for reading events; all optional."""

    request_id: str | None = None
    type: str | None = None
    instance: str | None = None
    since: float | None = None  # unix time
    until: float | None = None  # unix time (before it)
    limit: int = 100


def query_events(db: Database, q: EventQuery) -> list[dict[str, Any]]:
    """Events matching `q`, newest first."""
    where: list[str] = []
    args: list[object] = []
    if q.request_id:
        where.append("request_id = ?")
        args.append(q.request_id)
    if q.type:
        where.append("type = ?")
        args.append(q.type)
    if q.instance:
        where.append("(instance = ? OR from_instance = ? OR to_instance = ?)")
        args += [q.instance] * 3
    if q.since is not None:
        where.append("ts >= ?")
        args.append(q.since)
    if q.until is not None:
        where.append("ts < ?")
        args.append(q.until)
    sql = f"SELECT {', '.join(EVENT_COLUMNS)} FROM events"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC LIMIT ?"
    args.append(max(1, min(q.limit, 10_000)))
    rows = []
    for row in db.execute(sql, args):
        item = dict(zip(EVENT_COLUMNS, row, strict=True))
        item["detail"] = orjson.loads(item["detail"]) if item["detail"] else None
        rows.append(item)
    return rows


PLAN_COLUMNS = ("plan_id", "request_id", "ts", "model", "plan", "selected", "final_instance",
                "outcome", "status", "attempts", "ttfb_ms", "duration_ms")


def query_plans(db: Database, request_id: str, limit: int = 20) -> list[dict[str, Any]]:
    """The route_plans rows of a request id (newest first; a client may reuse its
    x-request-id), `plan` decoded (RoutePlan.as_dict)."""
    sql = (f"SELECT {', '.join(PLAN_COLUMNS)} FROM route_plans WHERE request_id = ?"
           " ORDER BY ts DESC LIMIT ?")
    rows = []
    for row in db.execute(sql, (request_id, limit)):
        item = dict(zip(PLAN_COLUMNS, row, strict=True))
        item["plan"] = orjson.loads(item["plan"]) if item["plan"] else None
        rows.append(item)
    return rows


_INSERT_EVENTS = ("INSERT INTO events (ts, type, request_id, plan_id, instance, reason_code,"
                  " from_instance, to_instance, detail) VALUES (?,?,?,?,?,?,?,?,?)")
_PLAN_FIELDS = ("plan_id", "request_id", "ts", "model", "requirements", "plan", "selected",
                "final_instance", "outcome", "status", "attempts", "ttfb_ms", "duration_ms",
                "prompt_tokens", "completion_tokens", "cached_tokens", "cost",
                "tokens_estimated")
# (a plan id is written again when a client's request is recorded twice: the later wins)
_UPSERT_PLANS = (f"INSERT INTO route_plans ({', '.join(_PLAN_FIELDS)}) VALUES "
                 f"({','.join('?' * len(_PLAN_FIELDS))}) ON CONFLICT (plan_id) DO UPDATE SET "
                 + ", ".join(f"{f} = excluded.{f}" for f in _PLAN_FIELDS[1:]))
_INSERT_LINEAGE = ("INSERT INTO lineage (ts, kind, request_id, plan_id, from_instance,"
                   " to_instance, reason_code) VALUES (?,?,?,?,?,?,?)")


def write_rows(db: Database, rows: list[list[Any]]) -> None:
    """Insert a batch of queued rows (events, plans, lineage) in one transaction.

    A plan row is `[PLAN, plan dict, plan_id, request_id, ts, model, selected,
    final_instance, outcome, status, attempts, ttfb_ms, duration_ms, prompt_tokens,
    completion_tokens, cached_tokens, cost, tokens_estimated]` (the last five None when
    the answer has no token figures)."""
    events, plans, lineage = [], [], []
    dumps = orjson.dumps
    for row in rows:
        kind = row[0]
        if kind == EVENT:
            detail = row[9]
            events.append((*row[1:9], dumps(detail).decode() if detail else None))
        elif kind == PLAN:
            plan = row[1]
            plan_id, request_id, ts, model, *rest = row[2:]
            plans.append((plan_id, request_id, ts, model,
                          dumps(plan["requirements"]).decode(), dumps(plan).decode(), *rest))
        else:
            lineage.append(row[1:])
    with db.transaction():
        if events:
            db.executemany(_INSERT_EVENTS, events)
        if plans:
            db.executemany(_UPSERT_PLANS, plans)
        if lineage:
            db.executemany(_INSERT_LINEAGE, lineage)


def apply_retention(db: Database, retention_s: float, max_rows: int) -> None:
    """Delete rows older than the retention period, and beyond the row cap."""
    cutoff = time.time() - retention_s
    with db.transaction():
        for table in ("events", "lineage", "route_plans"):
            db.execute(f"DELETE FROM {table} WHERE ts < ?", (cutoff,))
        for table in ("events", "lineage"):
            db.execute(f"DELETE FROM {table} WHERE id <= (SELECT MAX(id) FROM {table}) - ?",
                       (max_rows,))
        db.execute("DELETE FROM route_plans WHERE ts < (SELECT ts FROM route_plans"
                   " ORDER BY ts DESC LIMIT 1 OFFSET ?)", (max_rows - 1,))


SUM_COLUMNS = ("instance", "model", "requests", "prompt_tokens", "completion_tokens",
               "cached_tokens", "cost", "estimated", "no_usage")


def sum_usage(db: Database, since: float | None, until: float | None) -> list[dict[str, Any]]:
    """Tokens and cost of the requests recorded in `[since, until)` (unix seconds, either
    open), one row per (instance that answered, model asked for), ordered by both:
    `{instance, model, requests, prompt_tokens, completion_tokens, cached_tokens, cost,
    estimated, no_usage}`. `estimated` counts the requests whose tokens were estimated
    (no `usage` in the answer) and are included in the sums; `no_usage` those with no
    figures at all (failed, or recorded before token figures were kept)."""
    where, args = [], []
    if since is not None:
        where.append("ts >= ?")
        args.append(since)
    if until is not None:
        where.append("ts < ?")
        args.append(until)
    sql = ("SELECT final_instance, model, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens),"
           " SUM(cached_tokens), SUM(cost),"
           " SUM(CASE WHEN tokens_estimated = 1 THEN 1 ELSE 0 END),"
           " SUM(CASE WHEN prompt_tokens IS NULL THEN 1 ELSE 0 END) FROM route_plans"
           + (" WHERE " + " AND ".join(where) if where else "")
           + " GROUP BY final_instance, model")
    out = []
    for instance, model, *figures in db.execute(sql, args):
        requests, prompt, completion, cached, cost, estimated, no_usage = figures
        out.append({"instance": instance, "model": model, "requests": int(requests),
                    "prompt_tokens": int(prompt or 0), "completion_tokens": int(completion or 0),
                    "cached_tokens": int(cached or 0), "cost": round(float(cost or 0.0), 8),
                    "estimated": int(estimated or 0), "no_usage": int(no_usage or 0)})
    out.sort(key=lambda r: (r["instance"] or "", r["model"] or ""))
    return out
