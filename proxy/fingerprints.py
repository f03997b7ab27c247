"""Fingerprints: is the server at an address still serving the model it is supposed to?

A false mismatch takes a good server out of rotation and is as bad as a missed one, so
matching tolerates how providers alias models: dated snapshots (`gpt-4o-mini` answered as
`gpt-4o-mini-2024-07-18`), `:latest` tags, file paths and `.gguf` suffixes, case.
"""

from __future__ import annotations

import re

import orjson

_SNAPSHOT = re.compile(
    r"[-_@:.]("
    r"\d{4}-?\d{2}-?\d{2}"            # 2024-07-18, 20241022
    r"|\d{2}-?\d{2}"                  # 0613, 07-18
    r"|v?\d+(\.\d+)*"                 # v2, 001, 1.5
    r"|latest|preview|instruct-\d+"
    r")$"
)
_QUANT = re.compile(r"[-_.](q\d[\w]*|f16|f32|bf16|fp16|gguf)$")


def normalize(name: str) -> str:
    """Lower-case, without directories, `.gguf`, `:latest` or a `models/` prefix."""
    n = name.strip().lower()
    if "/" in n:
        n = n.rsplit("/", 1)[1]
    if n.endswith(".gguf"):
        n = n[:-5]
    for suffix in (":latest", "-latest"):
        if n.endswith(suffix):
            n = n[: -len(suffix)]
    return n


def models_match(expected: str, seen: str) -> bool:
    """Whether a server reporting `seen` serves the model pinned as `expected`."""
    if expected == seen:
        return True  # the common case, checked on every response: no normalising
    a, b = normalize(expected), normalize(seen)
    if a == b:
        return True
    if b.startswith(a):
        return _is_variant_suffix(b[len(a):])
    if a.startswith(b):
        return _is_variant_suffix(a[len(b):])
    return False


def _is_variant_suffix(rest: str) -> bool:
    """True for what providers append to a model name for the same model: a date, a
    version, a quantisation tag. `-mini` or `-70b` are other models."""
    return bool(_SNAPSHOT.fullmatch(rest) or _QUANT.fullmatch(rest))


def any_match(expected: str, listed: list[str]) -> bool:
    return any(models_match(expected, m) for m in listed)


_MODEL_VALUE = re.compile(rb'"model"[ \t\r\n]*:[ \t\r\n]*"([^"\\]*)"')


def response_model(body: bytes) -> str | None:
    """The top-level `model` of a JSON response body, read without parsing it all.

    In JSON text an unescaped `"model"` can only be a key, so a scan is exact enough;
    anything unusual falls back to a full parse.
    """
    at = body.find(b'"model"')
    if at < 0:
        return None
    simple = _MODEL_VALUE.match(body, at)
    if simple is not None:
        return simple.group(1).decode("utf-8", "replace")
    i = at + 7
    n = len(body)
    while i < n and body[i] in b" \t\r\n":
        i += 1
    if i < n and body[i] == 0x3A:  # ':'
        i += 1
        while i < n and body[i] in b" \t\r\n":
            i += 1
        if i < n and body[i] == 0x22:  # '"'
            end = body.find(b'"', i + 1)
            if end > 0 and b"\\" not in body[i + 1:end]:
                return body[i + 1:end].decode("utf-8", "replace")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    model = obj.get("model") if isinstance(obj, dict) else None
    return model if isinstance(model, str) else None
