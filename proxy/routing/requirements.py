"""What a request needs from an instance, read cheaply from its body and headers.

Nothing here parses more than it must: token counts are estimated from text length, and
the tag classifier looks at the last user message only.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.api.inbound import CHAT, COMPLETIONS, ClientRequest
from proxy.audit.schema import requirements_doc

TAGS_HEADER = "x-route-tags"
PREFER_HEADER = "x-route-prefer"
PREFERENCES = ("local", "cloud", "cheap", "fast")

#: Rough characters per token for English text and code; an estimate, never a count.
CHARS_PER_TOKEN = 4
#: What one image part costs in context, roughly (providers charge hundreds to ~1,500).
IMAGE_TOKENS = 1000
#: Per-message overhead of chat templates (role markers, separators).
MESSAGE_TOKENS = 4

_WORD = re.compile(r"[a-z0-9_#+.]+")
#: Every byte _WORD does not match (as an ASCII character), to a space: for ASCII text,
#: bytes.translate and split find the same words as _WORD, some 3 times faster than
#: str.translate (which looks each character up in a dict).
_SEPARATORS = bytes(c if c < 128 and _WORD.fullmatch(chr(c)) else 32 for c in range(256))
_CODING = frozenset("""
    python java javascript typescript rust golang go c++ c# csharp kotlin swift ruby php
    sql regex bash shell powershell code coding bug bugs debug compile compiler exception
    traceback stacktrace segfault function functions method class classes variable
    refactor unittest pytest api json yaml dockerfile git algorithm recursion def async
    await lambda null pointer syntax script library package import module npm pip cargo
""".split())
_FRONTEND = frozenset("""
    css html react vue svelte angular frontend front-end tailwind dom jsx tsx component
    components ui ux layout flexbox grid responsive browser webpack vite nextjs next.js
    button stylesheet scss sass
