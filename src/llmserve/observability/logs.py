"""Log formats: JSON lines (python-json-logger) or text lines that carry the same fields."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter


def configure(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"levelname": "level", "name": "logger", "asctime": "time"},
            )
        )
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# What every LogRecord has; anything else on a record came from ``extra=`` and is a field.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's copy of its message with terminal colours
    "vllm_process_name",  # vLLM's record factory adds it to every record
}


class TextFormatter(logging.Formatter):
    """Text lines that carry the same fields as the JSON ones: the ``extra=`` fields follow the
    message as ``name=value`` (so the access line says method, path, status, model, tokens
    and duration, not just "access"). Fields whose value is None are left out."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The fields join the message, before any traceback that format() appends.
        line = super().formatMessage(record)
        fields = [
            f"{name}={_text_value(value)}"
            for name, value in vars(record).items()
            if name not in _RECORD_ATTRIBUTES and value is not None
        ]
        return f"{line} {' '.join(fields)}" if fields else line


def _text_value(value: object) -> str:
    text = str(value)
    # Quoted only when needed, so a line stays greppable and a path with a space stays one field.
    return repr(text) if not text or any(c.isspace() or c in "\"'=" for c in text) else text
