"""Connection pools sized to a server that answers HTTP on a few threads.

llama.cpp's `llama-server` serves HTTP with cpp-httplib on a thread pool of
`--threads-http` threads (by default max(slots + 2, cores - 1): tools/server/server.cpp);
a keep-alive connection holds its thread while it is idle, until the server's own 5 s
keep-alive timeout, and requests on other connections wait behind it. So each such
instance gets an aiohttp session of its own holding no more connections than the server
serves requests at once (its `capacity`: `/props` `total_slots`, or a smaller
`max_concurrency`), and idle ones are closed after `SIZED_KEEPALIVE_S`. Probes go over the
shared session with `Connection: close` (proxy.providers.transport), so they always find
a thread. A request beyond the size waits in aiohttp for a connection (within
`first_byte_s`), as it would have waited in the server's queue.
"""

from __future__ import annotations

from collections.abc import Callable

import aiohttp

#: Idle connections to such a server are closed after this long (its own timeout is 5 s).
SIZED_KEEPALIVE_S = 1.0


class SizedPools:
    """One client session per sized instance, created at its first request; `resize`
    (from the prober) sets how many connections it may hold."""

    def __init__(self, make: Callable[[aiohttp.TCPConnector], aiohttp.ClientSession]) -> None:
        #: Makes a session over a connector (proxy.providers.transport.client_session).
        self.make = make
        self._sizes: dict[str, int | None] = {}
        self._pools: dict[str, tuple[int | None, aiohttp.ClientSession]] = {}
        #: Sessions of an old size: answers still being read on them finish; closed at exit.
        self._retired: list[aiohttp.ClientSession] = []

    def resize(self, instance_id: str, size: int | None) -> None:
        """At most `size` connections to the instance from now on (None: no bound)."""
        self._sizes[instance_id] = size

    def size(self, instance_id: str) -> int | None:
        """The connections the instance's session holds at most (None: no bound)."""
        pool = self._pools.get(instance_id)
        return None if pool is None else pool[0]

    def session(self, instance_id: str) -> aiohttp.ClientSession:
        """The instance's session at its current size (call inside the running loop)."""
        size = self._sizes.get(instance_id)
        pool = self._pools.get(instance_id)
        if pool is not None:
            if pool[0] == size:
                return pool[1]
            self._retired.append(pool[1])
        session = self.make(aiohttp.TCPConnector(
            limit=size or 0, limit_per_host=0, keepalive_timeout=SIZED_KEEPALIVE_S,
            ttl_dns_cache=300))
        self._pools[instance_id] = (size, session)
        return session

    async def close(self) -> None:
        """Close every session (at exit)."""
        for _, session in self._pools.values():
            await session.close()
        for session in self._retired:
            await session.close()
        self._pools.clear()
        self._retired.clear()
