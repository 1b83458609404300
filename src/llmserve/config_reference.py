"""The configuration reference (docs/configuration-reference.md), made from the settings model
itself: every setting's type, default, bounds, environment variable and docstring, so the doc
cannot drift from the code (tests/unit/test_config_reference.py compares them).

``python -m llmserve.config_reference > docs/configuration-reference.md`` rewrites it.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from llmserve import config

# Each section: its YAML path, the model, and whether LLMSERVE_* variables reach it (list items
# such as models[] are set in the file only).
SECTIONS: tuple[tuple[str, type[BaseModel], bool], ...] = (
    ("", config.Settings, True),
    ("limits", config.Limits, True),
    ("auth", config.AuthConfig, True),
    ("cors", config.CorsConfig, True),
    ("rate_limits", config.RateLimitConfig, True),
    ("observability", config.ObservabilityConfig, True),
    ("models[] (engine: vllm)", config.VllmModel, False),
    ("models[] (engine: openai)", config.UpstreamModel, False),
    ("models[].replicas[] (engine: openai)", config.UpstreamReplica, False),
    ("models[] (engine: managed)", config.ManagedModel, False),
    ("models[] (engine: simulated)", config.SimulatedModel, False),
    ("models[].admission", config.AdmissionConfig, False),
    ("models[].routing (openai, managed)", config.RoutingConfig, False),
    ("models[].health (openai, managed)", config.HealthConfig, False),
)
_NESTED = {m for _, m, _ in SECTIONS}
_HEADER = """# Configuration reference

Made from the settings model (`src/llmserve/config.py`) by `python -m llmserve.config_reference`;
do not edit by hand. [configuration.md](configuration.md) explains how the pieces fit together.

Settings come from one YAML file (`llmserve serve --config FILE`), then `LLMSERVE_*` environment
variables (nested with `__`: `LLMSERVE_LIMITS__MAX_TOKENS=1024`), then command-line flags, each
overriding the one before. A setting not listed here is refused at start.
"""


def render() -> str:
    return "\n".join([_HEADER, *(_section(*s) for s in SECTIONS)])


def _section(path: str, model: type[BaseModel], env: bool) -> str:
    title = f"`{path}`" if path else "Top level"
    doc = " ".join((model.__doc__ or "").split()).replace("``", "`")
    rows = [
        "| setting | type | default | description |",
        "| --- | --- | --- | --- |",
        *_rows(path, model, env),
    ]
    return "\n".join([f"## {title}", "", *([doc, ""] if doc else []), *rows, ""])


def _rows(path: str, model: type[BaseModel], env: bool) -> Iterator[str]:
    for name, field in model.model_fields.items():
        if field.annotation in _NESTED or name == "models":
            continue  # a section of its own
        description = " ".join((field.description or "").split()).replace("``", "`")
        if env:
            variable = "__".join(p.upper() for p in (path, name) if p)
            description = f"{description} Env: `LLMSERVE_{variable}`.".strip()
        cells = (f"`{name}`", _type(field.annotation), _default(field), description)
        yield "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type(a) for a in args)
    if origin in (tuple, list):
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if annotation is type(None):
        return "null"
    return {"SecretStr": "secret string", "Path": "path"}.get(
        getattr(annotation, "__name__", ""), getattr(annotation, "__name__", str(annotation))
    )


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return "required"
    bounds = "".join(
        f" ({op} {getattr(m, attr)})"
        for m in field.metadata
        for attr, op in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))
        if getattr(m, attr, None) is not None
    )
    if isinstance(value, BaseModel | list) and value:
        return "see below" + bounds
    if value is None:
        text = "null"
    elif isinstance(value, tuple | list):
        text = "[" + ", ".join(map(str, value)) + "]"
    elif isinstance(value, bool):
        text = str(value).lower()
    else:
        # The home folder of whoever generated the doc is not the reader's.
        text = str(value).replace(str(Path.home()), "~")
    return f"`{text}`{bounds}"


if __name__ == "__main__":
    print(render(), end="")
