"""A schema's errors become one 400 that names the field as the client wrote it: no pydantic
union tags (``.str``, ``.list[int]``) in ``param``, the deepest place the union reached."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from llmserve.validation.schema_errors import invalid_request, public_loc
from llmserve.wire.schema import ChatCompletionRequest, CompletionRequest

USER = {"role": "user", "content": "hi"}


def refusal(schema: Any, body: dict[str, Any]) -> tuple[str | None, str]:
    with pytest.raises(ValidationError) as caught:
        schema.model_validate(body)
    error = invalid_request(caught.value.errors(include_url=False), body)
    assert error.status == 400 and error.code == "invalid_value"
    return error.param, error.message


@pytest.mark.parametrize(
    ("schema", "body", "param", "message"),
    [
        (
            ChatCompletionRequest,
            {"model": "m", "messages": [{"role": "user", "content": 5}]},
            "messages.0.content",
            "messages.0.content: Input should be a valid string or a valid list",
        ),
        (
            ChatCompletionRequest,
            {
                "model": "m",
                "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}],
            },
            "messages.0.content.0.text",
            "messages.0.content.0.text: Input should be a valid string",
        ),
        (
            ChatCompletionRequest,
            {"model": "m", "messages": [USER], "stop": 5},
            "stop",
            "stop: Input should be a valid string or a valid list",
        ),
        (
            CompletionRequest,
            {"model": "m", "prompt": [[1, "a"]]},
            "prompt.0.1",
            "prompt.0.1: Input should be a valid integer, unable to parse string as an integer",
        ),
        (
            CompletionRequest,
            {"model": "m", "prompt": "x", "max_tokens": 0, "temperature": "hot"},
            "max_tokens",
            "max_tokens: Input should be greater than or equal to 1 (and 1 more problem)",
        ),
        (
            ChatCompletionRequest,
            {"model": "m"},
            "messages",
            "messages: Field required",
        ),
    ],
)
def test_the_param_is_the_field_the_client_wrote(
    schema: Any, body: dict[str, Any], param: str, message: str
) -> None:
    assert refusal(schema, body) == (param, message)


def test_without_the_body_member_tags_are_recognised_by_their_shape() -> None:
    assert public_loc(("body", "prompt", "list[int]", 0)) == ("prompt", 0)
    assert public_loc(("messages", 0, "content", "str")) == ("messages", 0, "content")
    assert public_loc(("query", "limit")) == ("query", "limit")


def test_invalid_json_has_its_own_code() -> None:
    error = invalid_request([{"type": "json_invalid", "loc": ("body", 0), "msg": "x"}])
    assert (error.code, error.message) == ("invalid_json", "the request body is not valid JSON")
