"""Ollama: OpenAI's protocol on its `/v1` layer; a probe reads its native model listing,
`/api/tags` (`{"models": [{"name", "model", ...}]}`), whose names are what its `/v1`
layer looks a request's `model` up by (a model it has not pulled is a 404)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.config import InstanceConfig
from proxy.providers.base import ProbeResult, from_listing
from proxy.providers.openai import OpenAICompatible

if TYPE_CHECKING:
    from proxy.providers.transport import Upstream


class Ollama(OpenAICompatible):
    """Ollama (see the module doc)."""

    def __init__(self) -> None:
        super().__init__("ollama")

    async def probe(self, upstream: Upstream, inst: InstanceConfig,
                    timeout_s: float) -> ProbeResult:
        status, body = await upstream.get(inst, inst.root_url + "/api/tags", timeout_s)
        return from_listing(status, body)
