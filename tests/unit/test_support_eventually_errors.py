"""The tests' waiting helper and OpenAI error check."""

from __future__ import annotations

import httpx
import pytest
from tests.support.errors import assert_openai_error
from tests.support.eventually import eventually, until

ERROR = {"error": {"message": "no", "type": "invalid_request_error", "param": "model", "code": "x"}}


async def test_eventually_sync_and_async_conditions() -> None:
    calls: list[int] = []

    def sync() -> bool:
        calls.append(1)
        return len(calls) >= 3

    async def coro() -> bool:
        return True

    assert await eventually(sync, within=1) >= 0
    assert await eventually(coro, within=1) >= 0


async def test_until_returns_the_truthy_value() -> None:
    values = iter([None, {}, {"k": 1}])
    assert await until(lambda: next(values), within=1) == {"k": 1}


async def test_eventually_names_what_and_the_last_value() -> None:
    queue = [3]
    with pytest.raises(AssertionError, match=r"the queue drains; last: \[\]"):
        await eventually(lambda: [x for x in queue if x > 5], 0.05, "the queue drains")


def test_error_from_a_response_body_or_bytes() -> None:
    response = httpx.Response(400, json=ERROR)
    error = assert_openai_error(
        response, 400, type="invalid_request_error", code="x", param="model"
    )
    assert error == ERROR["error"]
    assert assert_openai_error(response.content, message_contains="no") == ERROR["error"]
    assert assert_openai_error(ERROR, code="x") == ERROR["error"]


@pytest.mark.parametrize(
    ("body", "checks"),
    [
        ({"error": {"message": "no", "type": "t"}}, {}),  # param and code must be present
        ({"error": {"message": "", "type": "t", "param": None, "code": None}}, {}),
        ({"detail": "no"}, {}),
        (ERROR, {"code": "y"}),
        (ERROR, {"type": "server_error"}),
        (ERROR, {"message_contains": "yes"}),
    ],
)
def test_error_shape_and_fields_are_checked(
    body: dict[str, object], checks: dict[str, str]
) -> None:
    with pytest.raises(AssertionError):
        assert_openai_error(body, **checks)  # type: ignore[arg-type]


def test_a_response_status_and_content_type_are_checked() -> None:
    with pytest.raises(AssertionError):
        assert_openai_error(httpx.Response(500, json=ERROR), 400)
    with pytest.raises(AssertionError):
        assert_openai_error(httpx.Response(400, text=str(ERROR)), 400)
