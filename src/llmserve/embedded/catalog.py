"""The models llmserve embeds (shipped as PyPI packages, prepared once into the cache), by the
name a configuration gives them (``VllmModel.embedded``), with what each needs from vLLM."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmserve.embedded.minilm import ensure_minilm
from llmserve.embedded.smollm2 import ensure_embedded_model

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"


@dataclass(frozen=True)
class EmbeddedModel:
    prepare: Callable[[Path], Path]
    # AsyncEngineArgs the model is served with unless the configuration says otherwise.
    engine_args: Mapping[str, Any] = field(default_factory=dict)
    # ... and on a GPU, where the two default models share one: vLLM takes 90% of its memory
    # per engine unless told otherwise, and the second would find none left.
    gpu_engine_args: Mapping[str, Any] = field(default_factory=dict)
    # vLLM's tool-call parser for the model's own function-calling format (auto choice on).
    tool_call_parser: str | None = None


EMBEDDED: Mapping[str, EmbeddedModel] = {
    # SmolLM2's function-calling template writes xlam's format.
    SMOLLM2: EmbeddedModel(
        ensure_embedded_model,
        {"max_model_len": 4096},
        {"gpu_memory_utilization": 0.8},
        tool_call_parser="xlam",
    ),
    # vLLM takes the context (256) and pooling from the sentence-transformers config.
    MINILM: EmbeddedModel(ensure_minilm, gpu_engine_args={"gpu_memory_utilization": 0.05}),
}


def prepare(name: str, cache_dir: Path) -> Path:
    """The prepared folder of one embedded model, preparing it first if needed."""
    return EMBEDDED[name].prepare(cache_dir)
