"""Fingerprints: what the server at an address serves, and whether that has changed.

`fingerprint: auto` (the default) learns what a server serves at its first good probe and
pins that; `{model: X}` pins X. `metadata.model` is a label: when the server does not list
it, that is a warning (the label names the instance for people and for `model` in client
requests), never a reason to stop routing. What counts as the server's identity:

- llama.cpp: `/props` `model_alias` (the `--alias`, else the `-m` path or `-hf` repo) and
  `model_path` (llama.cpp server, tools/server/server-context.cpp, as vendored in
  llama-cpp-python 0.3.36); its `/v1/models` ids and `aliases` when `/props` is missing.
- Ollama: the `name`s of `/api/tags`; LM Studio, vLLM (`--served-model-name`), gateways
  and clouds: the `id`s of `/v1/models`.

A server that lists several models (Ollama, LM Studio, vLLM with several, gateways) is
pinned to that set. It stays the same server while the model the label names (or, with a
label it does not list, any model of the learned set) is still listed: models being added
to or removed around it are taken in silently. It is another server (MISMATCH) when that
model vanishes, when a one-model server reports another model, or when llama.cpp reports
another weights file. A response's `model` is compared with what is known to be served,
and an empty or missing one claims nothing.

A false mismatch takes a good server out of rotation and is as bad as a missed one, so
matching tolerates how providers alias one model: dated snapshots (`gpt-4o-mini` answered
as `gpt-4o-mini-2024-07-18`), `:latest` tags, directories, `.gguf` and quantisation
suffixes, case. `-mini`, `-70b` or `-instruct` make another model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

CONFIGURED = "configured"
LEARNED = "learned"

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


def any_match(expected: str, listed: tuple[str, ...] | list[str]) -> bool:
    """Whether `expected` is one of `listed`, up to aliasing (see `models_match`)."""
    return any(models_match(expected, m) for m in listed)


@dataclass(frozen=True, slots=True)
class Served:
    """What one probe saw a server say it serves.

    `models`: every name it serves under (llama.cpp: `model_alias` and `model_path`; a
    listing: every id), without duplicates. `identity`: the one model of a one-model server
    (llama.cpp's alias, a listing of exactly one id), else None. `detail`: llama.cpp's
    model file path.
    """

    models: tuple[str, ...]
    identity: str | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class Pin:
    """What an instance is known to serve: learned at a probe, or configured."""

    source: str  # CONFIGURED | LEARNED
    #: Every name it was seen serving under (the configured name alone for CONFIGURED).
    models: tuple[str, ...]
    #: The model that answers its requests, when known: the configured one, a one-model
    #: server's identity, or the listed model the label names. None: one of `models`.
    name: str | None = None
    #: The names whose disappearance makes it another server: the model(s) the label
    #: names, or with a label it does not list, the whole learned set.
    keep: tuple[str, ...] = ()
    #: llama.cpp's model file: the same alias on another file is another model.
    detail: str | None = None
    #: `metadata.model`, which requests carry as `model`: an echo of it claims nothing.
    label: str | None = None

    def contradicted_by(self, seen: str | None) -> bool:
        """Whether a response's `model` says a model this instance does not serve
        answered. An empty or missing `model` (Azure OpenAI's prompt-filter first event
        has `"model": ""`) claims nothing. Runs once per response: the usual answer
        (the pinned name itself) costs one comparison."""
        if not seen or seen == self.name or seen == self.label or seen in self.models:
            return False
        return not any_match(seen, self.models)

    def describe(self) -> str:
        """The pin for messages: its name, or the learned set."""
        return self.name or show(self.models)


def configured(model: str, label: str | None) -> Pin:
    """The pin of `fingerprint: {model: X}`."""
    return Pin(CONFIGURED, (model,), model, (model,), None, label)


def learn(served: Served, label: str | None) -> Pin:
    """The pin for what a server serves now (`fingerprint: auto`, at a good probe)."""
    models = served.models
    named = tuple(m for m in models if models_match(label, m)) if label else ()
    name = served.identity or (named[0] if named else None)
    return Pin(LEARNED, models, name, named or models, served.detail, label)


def judge(pin: Pin, served: Served) -> tuple[Pin, str | None]:
    """(the pin to keep, why the server is not the pinned one or None) after a probe.

    A server still serving the pinned model(s) whose listing changed around them gets its
    learned pin updated (so the caller sees a new Pin object); one that is not, MISMATCH.
    """
    listed = served.models
    if pin.source == CONFIGURED:
        if pin.name is not None and any_match(pin.name, listed):
            return pin, None
        return pin, f"serves {show(listed)}, not the configured model {pin.describe()}"
    if pin.detail and served.detail and _file(pin.detail) != _file(served.detail):
        return pin, (f"loaded the file {served.detail}, not the learned {pin.detail}"
                     + (f" (as {served.identity})" if served.identity else ""))
    if not any(any_match(k, listed) for k in pin.keep):
        return pin, f"serves {show(listed)}, not the learned {show(pin.keep)}"
    if listed == pin.models and served.detail == pin.detail:
        return pin, None  # nothing changed: the usual probe
    if pin.detail and not served.detail:
        return pin, None  # llama.cpp answered without /props this time: it says less
    return learn(served, pin.label), None


def label_warning(label: str | None, served: Served, checks_names: bool) -> str | None:
    """A warning when the configured label is not among what the server serves, or None.

    `checks_names`: whether the server refuses a request naming a model it does not serve
    (Ollama, LM Studio, vLLM and clouds answer 404; llama.cpp ignores `model`).
    """
    if not label or not served.models or any_match(label, served.models):
        return None
    text = f"metadata.model {label!r} is not a model this server lists ({show(served.models)})"
    if checks_names:
        text += ("; requests name the model it serves instead" if served.identity else
                 "; requests carry the label as their model, which this server may refuse")
    return text


def request_model(label: str | None, pin: Pin | None, checks_names: bool) -> str | None:
    """The `model` to send an instance: None keeps the client's.

    The label (`metadata.model`) when nothing better is known (no pin, or a multi-model
    server whose listing the label names none of: the client's `model` then, without a
    label), when the server lists it (or a variant of it), when the user pinned the model
    too (`fingerprint: {model: X}`), or when the server ignores the name (`checks_names`
    False: llama.cpp answers with its one loaded model whatever is asked). Otherwise the
    name the server was seen serving it under (a one-model server's identity), so a label
    such as `Qwen3-Coder-30B` still reaches an Ollama box serving
    `qwen3-coder:30b-a3b-q4_K_M`, and an instance without a label is not sent the
    client's group name (`auto`, `coder`).
    """
    if pin is None or pin.name is None or not checks_names:
        return label
    if label is None:
        return pin.name
    if pin.source == CONFIGURED or label == pin.name or label in pin.models \
            or any_match(label, pin.models):
        return label
    return pin.name


def changes(old: Pin, new: Pin) -> tuple[list[str], list[str]]:
    """(added, removed) names between two pins, for the log."""
    return ([m for m in new.models if m not in old.models],
            [m for m in old.models if m not in new.models])


def show(names: tuple[str, ...], most: int = 5) -> str:
    """Names for a message: the first `most`, then how many more."""
    text = ", ".join(names[:most])
    return text + (f" (+{len(names) - most} more)" if len(names) > most else "")


def _file(path: str) -> str:
    """A model file's name: the same file in another directory is the same model."""
    return path.replace("\\", "/").rsplit("/", 1)[-1]


_MODEL_VALUE = re.compile(rb'"model"[ \t\r\n]*:[ \t\r\n]*"([^"\\]*)"')


def response_model(body: bytes) -> str | None:
    """The top-level `model` of a JSON response body, read without parsing it all; None
    when it is missing or empty (which claims nothing).

    In JSON text an unescaped `"model"` can only be a key, so a scan is exact enough;
    anything unusual falls back to a full parse.
    """
    at = body.find(b'"model"')
    if at < 0:
        return None
    simple = _MODEL_VALUE.match(body, at)
    if simple is not None:
        return simple.group(1).decode("utf-8", "replace") or None
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
                return body[i + 1:end].decode("utf-8", "replace") or None
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    model = obj.get("model") if isinstance(obj, dict) else None
    return model if isinstance(model, str) and model else None
