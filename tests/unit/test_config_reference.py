"""docs/configuration-reference.md is made from the settings model: it cannot drift, and every
setting has a description."""

from __future__ import annotations

from pathlib import Path

from llmserve import config_reference

DOC = Path(__file__).parents[2] / "docs" / "configuration-reference.md"


def test_the_committed_reference_is_what_the_settings_model_says() -> None:
    assert DOC.read_text() == config_reference.render(), (
        "the settings changed: regenerate it with "
        "python -m llmserve.config_reference > docs/configuration-reference.md"
    )


def test_every_setting_is_described() -> None:
    missing = [
        f"{model.__name__}.{name}"
        for _, model, _ in config_reference.SECTIONS
        for name, field in model.model_fields.items()
        if not field.description
    ]
    assert not missing, f"settings without a docstring in config.py: {missing}"
