"""The audit writer process: reads batches of rows from stdin, writes them to SQLite.

Started by `proxy.audit.store.AuditStore` as `python -m proxy.audit.writer PATH RETENTION_S
MAX_ROWS`. Each stdin line is a JSON command: `["rows", [...]]` (answered `w N` once
written, `x N` when the batch could not be written), `["flush", TOKEN]` (answered
`ok TOKEN`: everything before it is done). Only the end of stdin ends it (the proxy closed
it, or died): signals sent to the proxy's whole process group (Ctrl-C, a service manager
stopping the unit) are ignored, so rows queued during a graceful shutdown are still
written. Retention runs every minute. Acknowledgements go to the original stdout; anything
else this process might print goes to stderr.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import orjson

from proxy.audit.schema import apply_retention, connect, write_rows

RETENTION_EVERY_S = 60.0


def _say(text: str) -> None:
    print(f'{{"event": "audit_writer", "level": "error", "detail": {orjson.dumps(text).decode()}}}',
          file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    path, retention_s, max_rows = argv[0], float(argv[1]), int(argv[2])
    acks = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # stray prints must not corrupt the acknowledgements
    conn = connect(path)
    last_retention = 0.0
    for line in sys.stdin.buffer:
        try:
            command, arg = orjson.loads(line)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            _say(f"unreadable command: {line[:80]!r}")
            continue
        if command == "rows":
            try:
                write_rows(conn, arg)
                acks.write(b"w %d\n" % len(arg))
            except Exception as exc:  # noqa: BLE001 - one bad batch must not stop the writer
                _say(f"audit batch of {len(arg)} rows not written: {exc!r}")
                acks.write(b"x %d\n" % len(arg))
            now = time.monotonic()
            if now - last_retention > RETENTION_EVERY_S:
                last_retention = now
                try:
                    apply_retention(conn, retention_s, max_rows)
                except Exception as exc:  # noqa: BLE001
                    _say(f"retention failed: {exc!r}")
        elif command == "flush":
            acks.write(b"ok %d\n" % int(arg))
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
