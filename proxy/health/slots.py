"""An instance's concurrency slots: how many requests are in flight to it, and its
`max_concurrency`.

Like an asyncio.Semaphore (a waiter is woken when a slot frees, in arrival order, without
polling), with what the attempt loop needs besides: a slot can be forced (the last
candidate of a plan is never given up on), the size can change under a config reload
while requests are in flight, and the count is readable (`/admin/instances`). Taking a
free slot never awaits: only a request that has to queue does.
"""

from __future__ import annotations

import asyncio
from collections import deque


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class Slots:
    """In-flight requests of one instance and their cap (None: no cap)."""

    __slots__ = ("inflight", "cap", "_waiters")

    def __init__(self, cap: int | None = None) -> None:
        self.inflight = 0
        self.cap = cap
        self._waiters: deque[asyncio.Future[bool]] = deque()

    @property
    def waiting(self) -> int:
        """Requests queued for a slot now."""
        return len(self._waiters)

    def take(self) -> bool:
        """Take a free slot now; False when the instance is at its cap."""
        cap = self.cap
        if cap is None or self.inflight < cap:
            self.inflight += 1
            return True
        return False

    def force(self) -> None:
        """Take a slot beyond the cap (the last candidate: piling on beats failing)."""
        self.inflight += 1

    async def wait(self, timeout_s: float) -> bool:
        """Queue up to `timeout_s` seconds for a slot another request frees; True once
        this request holds it (in arrival order), False when the time ran out."""
        if timeout_s <= 0:
            return False
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(timeout_s, _expire, waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.release()  # handed a slot just as the request went away: pass it on
            raise
        finally:
            timer.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def release(self) -> None:
        """A request is done with its slot: the first waiter gets it, else it is free."""
        waiters = self._waiters
        cap = self.cap
        while waiters and (cap is None or self.inflight <= cap):
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)  # handed over: the in-flight count stays
                return
        self.inflight -= 1

    def resize(self, cap: int | None) -> None:
        """A new `max_concurrency` (a reload): waiters that now fit are let in."""
        self.cap = cap
        waiters = self._waiters
        while waiters and (cap is None or self.inflight < cap):
            waiter = waiters.popleft()
            if not waiter.done():
                self.inflight += 1
                waiter.set_result(True)
