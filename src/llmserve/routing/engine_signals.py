"""What a ``vllm serve`` replica says of its own load, read from its ``/metrics``: requests
running and waiting, KV-cache use, prefix-cache hits. Several gateway replicas in front of the
same engines each see only their own requests; the engine sees everyone's.

Read by scanning the text for the five names needed rather than with prometheus-client's
parser, which builds every family of vLLM's few hundred lines, several times a second per
replica. Samples of one name are summed (a server of one model has one; a labelled histogram
or a second model would be summed too, which is what a load is).
"""

from __future__ import annotations

from dataclasses import dataclass

_NAMES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:prefix_cache_hits_total": "prefix_hits",
    "vllm:prefix_cache_queries_total": "prefix_queries",
}


@dataclass(frozen=True, slots=True)
class EngineSignals:
    running: float
    waiting: float
    kv_cache_usage: float | None = None  # 0..1
    prefix_hits: float | None = None  # tokens, since the engine started
    prefix_queries: float | None = None

    @property
    def requests(self) -> float:
        return self.running + self.waiting


def parse_signals(text: str) -> EngineSignals | None:
    """The signals in a Prometheus text body; None when it has no running/waiting counts (not
    vLLM, or not yet serving), so the caller falls back to its own counts."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
        field = _NAMES.get(line[:name_end]) if name_end > 0 else None
        if field is None:
            continue
        rest = line[name_end:]
        if rest.startswith("{"):
            rest = rest[rest.rfind("}") + 1 :]
        try:
            value = float(rest.split()[0])  # a timestamp may follow the value
        except (ValueError, IndexError):
            continue
        found[field] = found.get(field, 0.0) + value
    if "running" not in found or "waiting" not in found:
        return None
    return EngineSignals(**found)
