"""How busy a server says it is, read by the background prober (never on the request path).

- llama.cpp `llama-server`: `/props` `total_slots` (its `-np`, 4 when left to choose), then
  `/metrics` when `endpoint_metrics` is on (`llamacpp:requests_processing`,
  `llamacpp:requests_deferred`; needs `--metrics`), else `/slots` when `endpoint_slots` is on
  (the default: a list of slots, each with `is_processing`). Field and metric names as
  llama.cpp's tools/server/server-context.cpp writes them (the version vendored in
  llama-cpp-python 0.3.36; checked against that build's answers).
- vLLM: `/metrics` `vllm:num_requests_running` and `vllm:num_requests_waiting` (gauges,
  one sample per model; vLLM docs, "Production Metrics").

Prometheus text is read with prometheus_client's parser, fed only the lines of the two
gauges (at most `MAX_SAMPLES`): a hostile or huge exposition (the prober reads up to 1 MiB)
costs a scan, not a parse of every series on the event loop. A figure that is not a finite
number from 0 to `MAX_FIGURE` (NaN, +Inf, negative, 1e300) is not believed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

LLAMACPP_RUNNING = "llamacpp:requests_processing"
LLAMACPP_WAITING = "llamacpp:requests_deferred"
VLLM_RUNNING = "vllm:num_requests_running"
VLLM_WAITING = "vllm:num_requests_waiting"
#: No server serves or queues more requests than this, or has more slots: a larger figure
#: is garbage, not load.
MAX_FIGURE = 65_536
#: Samples of the two gauges read at most (llama.cpp and vLLM send one per model).
MAX_SAMPLES = 64


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
    return value if isinstance(value, int) and not isinstance(value, bool) \
        and 0 < value <= MAX_FIGURE else None


def from_slots(doc: object) -> tuple[int, int] | None:
    """(slots, busy) from llama.cpp's `/slots` list, or None when it is not such a list."""
    if not isinstance(doc, list) or len(doc) > MAX_FIGURE:
        return None
    busy = sum(1 for slot in doc if isinstance(slot, dict) and slot.get("is_processing") is True)
    return len(doc), busy


def from_metrics(text: str, running: str, waiting: str) -> tuple[int, int] | None:
    """(running, waiting) summed over the samples of the two named gauges of a Prometheus
    text exposition, or None when neither is there, the text does not parse or a sum is
    beyond `MAX_FIGURE`. Samples that are not finite and from 0 to `MAX_FIGURE` are left
    out; only the first `MAX_SAMPLES` lines of the two gauges are read."""
    lines = [line for line in text.splitlines()
             if line.startswith((running, waiting))][:MAX_SAMPLES]
    try:
        families = list(text_string_to_metric_families("\n".join(lines) + "\n"))
    except (ValueError, IndexError, KeyError, TypeError):  # the parser's errors vary
        return None
    found = {running: None, waiting: None} | _sums(families, (running, waiting))
    if found[running] is None and found[waiting] is None:
        return None
    figures = int(found[running] or 0), int(found[waiting] or 0)
    return None if max(figures) > MAX_FIGURE else figures


def _sums(families: Iterable[object], names: tuple[str, ...]) -> dict[str, float | None]:
    sums: dict[str, float | None] = {}
    for family in families:
        name = getattr(family, "name", None)
        if name in names:
            total = sum(s.value for s in getattr(family, "samples", ())
                        if s.name == name and _believable(s.value))
            sums[name] = total + (sums.get(name) or 0.0)
    return sums


def _believable(value: float) -> bool:
    """A gauge value a server could mean: finite, from 0 to MAX_FIGURE."""
    return math.isfinite(value) and 0 <= value <= MAX_FIGURE
