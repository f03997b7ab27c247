"""Session stickiness: which instance served a session last, so it keeps serving it.

Local servers keep the prompt cache of a conversation warm; sending the next turn to the
same one saves re-reading the whole history. Entries expire after `sticky_ttl_s`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class SessionTable:
    """A bounded map from session key to (instance id, expiry), oldest evicted first."""

    def __init__(self, ttl_s: float, max_entries: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()
        #: Told (key, instance id, TTL in seconds) of a new or changed entry, or of one
        #: past half its TTL refreshed: other replicas share it (proxy.state).
        self.on_remember: Callable[[str, str, float], None] | None = None

    def get(self, key: str | None, now: float | None = None) -> str | None:
        """The instance serving this session, or None if unknown or expired."""
        if key is None:
            return None
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= (time.monotonic() if now is None else now):
            del self._entries[key]
            return None
        return entry[0]

    def remember(self, key: str | None, instance_id: str, now: float | None = None) -> None:
        """Record that `instance_id` served the session (refreshing its expiry)."""
        if key is None or self.ttl_s <= 0:
            return
        entries = self._entries
        now = time.monotonic() if now is None else now
        prev = entries.get(key)
        entries[key] = (instance_id, now + self.ttl_s)
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
        if self.on_remember is not None and (
                prev is None or prev[0] != instance_id or prev[1] - now < self.ttl_s / 2):
            self.on_remember(key, instance_id, self.ttl_s)

    def adopt(self, key: str, instance_id: str, expires: float) -> None:
        """Another replica's entry, expiring at `expires` (monotonic; held no longer than
        an entry of this replica's own, whatever the other's TTL or clock); not told back."""
        if self.ttl_s <= 0:
            return
        entries = self._entries
        entries[key] = (instance_id, min(expires, time.monotonic() + self.ttl_s))
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
