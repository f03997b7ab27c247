"""A prompt as a hash chain, for prefix-cache affinity (proxy.routing.affinity).

Key i of a prompt stands for its parts 0..i (a chat request's messages, after its tools;
a text completion's prompt in chunks of `CHUNK_BYTES`): the XXH3 hash of those bytes of
one orjson serialisation, stable across processes. A conversation that grows a turn
keeps every key of its history. Planning asks for a few keys only (`Chain`).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import orjson
from xxhash import xxh3_64, xxh3_64_intdigest

from proxy.api.inbound import CHAT, COMPLETIONS, ClientRequest

#: A text prompt is cut into parts of this many bytes (UTF-8): a prompt that grows keeps
#: the keys of its whole chunks.
CHUNK_BYTES = 1024
#: At most this many parts (messages or chunks) and bytes are hashed per request; the rest
#: of a longer prompt is never matched (it costs time on every request, and a prefix that
#: long is still found by its first parts). A mebibyte is some 250k tokens, more than a
#: local server's window; XXH3 hashes it in about 0.1 ms.
MAX_PARTS = 256
MAX_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Prefix:
    """A prompt as a hash chain (see `Chain`): `keys[i]` names parts 0..i, `ends[i]` is
    how many bytes (of the request's JSON) those parts are, `total` the bytes of every
    hashed part."""

    chain: Chain

    @property
    def keys(self) -> tuple[int, ...]:
        return self.chain.all()

    @property
    def ends(self) -> tuple[int, ...]:
        return tuple(self.chain.ends())

    @property
    def total(self) -> int:
        return self.chain.total


def prefix_of(req: ClientRequest, least: int = 1) -> Prefix | None:
    """The hash chain of a chat or text completion request's prompt (None for other
    endpoints, or a prompt of fewer than `least` bytes: proxy.routing.affinity neither
    looks up nor remembers one shorter than its `min_prefix_chars`, and a short prompt
    costs no chain). Costs one serialisation (orjson) of the messages;
    the keys are hashed when asked for (see `Chain`). A client that re-sends a message
    with its keys in another order starts a new chain there (none of the SDKs or fronts
    does)."""
    body = req.body
    if req.endpoint == CHAT:
        tools = body.get("tools") or body.get("functions")
        # Tools are rendered before the messages by chat templates.
        seed = xxh3_64_intdigest(orjson.dumps(tools)) if tools else 0
        # Only the first MAX_PARTS messages are hashed: the rest is not serialised
        # (10 000 short messages took 2 ms, 100 times 256 of them). A long message is
        # serialised whole: bounded by server.max_body_bytes, orjson writes ~2 GB/s.
        messages = body["messages"][:MAX_PARTS]
        data = orjson.dumps(messages, option=orjson.OPT_INDENT_2)
        if len(data) > MAX_BYTES:
            chain = Chain(data[:MAX_BYTES], seed, MESSAGE_END, None, None)
        else:
            # Without the closing `\n]`: the bytes of the last message end as they do
            # once the conversation has grown a turn (then followed by `,\n  {`).
            total = len(data) - 2
            if total < least:
                return None
            chain = Chain(data, seed, MESSAGE_END, None, len(messages), total)
    elif req.endpoint == COMPLETIONS:
        # A character is at least a byte: the first _TEXT_BYTES of them make at
        # least _TEXT_BYTES bytes, so the rest is never encoded (a prompt of two
        # million token ids took 20 ms to serialise whole, orjson reserving 500 MB).
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompt = prompt[:_TEXT_BYTES]
        elif isinstance(prompt, list):  # (an item and its comma are two bytes at least)
            prompt = prompt[:_TEXT_BYTES // 2 + 1]
        data = prompt.encode("utf-8", "surrogatepass") if isinstance(prompt, str) \
            else orjson.dumps(prompt)
        data = data[:_TEXT_BYTES]
        if not data or len(data) < least:
            return None
        size = len(data)
        chain = Chain(data, _COMPLETIONS_SEED, None,
                      [*range(CHUNK_BYTES, size, CHUNK_BYTES), size], None)
    else:
        return None
    return Prefix(chain) if chain.total >= max(least, 1) else None


#: The bytes of a text prompt that are hashed.
_TEXT_BYTES = min(MAX_BYTES, CHUNK_BYTES * MAX_PARTS)


#: Between two messages of the serialised `messages` (orjson, indented by two): only
#: there is a `}` indented by two (a JSON string holds no raw newline), so that the
#: count of parts is the count of messages, and the last ones are found from the end.
MESSAGE_END = b"\n  },\n  {\n"
#: Finds every MESSAGE_END in one pass (some 20% faster than a loop of bytes.find). A
#: separator never overlaps the next: it begins and ends with its only two newlines.
_MESSAGE_END = re.compile(re.escape(MESSAGE_END))
#: A message ends this many bytes into MESSAGE_END (after its `}`).
_END_AT = 4
_COMPLETIONS_SEED = xxh3_64_intdigest(b"completions")
#: How many parts before the tip `LocalPrefixStore.longest` looks at one by one: a
#: conversation that grew by a turn (or was regenerated) has its longest known prefix
#: there; further back it searches by halves.
TAIL = 3


class Chain(Sequence[int]):
    """A prompt's hash chain, computed on demand: key i is the XXH3 64-bit hash (seeded
    with the tools' hash) of the prompt's bytes up to the end of part i, and `end(i)` how
    many bytes that is. Stable across processes and machines (XXH3 of the orjson
    serialisation; https://xxhash.com: the XXH3 output is stable since xxHash 0.8.0).

    Planning asks for a few keys (the tip's, the TAIL before it, the shortest worth a
    look): their ends are found from both ends of the bytes (`bytes.rfind`/`find`, in
    C), and XXH3 hashes some 10 GB/s (16 times CRC-32 here), so that a 100-message
    request costs a few microseconds. Every key (`all`, one streaming pass) is computed
    only for the store's `remember`, after the answer; a lookup that searches the middle
    hashes each key it probes from the start of the prompt (a few probes: about as much
    as one pass).
    """

    __slots__ = ("data", "seed", "total", "_sep", "_n", "_ends", "_head", "_tail",
                 "_tail_ends", "_keys")

    def __init__(self, data: bytes, seed: int, sep: bytes | None, ends: list[int] | None,
                 parts: int | None, total: int | None = None) -> None:
        """`data`: the prompt's bytes (its first `total`; all by default); `sep` what
        separates its parts (a part ends _END_AT bytes into it), or `ends` the parts'
        ends; `parts` how many parts there are, if known (else they are found)."""
        self.data = data
        self.seed = seed
        self.total = len(data) if total is None else total
        self._sep = sep
        self._ends = ends
        self._head: list[int] = []
        self._tail: list[int] = []
        self._tail_ends: list[int] = []
        self._keys: tuple[int, ...] | None = None
        if parts is not None:
            n = parts
        elif ends is not None:
            n = len(ends)
        else:  # cut short: a prompt of more than MAX_BYTES
            ends = self._ends = self._find_all()[:MAX_PARTS]
            n = len(ends)
            self.total = ends[-1]
        self._n = n

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> int: ...

    @overload
    def __getitem__(self, i: slice) -> tuple[int, ...]: ...

    def __getitem__(self, i: int | slice) -> int | tuple[int, ...]:
        if isinstance(i, slice):
            return self.all()[i]
        n = self._n
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        if self._keys is not None or self._sep is None:
            # Parts of known ends (a text prompt's chunks): one pass hashes them all.
            return self.all()[i]
        tail = self._tail or self._find_tail()  # asked for first
        back = n - 1 - i
        if back < len(tail):
            return tail[back]
        return xxh3_64_intdigest(memoryview(self.data)[:self.end(i)], self.seed)

    def end(self, i: int) -> int:
        """Bytes of the prompt up to the end of part i (-len <= i < len, as a list's
        index); raises IndexError past that."""
        ends = self._ends
        if ends is not None:
            return ends[i]
        n = self._n
        if i < 0:  # (the head and tail lists below are indexed from their own ends)
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        back = n - 1 - i
        if back < len(self._tail_ends):
            return self._tail_ends[back]
        if i < len(self._head):
            return self._head[i]
        ends = self._ends = self._find_all()
        return ends[i]

    def first_at_least(self, least: int) -> int | None:
        """The first part index whose end is at least `least` bytes, or None."""
        if self.total < least:
            return None
        ends = self._ends
        if ends is not None:
            return bisect.bisect_left(ends, least)
        head, data, sep = self._head, self.data, self._sep
        assert sep is not None
        for n, end in enumerate(head):
            if end >= least:
                return n
        at = head[-1] if head else 0
        while len(head) < self._n - 1:
            at = data.find(sep, at) + _END_AT
            head.append(at)
            if at >= least:
                return len(head) - 1
        return self._n - 1  # the tip: `total` is at least `least`

    def all(self) -> tuple[int, ...]:
        """Every key, in order (one streaming pass over the prompt)."""
        keys = self._keys
        if keys is None:
            keys = self._keys = self._hash(self.ends())
        return keys

    def ends(self) -> list[int]:
        """Every part's end, in order."""
        if self._ends is None:
            self._ends = self._find_all()
        return self._ends

    def _hash(self, ends: Sequence[int]) -> tuple[int, ...]:
        """The keys at these ends (rising), in one pass."""
        hasher, view = xxh3_64(seed=self.seed), memoryview(self.data)
        update, digest = hasher.update, hasher.intdigest
        start = 0
        keys = []
        for end in ends:
            update(view[start:end])
            keys.append(digest())
            start = end
        return tuple(keys)

    def _find_all(self) -> list[int]:
        assert self._sep == MESSAGE_END  # (the one separator _MESSAGE_END finds)
        ends = [found.start() + _END_AT for found in _MESSAGE_END.finditer(self.data)]
        total = self.total
        if not ends or ends[-1] < total:  # (cut short just after a `}`: no tip)
            ends.append(total)
        return ends

    def _find_tail(self) -> list[int]:
        """The keys of the tip and the TAIL parts before it, tip first."""
        data, sep = self.data, self._sep
        assert sep is not None
        bound = self.total
        ends = [bound]
        for _ in range(min(TAIL, self._n - 1)):
            bound = data.rfind(sep, 0, bound)
            ends.append(bound + _END_AT)
        ends.reverse()
        tail = list(self._hash(ends))
        tail.reverse()
        ends.reverse()
        self._tail, self._tail_ends = tail, ends
        return tail
