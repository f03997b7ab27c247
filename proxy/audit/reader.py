"""Reading the audit database from the proxy (the admin API, the status page's request
view): one connection, used by one thread of its own, each read bounded in time.

A database that is away answers at once (StoreUnavailable: refused, or the connection was
lost); one that is frozen or overloaded is cut off after `timeout_s` (StoreUnavailable
again, and on PostgreSQL the server itself cancels a statement past
proxy.audit.postgres.READ_TIMEOUT_MS). Reads run one at a time on their own thread, so a
stuck one holds up only the reads queued behind it (each of which gives up on time too),
never the event loop or the default executor's threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from proxy.audit.database import Database, StoreUnavailable, open_database, redact_url

T = TypeVar("T")


class StoreReader:
    """Reads of the database at `url` (read-only connection, opened when first needed and
    again after it was lost)."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._db: Database | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-read")

    async def read(self, fn: Callable[[Database], T]) -> T:
        """`fn(db)` on the reader's thread. StoreUnavailable when the database cannot be
        reached or does not answer within `timeout_s`."""
        future = asyncio.get_running_loop().run_in_executor(self._thread, self._run, fn)
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            raise StoreUnavailable(f"{redact_url(self.url)}: no answer within "
                                   f"{self.timeout_s:g} s") from None

    def _run(self, fn: Callable[[Database], T]) -> T:
        try:
            return fn(self._connection())
        except StoreUnavailable:
            # once more on a new connection: a server restarted since the last read ended
            # the old one
            self._forget()
        try:
            return fn(self._connection())
        except StoreUnavailable:
            self._forget()
            raise

    def _connection(self) -> Database:
        if self._db is None:
            self._db = open_database(self.url, readonly=True)
        return self._db

    def _forget(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def close(self) -> None:
        """Close the connection (not waiting long for a read that is stuck)."""
        future = asyncio.get_running_loop().run_in_executor(self._thread, self._forget)
        try:
            await asyncio.wait_for(future, 2.0)
        except TimeoutError:
            pass
        self._thread.shutdown(wait=False, cancel_futures=True)
