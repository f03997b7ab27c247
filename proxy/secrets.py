"""Keeping secrets secret: every configured key is scrubbed from text that leaves the proxy.

Keys are never put into logs, events or errors on purpose; this is the safety net for
text that comes from upstreams (a server that quotes the key it was sent in an error) and
for anything logged by mistake. A structlog processor applies it to every log line.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from proxy.config import Config

MASK = "***"
#: Shorter values are not treated as secrets (they would mask ordinary words).
MIN_SECRET_LEN = 6


class Redactor:
    """Replaces known secret values with `***`."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        unique = {s for s in secrets if s and len(s) >= MIN_SECRET_LEN}
        self.secrets = sorted(unique, key=len, reverse=True)  # longest first
        self._bytes = [s.encode() for s in self.secrets]
        #: A value shorter than the shortest secret cannot hold one (most log fields are
        #: ids, names and numbers, shorter than an API key): it is not searched at all.
        self.shortest = len(self.secrets[-1]) if self.secrets else 0

    def text(self, value: str) -> str:
        if len(value) < self.shortest:
            return value
        for secret in self.secrets:
            if secret in value:
                value = value.replace(secret, MASK)
        return value

    def data(self, value: bytes) -> bytes:
        if len(value) < self.shortest:  # (a secret's bytes are at least as long as it)
            return value
        for secret in self._bytes:
            if secret in value:
                value = value.replace(secret, MASK.encode())
        return value

    def __bool__(self) -> bool:
        return bool(self.secrets)


def config_secrets(config: Config) -> list[str]:
    """Every secret value in a config: client, admin and upstream keys, header values, the
    passwords of the audit store's URL and of instances' base URLs (aiohttp sends one
    as basic auth)."""
    from proxy.audit.database import url_secrets

    out = list(config.server.api_keys)
    out.extend(url_secrets(config.store.url))
    if config.server.admin_key:
        out.append(config.server.admin_key)
    for inst in config.instances:
        if inst.api_key:
            out.append(inst.api_key)
        out.extend(url_secrets(inst.base_url))
        out.extend(value for _, value in inst.headers)
    if config.state.url:
        password = urlsplit(config.state.url).password
        if password:
            out.append(password)
    return out


_log_redactor = Redactor()


def set_log_redactor(redactor: Redactor) -> None:
    """Use `redactor` for log lines from now on (set when a config is loaded)."""
    global _log_redactor
    _log_redactor = redactor


#: Field types that cannot hold a secret, passed over at once (a request's line is mostly
#: numbers and flags).
_PLAIN = frozenset({int, float, bool, type(None)})


def redact_log_event(logger: Any, method: str,
                     event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: scrub secrets from every field: strings, and whatever else a
    renderer turns into text (see `_scrub`). It runs after structlog's `format_exc_info`,
    so a traceback's text is scrubbed too."""
    redactor = _log_redactor
    if not redactor:
        return event
    shortest = redactor.shortest
    for key, value in event.items():
        if type(value) in _PLAIN:
            continue
        if isinstance(value, str):
            if len(value) >= shortest:
                event[key] = redactor.text(value)
        else:
            event[key] = _scrub(value, redactor)
    return event


def _scrub(value: Any, redactor: Redactor) -> Any:
    """`value` with every secret masked: in strings, bytes, the keys and values of dicts,
    the items of lists, tuples and sets (as a list), and the repr of anything else (an
    exception, a URL object), which is what the renderers write for it (structlog's
    JSONRenderer falls back to repr, as ConsoleRenderer does)."""
    if type(value) in _PLAIN:
        return value
    if isinstance(value, str):
        return redactor.text(value)
    if isinstance(value, dict):
        return {redactor.text(k) if isinstance(k, str) else k: _scrub(v, redactor)
                for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_scrub(v, redactor) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return redactor.data(bytes(value))
    text = repr(value)
    masked = redactor.text(text)
    return value if masked == text else masked
