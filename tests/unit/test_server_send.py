"""``api.server_send``: the server's send is kept for the request, and let go after it."""

from __future__ import annotations

import pytest
from starlette.types import Message, Receive, Scope, Send

from llmserve.api.server_send import KeepServerSend, server_send


async def _receive() -> Message:
    return {"type": "http.disconnect"}


async def _server(message: Message) -> None:
    pass


def _scope() -> Scope:
    return {"type": "http", "path": "/", "headers": []}


async def test_the_app_finds_the_servers_send_behind_its_own_wrapped_send() -> None:
    seen: list[Send] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async def wrapped(message: Message) -> None:  # what a middleware would hand on
            await send(message)

        seen.append(server_send(scope, wrapped))

    await KeepServerSend(app)(_scope(), _receive, _server)
    assert seen == [_server]


@pytest.mark.parametrize("fails", [False, True])
async def test_the_scope_lets_go_of_the_send_when_the_request_ends(fails: bool) -> None:
    # Kept, the send (a method of the server's per-request object, which holds the scope) and
    # the scope would form a reference cycle for every request.
    scope = _scope()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if fails:
            raise RuntimeError("the app failed")

    if fails:
        with pytest.raises(RuntimeError):
            await KeepServerSend(app)(scope, _receive, _server)
    else:
        await KeepServerSend(app)(scope, _receive, _server)

    async def other(message: Message) -> None:
        pass

    assert server_send(scope, other) is other  # the server's is no longer there


async def test_without_it_the_given_send_is_used() -> None:
    async def given(message: Message) -> None:
        pass

    assert server_send(_scope(), given) is given