""".split())
#: The two sets as bytes, for the words of ASCII text (see _SEPARATORS).
_CODING_BYTES = frozenset(word.encode() for word in _CODING)
_FRONTEND_BYTES = frozenset(word.encode() for word in _FRONTEND)
_CODE_MARKERS = ("```", "def ", "function ", "=>", "();", "#include", "import ")
_CODE_MARKER = re.compile("|".join(re.escape(m) for m in _CODE_MARKERS))


@dataclass(slots=True)
class Requirements:
    """The request's needs; plain data, recorded in the plan, never changed once made (not
    a frozen dataclass: its __init__ took a microsecond per request, 5 times as long)."""

    prompt_tokens: int
    ctx_needed: int
    capabilities: frozenset[str]
    tags: tuple[str, ...]
    tags_source: str  # header | classifier
    prefer: str | None
    session: str | None
    #: What of the OpenAI protocol the request uses beyond one chat answer: `completions`,
    #: `embeddings`, `n>1`; not every upstream protocol can express it.
    protocol: frozenset[str] = frozenset()

    def values(self) -> tuple[Any, ...]:
        """Its proxy.audit.schema.REQUIREMENT_FIELDS values, sets as sorted lists (how a
        request's audit entry carries them)."""
        return (self.prompt_tokens, self.ctx_needed, sorted(self.capabilities), list(self.tags),
                self.tags_source, self.prefer, self.session, sorted(self.protocol))

    def as_dict(self) -> dict[str, Any]:
        return requirements_doc(self.values())


def extract(req: ClientRequest, headers: Mapping[str, str], default_max_tokens: int,
            session_header: str = "x-session-id") -> Requirements:
    """Read a request's requirements; `headers` is looked up with lower-case names."""
    body = req.body
    capabilities: set[str] = set()
    if body.get("tools") or body.get("functions"):
        capabilities.add("tools")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        capabilities.add("json")

    if req.endpoint == CHAT:
        chars, images, last_user = _chat_text(body["messages"])
        prompt_tokens = chars // CHARS_PER_TOKEN + images * IMAGE_TOKENS \
            + MESSAGE_TOKENS * len(body["messages"])
        if images:
            capabilities.add("vision")
    else:
        text = body.get("prompt") if req.endpoint == COMPLETIONS else body.get("input")
        last_user = text if isinstance(text, str) else ""
        chars = _text_length(text)
        prompt_tokens = chars // CHARS_PER_TOKEN + 1

    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        max_tokens = default_max_tokens if req.endpoint != "embeddings" else 0

    header_tags = headers.get(TAGS_HEADER)
    tags = _header_tags(header_tags) if header_tags else ()
    if tags:
        source = "header"
    else:
        tags = classify(last_user)
        source = "classifier"

    prefer = (headers.get(PREFER_HEADER) or "")[:16].strip().lower() or None
    if prefer not in PREFERENCES:
        prefer = None

    session = _session_key(headers.get(session_header))
    if session is None:
        user = body.get("user")
        session = _session_key(user if isinstance(user, str) else None)

    protocol = set()
    if req.endpoint != CHAT:
        protocol.add(req.endpoint)
    choices = body.get("n")
    if isinstance(choices, int) and not isinstance(choices, bool) and choices > 1:
        protocol.add("n>1")

    # In the order of the fields (keywords cost more than the construction itself).
    return Requirements(prompt_tokens, prompt_tokens + max_tokens,
                        frozenset(capabilities) if capabilities else _NOTHING, tags, source,
                        prefer, session, frozenset(protocol) if protocol else _NOTHING)


#: No capabilities, no protocol beyond one chat answer: most requests' (one shared set).
_NOTHING: frozenset[str] = frozenset()
_TAG = re.compile(r"[a-z0-9][a-z0-9_.:-]{0,63}")
_SAFE_SESSION = re.compile(r"[\x21-\x7e]{1,256}")


def _header_tags(value: str) -> tuple[str, ...]:
    """Tags from `x-route-tags`: at most 16, each a short lower-case name; others ignored."""
    tags = []
    for part in value.split(",", 16)[:16]:
        tag = part.strip().lower()
        if _TAG.fullmatch(tag):
            tags.append(tag)
    return tuple(tags)


def _session_key(value: str | None) -> str | None:
    """A session key safe to keep and record: printable ASCII as is, anything else hashed."""
    if not value:
        return None
    if _SAFE_SESSION.fullmatch(value):
        return value
    raw = value.encode("utf-8", "surrogateescape")
    return "h:" + hashlib.blake2b(raw, digest_size=12).hexdigest()


def classify(text: str) -> tuple[str, ...]:
    """Tags for a prompt: `coding`, `frontend` (which implies coding), else `general`."""
    if not text:
        return ("general",)
    sample = text[:4000].lower()
    # The words _WORD finds, as a list (the sets look each one up: no set is built).
    if sample.isascii():
        ascii_words = sample.encode().translate(_SEPARATORS).split()
        frontend = not _FRONTEND_BYTES.isdisjoint(ascii_words)
        coding = frontend or not _CODING_BYTES.isdisjoint(ascii_words)
    else:
        words = _WORD.findall(sample)
        frontend = not _FRONTEND.isdisjoint(words)
        coding = frontend or not _CODING.isdisjoint(words)
    coding = coding or _CODE_MARKER.search(sample) is not None
    if frontend:
        return ("coding", "frontend")
    if coding:
        return ("coding",)
    return ("general",)


def _text_length(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_length(v) for v in value)
    return 0


def _chat_text(messages: list[Any]) -> tuple[int, int, str]:
    """(characters of text, image parts, text of the last user message).

    The messages are objects (proxy.api.inbound checked them). This runs for every
    request, over histories of hundreds of messages: the loop does as little per message
    as it can, and the last user message is found from the end.
    """
    chars = images = 0
    for message in messages:
        content = message.get("content")
        if content.__class__ is str:  # (parsed JSON: no subclass)
            chars += len(content)
        elif isinstance(content, list):
            more, seen, _ = _parts(content)
            chars += more
            images += seen
        if "tool_calls" in message:
            calls = message["tool_calls"]
            if calls:
                chars += len(str(calls))
    last_user = ""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                last_user = content
            elif isinstance(content, list):
                last_user = _parts(content)[2]
            break
    return chars, images, last_user


def _parts(content: list[Any]) -> tuple[int, int, str]:
    """(characters of text, image parts, the texts joined) of a content array."""
    chars = images = 0
    texts = []
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
            chars += len(part["text"])
        elif kind in ("image_url", "input_image", "image"):
            images += 1
    return chars, images, " ".join(texts)
