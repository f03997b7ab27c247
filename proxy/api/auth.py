"""Who may call the proxy: client keys for the OpenAI and Anthropic surfaces, the admin key
for /admin.

Keys are compared in constant time, and every configured key is compared, so timing says
nothing about which key (or how much of one) matched.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from proxy.api.errors import Forbidden, Unauthorized
from proxy.config import ServerConfig


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a caller presented: `Authorization: Bearer KEY`, or `x-api-key: KEY`."""
    auth = headers.get("Authorization")
    if auth is not None:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    key = headers.get("x-api-key")
    return key.strip() if key else None


def _matches(token: str, keys: tuple[str, ...]) -> bool:
    # Header values are decoded as UTF-8 with surrogateescape (aiohttp's parser does so):
    # bytes that are not UTF-8 come back as they were sent, and match no configured key.
    given = token.encode("utf-8", "surrogateescape")
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key.encode())
    return found


def check_client(server: ServerConfig, headers: Mapping[str, str]) -> None:
    """Raise Unauthorized unless the caller may use the OpenAI endpoints."""
    if not server.api_keys:
        return
    token = presented_key(headers)
    if token is None:
        raise Unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer "
                           "KEY' (the OpenAI SDKs do this with api_key=...) or as "
                           "'x-api-key: KEY' (the Anthropic SDKs do).")
    admin = (server.admin_key,) if server.admin_key else ()
    if not _matches(token, server.api_keys + admin):
        raise Unauthorized("Incorrect API key provided.")


def check_admin(server: ServerConfig, headers: Mapping[str, str]) -> None:
    """Raise unless the caller holds the admin key; a client key is not enough (403)."""
    if server.admin_key is None:
        if server.api_keys:
            raise Forbidden("The admin endpoints are disabled: set server.admin_key.",
                            code="admin_disabled")
        return  # no keys at all: a local, open set-up (serve refuses it on other addresses)
    token = presented_key(headers)
    if token is None:
        raise Unauthorized("The admin endpoints need the admin key as a Bearer token.")
    if _matches(token, (server.admin_key,)):
        return
    if _matches(token, server.api_keys):
        raise Forbidden("A client key may not use the admin endpoints.", code="not_admin")
    raise Unauthorized("Incorrect admin key provided.")
