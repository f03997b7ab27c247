"""Which provider serves an instance: its `kind` (the protocol: openai or anthropic), then
its `server` (the implementation behind an OpenAI-compatible address)."""

from __future__ import annotations

from proxy.config import InstanceConfig
from proxy.providers.anthropic import Anthropic
from proxy.providers.base import Provider
from proxy.providers.llamacpp import LlamaCpp
from proxy.providers.ollama import Ollama
from proxy.providers.openai import OpenAICompatible
from proxy.providers.vllm import VLLM

_ANTHROPIC = Anthropic()
#: By `server` (config.SERVER_KINDS); stateless, so one of each serves every instance.
_BY_SERVER: dict[str, Provider] = {
    "openai": OpenAICompatible("openai"),
    "vllm": VLLM(),
    "lmstudio": OpenAICompatible("lmstudio"),
    "llamacpp": LlamaCpp(),
    "ollama": Ollama(),
}


def provider_for(inst: InstanceConfig) -> Provider:
    """The provider of an instance; an unknown server is treated as OpenAI-compatible."""
    if inst.kind == "anthropic":
        return _ANTHROPIC
    return _BY_SERVER.get(inst.server) or _BY_SERVER["openai"]
