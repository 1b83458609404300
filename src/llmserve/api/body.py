"""Request bodies: JSON parsed with orjson whatever the Content-Type (curl sends form types),
then validated against the wire schema. Errors go to the one validation-error handler."""

from __future__ import annotations

from typing import TypeVar

import orjson
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from llmserve.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)


def load_json(raw: bytes) -> object:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the request body is not valid JSON") from None


def parse_json(model: type[M], raw: bytes) -> M:
    data = load_json(raw)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
