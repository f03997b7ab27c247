"""vLLM's OpenAI-compatible server: OpenAI's protocol, probed at `/v1/models` like any
other, plus how busy it is from its Prometheus `/metrics` (always served by
`vllm serve`: `vllm:num_requests_running`, `vllm:num_requests_waiting`; vLLM docs,
"Production Metrics"). vLLM does not state how many requests it batches at once, so only
its queue and running count are read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.config import InstanceConfig
from proxy.failures import UpstreamFailure
from proxy.health.states import READY
from proxy.providers.base import ProbeResult
from proxy.providers.load import VLLM_RUNNING, VLLM_WAITING, ServerLoad, from_metrics
from proxy.providers.openai import OpenAICompatible

if TYPE_CHECKING:
    from proxy.providers.transport import Upstream


class VLLM(OpenAICompatible):
    """vLLM (see the module doc)."""

    def __init__(self) -> None:
        super().__init__("vllm")

    async def probe(self, upstream: Upstream, inst: InstanceConfig,
                    timeout_s: float) -> ProbeResult:
        result = await super().probe(upstream, inst, timeout_s)
        if result.state != READY:
            return result
        try:
            status, body = await upstream.get(inst, inst.root_url + "/metrics", timeout_s)
        except UpstreamFailure:  # figures are a bonus: the listing answered
            return result
        figures = from_metrics(body.decode("utf-8", "replace"), VLLM_RUNNING,
                               VLLM_WAITING) if status == 200 else None
        if figures is not None:
            result.load = ServerLoad(None, figures[0], figures[1])
        return result
