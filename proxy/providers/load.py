"""How busy a server says it is, read by the background prober (never on the request path).

- llama.cpp `llama-server`: `/props` `total_slots` (its `-np`, 4 when left to choose), then
  `/metrics` when `endpoint_metrics` is on (`llamacpp:requests_processing`,
  `llamacpp:requests_deferred`; needs `--metrics`), else `/slots` when `endpoint_slots` is on
  (the default: a list of slots, each with `is_processing`). Field and metric names as
  llama.cpp's tools/server/server-context.cpp writes them (the version vendored in
  llama-cpp-python 0.3.36; checked against that build's answers).
- vLLM: `/metrics` `vllm:num_requests_running` and `vllm:num_requests_waiting` (gauges,
  one sample per model; vLLM docs, "Production Metrics").

Prometheus text is read with prometheus_client's parser.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

LLAMACPP_RUNNING = "llamacpp:requests_processing"
LLAMACPP_WAITING = "llamacpp:requests_deferred"
VLLM_RUNNING = "vllm:num_requests_running"
VLLM_WAITING = "vllm:num_requests_waiting"


@dataclass(frozen=True, slots=True)
class ServerLoad:
    """What a server reported: `slots` (requests it serves at once; None: not said),
    `busy` (requests it is serving) and `queued` (requests waiting for a slot); None for a
    figure it did not report."""

    slots: int | None = None
    busy: int | None = None
    queued: int | None = None


def total_slots(props: dict[str, object]) -> int | None:
    """llama.cpp `/props` `total_slots` (a positive int), else None."""
    value = props.get("total_slots")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
        else None


def from_slots(doc: object) -> tuple[int, int] | None:
    """(slots, busy) from llama.cpp's `/slots` list, or None when it is not such a list."""
    if not isinstance(doc, list):
        return None
    busy = sum(1 for slot in doc if isinstance(slot, dict) and slot.get("is_processing") is True)
    return len(doc), busy


def from_metrics(text: str, running: str, waiting: str) -> tuple[int, int] | None:
    """(running, waiting) summed over the samples of the two named gauges of a Prometheus
    text exposition, or None when neither is there or the text does not parse."""
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError:
        return None
    found = {running: None, waiting: None} | _sums(families, (running, waiting))
    if found[running] is None and found[waiting] is None:
        return None
    return int(found[running] or 0), int(found[waiting] or 0)


def _sums(families: Iterable[object], names: tuple[str, ...]) -> dict[str, float | None]:
    sums: dict[str, float | None] = {}
    for family in families:
        name = getattr(family, "name", None)
        if name in names:
            total = sum(s.value for s in getattr(family, "samples", ()) if s.name == name)
            sums[name] = total + (sums.get(name) or 0.0)
    return sums
