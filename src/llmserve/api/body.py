"""Request bodies: JSON parsed with orjson whatever the Content-Type (curl sends form types),
then validated against the wire schema. A schema's errors become one 400
naming the field as the client wrote it (``validation.schema_errors``)."""

from __future__ import annotations

from typing import TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from llmserve.errors import InvalidRequest
from llmserve.validation.schema_errors import invalid_request

M = TypeVar("M", bound=BaseModel)


def load_json(raw: bytes) -> object:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the request body is not valid JSON", code="invalid_json") from None


def parse_json(model: type[M], raw: bytes) -> M:
    data = load_json(raw)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_request(exc.errors(include_url=False), data) from None
