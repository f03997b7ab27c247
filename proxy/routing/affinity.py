"""Prefix-cache affinity: send a prompt back to the instance that served its beginning.

A local server keeps the KV cache of the prompts it served (llama.cpp per slot, with
`cache_prompt` on by default; vLLM and SGLang with prefix caching): a request whose
beginning it has seen skips re-reading that part, which for a re-sent 20-50k-token agent
history is tens of seconds of prefill on local hardware. So each request's prompt is cut
into parts (a chat request's tools, then each message; a text completion's prompt in
chunks of `CHUNK_BYTES`), hashed as a chain (key i stands for parts 0..i: CRC-32 of
those bytes with their length, stable across processes), and the instance that answered
is remembered under every key. CRC-32 rather than a cryptographic hash: it is chained in C
without a copy per part, and a collision (the same CRC and length) only costs a cache
miss. A later request's longest known key
says which instance has the most of it cached, and what share of the prompt that is
(`prefix_hit=0.93`, scored in proxy/routing/scoring.py).

The map is one `PrefixStore` (plain data: int keys -> (instance id, expiry)), owned by
the planner and kept across config reloads; another backing (a shared one) only has to
implement `longest` and `remember`.
"""

from __future__ import annotations

import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from proxy.api.inbound import CHAT, COMPLETIONS, ClientRequest

#: A text prompt is cut into parts of this many bytes (UTF-8): a prompt that grows keeps
#: the keys of its whole chunks.
CHUNK_BYTES = 1024
#: At most this many parts (messages or chunks) and bytes are hashed per request; the rest
#: of a longer prompt is never matched (it costs time on every request, and a prefix that
#: long is still found by its first parts).
MAX_PARTS = 256
MAX_BYTES = 4 << 20
#: A message text longer than twice this many characters is hashed by its length, its
#: head and its tail: a history of 50k tokens costs as much as a short one. (An edit in
#: the middle of a long message that keeps its length is then not seen: at worst a
#: request goes where its prefix is not cached.)
SAMPLE_CHARS = 512


@dataclass(frozen=True, slots=True)
class Prefix:
    """A prompt as a hash chain: `keys[i]` names parts 0..i, `ends[i]` is how many bytes
    (of the request's JSON) those parts are, `total` the bytes of every hashed part."""

    keys: tuple[int, ...]
    ends: tuple[int, ...]

    @property
    def total(self) -> int:
        return self.ends[-1]


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
        entries = self._entries
        for n in range(len(keys) - 1, shortest - 1, -1):
            holders = entries.get(keys[n])
            if holders is not None:
                live = tuple(i for i, expiry in holders.items() if expiry > now)
                if live:
                    return None if self._next.get(keys[n]) == _SHARED else (n, live)
        return None

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
        # was, is one of this prompt's shorter keys.
        for tips in self._tips.values():
            for key in keys[:-1]:
                tips.pop(key, None)
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


def prefix_of(req: ClientRequest) -> Prefix | None:
    """The hash chain of a chat or text completion request's prompt (None for other
    endpoints, or an empty prompt). Costs a serialisation (orjson) and a CRC update per
    message, of at most about 2 x SAMPLE_CHARS of its text. A client that re-sends a
    message with its keys in another order starts a new chain there (none of the SDKs
    or fronts does)."""
    body = req.body
    keys: list[int] = []
    ends: list[int] = []
    crc = size = 0
    if req.endpoint == CHAT:
        tools = body.get("tools") or body.get("functions")
        if tools:  # rendered before the messages by chat templates
            crc = zlib.crc32(orjson.dumps(tools))
        crc32 = zlib.crc32
        for message in body["messages"][:MAX_PARTS]:
            part, length = _material(message)
            size += length
            if size > MAX_BYTES:
                break
            crc = crc32(part, crc)
            keys.append(crc << 32 | size)
            ends.append(size)
    elif req.endpoint == COMPLETIONS:
        prompt = body.get("prompt")
        data = prompt.encode("utf-8", "surrogatepass") if isinstance(prompt, str) \
            else orjson.dumps(prompt)
        crc = zlib.crc32(b"completions")
        for start in range(0, min(len(data), MAX_BYTES, CHUNK_BYTES * MAX_PARTS), CHUNK_BYTES):
            chunk = data[start:start + CHUNK_BYTES]
            crc = zlib.crc32(chunk, crc)
            size = start + len(chunk)
            keys.append(crc << 32 | size)
            ends.append(size)
    if not keys or not ends[-1]:
        return None
    return Prefix(tuple(keys), tuple(ends))


def _material(message: Any) -> tuple[bytes, int]:
    """(what is hashed of a chat message, how many bytes of the prompt it stands for).
    A long text, whether the content itself or a `text` part of a content list (the
    shape OpenAI's SDKs and agents send), is hashed by its length, head and tail."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str) and len(content) > 2 * SAMPLE_CHARS:
        sampled = {**message, "content": _sample(content)}
        part = orjson.dumps(sampled)
        return part, len(part) + len(content) - len(sampled["content"])
    if isinstance(content, list) and any(_long_text(p) for p in content):
        left_out = 0
        parts = []
        for p in content:
            if _long_text(p):
                text = p["text"]
                parts.append({**p, "text": _sample(text)})
                left_out += len(text) - len(parts[-1]["text"])
            else:
                parts.append(p)
        part = orjson.dumps({**message, "content": parts})
        return part, len(part) + left_out
    part = orjson.dumps(message)
    return part, len(part)


def _long_text(part: Any) -> bool:
    return isinstance(part, dict) and isinstance(text := part.get("text"), str) \
        and len(text) > 2 * SAMPLE_CHARS


def _sample(text: str) -> str:
    """A long text as its length, head and tail (SAMPLE_CHARS each)."""
    return f"{len(text)}:{text[:SAMPLE_CHARS]}{text[-SAMPLE_CHARS:]}"


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
        ends = prefix.ends
        shortest = _first_at_least(ends, self.min_prefix_chars)
        if shortest is None:
            return None
        found = self.store.longest(prefix.keys, shortest, now)
        if found is None:
            return None
        n, holders = found
        return holders, ends[n] / ends[-1]

    def served(self, prefix: Prefix | None, instance_id: str, now: float | None = None) -> None:
        """`instance_id` answered a request with this prompt: it has it cached now (a
        prompt shorter than `min_prefix_chars` is not worth remembering)."""
        if prefix is not None and prefix.ends[-1] >= self.min_prefix_chars:
            self.store.remember(prefix.keys, instance_id,
                                time.monotonic() if now is None else now)
            if self.on_remember is not None and self.ttl_s > 0:
                self.on_remember(encode_chain(prefix.keys), instance_id, self.ttl_s)

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


def _first_at_least(ends: tuple[int, ...], least: int) -> int | None:
    """The first index whose end is at least `least` (ends rise), or None."""
    if ends[-1] < least:
        return None
    for n, end in enumerate(ends):
        if end >= least:
            return n
    return None  # unreachable: the last one is
