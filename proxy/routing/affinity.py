"""Prefix-cache affinity: send a prompt back to the instance that served its beginning.

A local server keeps the KV cache of the prompts it served (llama.cpp per slot, with
`cache_prompt` on by default; vLLM and SGLang with prefix caching): a request whose
beginning it has seen skips re-reading that part, which for a re-sent 20-50k-token agent
history is tens of seconds of prefill on local hardware. So each request's prompt is cut
into parts (a chat request's messages, after its tools; a text completion's prompt in
chunks of 1 KiB), hashed as a chain (key i stands for parts 0..i: the XXH3 hash
of those bytes, stable across processes; see proxy.routing.chain), and the instance that answered
is remembered under every key. XXH3 rather than a cryptographic hash: it is fast enough
to hash the whole prompt on every request, and a collision only costs a cache miss.
A later request's longest known key
says which instance has the most of it cached, and what share of the prompt that is
(`prefix_hit=0.93`, scored in proxy/routing/scoring.py).

The map is one `PrefixStore` (plain data: int keys -> (instance id, expiry)), owned by
the planner and kept across config reloads; another backing (a shared one) only has to
implement `longest` and `remember`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

from proxy.routing.chain import MAX_PARTS, TAIL, Prefix, prefix_of

__all__ = ["Affinity", "LocalPrefixStore", "Prefix", "PrefixStore", "decode_chain",
           "encode_chain", "prefix_of"]

#: Marks a key that different conversations went on from (see LocalPrefixStore._next).
_SHARED = -1


class PrefixStore(Protocol):
    """Where prefixes are remembered (one per process; a shared backing may replace it)."""

    def longest(self, keys: Sequence[int], shortest: int,
                now: float) -> tuple[int, tuple[str, ...]] | None:
        """(index into `keys`, the instances that have it) of the longest key some
        instance has (not expired), looking no shorter than index `shortest`; None when
        none is known, or when that key is shared: several conversations went on from
        it (a common system prompt), so that it says nothing of where this one lives."""
        ...

    def remember(self, keys: Sequence[int], instance_id: str, now: float) -> None:
        """`instance_id` served a prompt with these keys: it has each of them now."""
        ...

    def resident(self, instance_id: str) -> int:
        """How many conversations (distinct longest prompts) the instance served within
        the TTL and none of them has grown since elsewhere."""
        ...


class LocalPrefixStore:
    """A bounded in-process map from key to {instance id: monotonic expiry} (several
    instances have a shared system prompt cached); the least recently served keys are
    dropped first beyond `max_entries`. Per instance, the tips of the conversations it
    served (the longest key of each request), which `resident` counts."""

    def __init__(self, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[int, dict[str, float]] = OrderedDict()
        self._tips: dict[str, OrderedDict[int, float]] = {}
        #: The key that followed each key, or _SHARED once two different ones have.
        self._next: dict[int, int] = {}

    def longest(self, keys: Sequence[int], shortest: int,
                now: float) -> tuple[int, tuple[str, ...]] | None:
        """The tip and the TAIL keys before it one by one (a conversation that grew by a
        turn, or was regenerated, is found there); further back by halves, which is valid
        because a prompt's keys are remembered together (known up to some key, unknown
        after it). So a `Chain` computes a few keys, not all of them."""
        last = len(keys) - 1
        stop = max(shortest, last - TAIL)
        entries = self._entries
        for n in range(last, stop - 1, -1):  # (_live inlined: this runs per request)
            key = keys[n]
            holders = entries.get(key)
            if holders is not None:
                live = tuple([i for i, expiry in holders.items() if expiry > now])
                if live:
                    return self._found(key, n, live)
        if stop == shortest or not self._live(keys[shortest], now):
            return None
        known, unknown = shortest, stop
        while unknown - known > 1:
            mid = (known + unknown) // 2
            if self._live(keys[mid], now):
                known = mid
            else:
                unknown = mid
        key = keys[known]
        return self._found(key, known, self._live(key, now))

    def _live(self, key: int, now: float) -> tuple[str, ...]:
        holders = self._entries.get(key)
        if holders is None:
            return ()
        return tuple([i for i, expiry in holders.items() if expiry > now])

    def _found(self, key: int, n: int,
               live: tuple[str, ...]) -> tuple[int, tuple[str, ...]] | None:
        return None if self._next.get(key) == _SHARED else (n, live)

    def remember(self, keys: Sequence[int], instance_id: str, now: float) -> None:
        if self.ttl_s <= 0 or not keys:
            return
        entries = self._entries
        expiry = now + self.ttl_s
        move = entries.move_to_end
        for key in keys:
            holders = entries.get(key)
            if holders is None:
                entries[key] = {instance_id: expiry}
            else:
                holders[instance_id] = expiry
                move(key)
        successors = self._next
        for key, after in zip(keys, keys[1:]):  # noqa: B905 (one shorter on purpose)
            seen = successors.setdefault(key, after)
            if seen != after:
                successors[key] = _SHARED
        excess = len(entries) - self.max_entries
        for _ in range(excess if excess > 0 else 0):
            successors.pop(entries.popitem(last=False)[0], None)
        # The conversation's tip moves to its new end, here; its old tip, wherever it
        # was, is one of this prompt's shorter keys. (A dict's keys & a set iterate the
        # smaller of the two: an instance's few tips, or the prompt's keys.)
        shorter = set(keys[:-1])
        for tips in self._tips.values():
            for key in tips.keys() & shorter:
                del tips[key]
        tips = self._tips.setdefault(instance_id, OrderedDict())
        tips[keys[-1]] = expiry
        tips.move_to_end(keys[-1])
        while tips and (next(iter(tips.values())) <= now or len(tips) > self.max_entries):
            tips.popitem(last=False)

    def resident(self, instance_id: str) -> int:
        tips = self._tips.get(instance_id)
        return 0 if tips is None else len(tips)

    def __len__(self) -> int:
        return len(self._entries)


class Affinity:
    """The planner's prefix memory and its settings (`routing.affinity`)."""

    def __init__(self, enabled: bool, ttl_s: float, max_entries: int,
                 min_prefix_chars: int, store: PrefixStore | None = None) -> None:
        self.enabled = enabled
        self.min_prefix_chars = min_prefix_chars
        self.ttl_s = ttl_s
        self.store: PrefixStore = store or LocalPrefixStore(ttl_s, max_entries)
        #: Told (chain, instance id, TTL in seconds) of each prompt served here, the chain
        #: as `encode_chain` writes it: other replicas share it (proxy.state).
        self.on_remember: Callable[[str, str, float], None] | None = None

    def keep(self, old: Affinity) -> None:
        """A config reload: keep what the previous planner remembered, under the new
        `ttl_s` and `max_entries` (applied as entries are next served)."""
        store, mine = old.store, self.store
        if isinstance(store, LocalPrefixStore) and isinstance(mine, LocalPrefixStore):
            store.ttl_s, store.max_entries = mine.ttl_s, mine.max_entries
        self.store = store
        self.on_remember = old.on_remember

    def hit(self, prefix: Prefix | None, now: float) -> tuple[tuple[str, ...], float] | None:
        """(the instances that have it, share of the prompt it is) of the longest known
        prefix of at least `min_prefix_chars` bytes, or None."""
        if prefix is None:
            return None
        chain = prefix.chain
        shortest = chain.first_at_least(self.min_prefix_chars)
        if shortest is None:
            return None
        found = self.store.longest(chain, shortest, now)
        if found is None:
            return None
        n, holders = found
        return holders, chain.end(n) / chain.total

    def served(self, prefix: Prefix | None, instance_id: str, now: float | None = None) -> None:
        """`instance_id` answered a request with this prompt: it has it cached now (a
        prompt shorter than `min_prefix_chars` is not worth remembering)."""
        if prefix is not None and prefix.total >= self.min_prefix_chars:
            keys = prefix.keys
            self.store.remember(keys, instance_id, time.monotonic() if now is None else now)
            if self.on_remember is not None and self.ttl_s > 0:
                self.on_remember(encode_chain(keys), instance_id, self.ttl_s)

    def adopt(self, chain: str, instance_id: str, expires: float) -> None:
        """Another replica's instance served the prompt whose chain is `chain`
        (`encode_chain`), remembered until `expires` (monotonic; at most `ttl_s` from
        now); not told back. A chain
        that does not decode is ignored (another version's, or garbage)."""
        keys = decode_chain(chain)
        if keys:  # held no longer than this replica's own entry would be
            self.store.remember(keys, instance_id,
                                min(expires - self.ttl_s, time.monotonic()))


def encode_chain(keys: Sequence[int]) -> str:
    """A hash chain as text for other replicas: the keys in hex, comma-separated."""
    return ",".join([format(key, "x") for key in keys])


def decode_chain(text: str) -> tuple[int, ...] | None:
    """The keys `encode_chain` wrote, or None if `text` is not such a chain (or longer
    than MAX_PARTS keys)."""
    parts = text.split(",", MAX_PARTS)
    if len(parts) > MAX_PARTS:
        return None
    try:
        return tuple(int(part, 16) for part in parts)
    except ValueError:
        return None

