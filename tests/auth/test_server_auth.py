"""API keys over a real server: who gets in, to what, and that a key never leaks back out."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmserve.app import create_app
from llmserve.auth.keys import new_key
from llmserve.auth.middleware import AuthMiddleware
from llmserve.cli import main as cli_main
from llmserve.config import AuthConfig, Settings
from llmserve.registry import ModelRegistry
from tests.auth.helpers import (
    SIM_MODELS,
    add_key,
    auth_settings,
    bearer,
    completion,
    raw_http,
)
from tests.conftest import RunningServer, serve
from tests.support.errors import assert_openai_error
from tests.support.eventually import until

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@dataclass
class AuthServer:
    server: RunningServer
    keys_path: Path
    full: str  # every model, no limits
    sim_only: str  # models: ["sim"]
    expired: str  # expired in 2001

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture
async def auth_server(tmp_path: Path) -> AsyncIterator[AuthServer]:
    path = tmp_path / "keys.yaml"
    full = add_key(path, "full")
    sim_only = add_key(path, "sim-only", models=("sim",))
    expired = add_key(path, "expired", expires=dt.datetime(2001, 1, 1, tzinfo=dt.UTC))
    async with serve(auth_settings(path)) as running:
        yield AuthServer(running, path, full, sim_only, expired)


def assert_unauthorized(status: int, headers: httpx.Headers | dict[str, str], body: bytes) -> None:
    assert status == 401, body
    assert headers["www-authenticate"] == "Bearer"
    assert headers["content-type"].startswith("application/json")
    error = assert_openai_error(
        body, type="authentication_error", code="invalid_api_key", message_contains="API key"
    )
    assert error["param"] is None


# --- who gets in -------------------------------------------------------------------------------


async def test_no_key_is_401_with_an_openai_error_and_www_authenticate(
    auth_server: AuthServer,
) -> None:
    async with httpx.AsyncClient(base_url=auth_server.url, timeout=10) as client:
        for method, path, body in [
            ("POST", "/v1/chat/completions", CHAT),
            ("POST", "/v1/completions", completion()),
            ("POST", "/generate", {"prompt": "hi", "max_tokens": 1}),
            ("GET", "/v1/models", None),
        ]:
            response = await client.request(method, path, json=body)
            assert_unauthorized(response.status_code, response.headers, response.content)
            assert_openai_error(response, 401, message_contains="missing API key")


# (Authorization header, what the 401 says)
BAD_AUTHORIZATIONS = [
    ("Bearer " + new_key(), "invalid API key"),  # well-formed, unknown
    ("Bearer sk-llmserve-", "invalid API key"),
    ("Bearer not-a-key", "invalid API key"),
    ("Basic dXNlcjpwYXNz", "missing API key"),  # another scheme
    ("Token abc", "missing API key"),
    ("Bearer", "missing API key"),  # no token
]


async def test_a_bad_key_is_401(auth_server: AuthServer) -> None:
    expired = (f"Bearer {auth_server.expired}", "invalid API key")
    async with httpx.AsyncClient(base_url=auth_server.url, timeout=10) as client:
        for authorization, says in [*BAD_AUTHORIZATIONS, expired]:
            response = await client.post(
                "/v1/chat/completions", json=CHAT, headers={"Authorization": authorization}
            )
            assert_unauthorized(response.status_code, response.headers, response.content)
            assert_openai_error(response, 401, message_contains=says)


async def test_a_key_in_the_wrong_place_is_not_accepted(auth_server: AuthServer) -> None:
    async with httpx.AsyncClient(base_url=auth_server.url, timeout=10) as client:
        for kwargs in [
            {"headers": {"X-API-Key": auth_server.full}},
            {"headers": {"api-key": auth_server.full}},
            {"params": {"api_key": auth_server.full}},
            {"headers": {"Authorization": auth_server.full}},  # no scheme
        ]:
            response = await client.post("/v1/chat/completions", json=CHAT, **kwargs)  # type: ignore[arg-type]
            assert response.status_code == 401, kwargs


async def test_a_valid_key_is_served(auth_server: AuthServer) -> None:
    async with httpx.AsyncClient(
        base_url=auth_server.url, timeout=10, headers=bearer(auth_server.full)
    ) as client:
        chat = await client.post("/v1/chat/completions", json=CHAT)
        assert chat.status_code == 200, chat.text
        assert chat.json()["usage"]["completion_tokens"] == 3
        # The scheme is case-insensitive, as RFC 7235 says.
        lower = await client.post(
            "/v1/completions",
            json=completion(max_tokens=2),
            headers={"Authorization": f"bearer {auth_server.full}"},
        )
        assert lower.status_code == 200, lower.text
        models = await client.get("/v1/models")
        assert models.status_code == 200
        assert [m["id"] for m in models.json()["data"]] == ["sim", "slow"]
        stream = await client.post("/generate", json={"prompt": "hi", "max_tokens": 2})
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")


async def test_a_key_revoked_while_the_server_runs_stops_working_within_a_second(
    auth_server: AuthServer,
) -> None:
    async with httpx.AsyncClient(
        base_url=auth_server.url, timeout=10, headers=bearer(auth_server.full)
    ) as client:
        assert (await client.get("/v1/models")).status_code == 200
        assert cli_main(["keys", "--keys-file", str(auth_server.keys_path), "revoke", "full"]) == 0

        async def refused() -> httpx.Response | None:
            response = await client.get("/v1/models")
            return None if response.status_code == 200 else response

        response = await until(refused, 1.0, "the revoked key refused", interval=0.02)
        assert_unauthorized(response.status_code, response.headers, response.content)
        # The other key is untouched.
        other = await client.get("/v1/models", headers=bearer(auth_server.sim_only))
        assert other.status_code == 200


async def test_a_key_cannot_retrieve_a_model_it_may_not_use(auth_server: AuthServer) -> None:
    async with httpx.AsyncClient(
        base_url=auth_server.url, timeout=10, headers=bearer(auth_server.sim_only)
    ) as client:
        assert (await client.get("/v1/models/sim")).status_code == 200
        hidden = await client.get("/v1/models/slow")
        # As unknown: the key does not learn it exists.
        assert_openai_error(hidden, 404, code="model_not_found")
        # ... though it is served, to a key that may use it.
        shown = await client.get("/v1/models/slow", headers=bearer(auth_server.full))
        assert shown.status_code == 200
        assert (
            await client.get("/v1/models/sim", headers={"Authorization": ""})
        ).status_code == 401


async def test_a_key_created_while_the_server_runs_works_within_a_second(
    auth_server: AuthServer, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(auth_server.keys_path)
    assert cli_main(["keys", "--keys-file", path, "create", "--name", "late"]) == 0
    key = capsys.readouterr().out.strip()
    async with httpx.AsyncClient(base_url=auth_server.url, timeout=10, headers=bearer(key)) as c:

        async def accepted() -> httpx.Response | None:
            response = await c.get("/v1/models")
            return None if response.status_code == 401 else response

        response = await until(accepted, 1.0, "the new key accepted", interval=0.02)
        assert response.status_code == 200


# --- to what -----------------------------------------------------------------------------------


async def test_a_key_limited_to_some_models_gets_403_for_others(auth_server: AuthServer) -> None:
    async with httpx.AsyncClient(
        base_url=auth_server.url, timeout=10, headers=bearer(auth_server.sim_only)
    ) as client:
        for path, body in [
            ("/v1/chat/completions", {**CHAT, "model": "slow"}),
            ("/v1/completions", completion("slow")),
            ("/generate", {"model": "slow", "prompt": "hi", "max_tokens": 1}),
        ]:
            denied = await client.post(path, json=body)
            assert denied.status_code == 403, (path, denied.text)
            assert_openai_error(
                denied, 403, type="permission_error", code="model_not_allowed", param="model"
            )
        assert not auth_server.server.engine("slow").started  # nothing reached the engine

        allowed = await client.post("/v1/chat/completions", json=CHAT)
        assert allowed.status_code == 200, allowed.text
        # /generate without a model uses the default ("sim", the first), which this key may use.
        default = await client.post("/generate", json={"prompt": "hi", "max_tokens": 1})
        assert default.status_code == 200

        listed = await client.get("/v1/models")
        assert listed.status_code == 200
        assert [m["id"] for m in listed.json()["data"]] == ["sim"]


# --- which paths need a key --------------------------------------------------------------------


async def test_public_paths_answer_without_a_key(auth_server: AuthServer) -> None:
    async with httpx.AsyncClient(base_url=auth_server.url, timeout=10) as client:
        for path in ("/health", "/ready", "/metrics"):

            async def answered(path: str = path) -> httpx.Response | None:
                response = await client.get(path)
                loading = path == "/ready" and response.status_code == 503  # engines loading
                return None if loading else response

            response = await until(answered, 3.0, f"{path} answered", interval=0.02)
            assert response.status_code == 200, (path, response.text)
            assert "www-authenticate" not in response.headers
        # A query string does not change the path.
        assert (await client.get("/health?x=/v1/models")).status_code == 200


PROTECTED = [
    ("GET", "/v1/models"),
    ("GET", "/docs"),
    ("GET", "/redoc"),
    ("GET", "/openapi.json"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/no/such/path"),
    ("GET", "/v1/no-such-route"),
    ("POST", "/v1/embeddings"),
    ("GET", "/HEALTH"),  # public paths match exactly
    ("GET", "/health/"),
    ("GET", "/metrics/extra"),
    ("DELETE", "/v1/models"),
]


async def test_every_other_path_needs_a_key_even_if_it_does_not_exist(
    auth_server: AuthServer,
) -> None:
    async with httpx.AsyncClient(base_url=auth_server.url, timeout=10) as client:
        for method, path in PROTECTED:
            response = await client.request(method, path)
            # 401, not 404: an unauthenticated caller learns nothing about which routes exist.
            assert response.status_code == 401, (method, path, response.status_code)
            assert_unauthorized(response.status_code, response.headers, response.content)


async def test_the_docs_are_served_to_a_key_holder(auth_server: AuthServer) -> None:
    async with httpx.AsyncClient(
        base_url=auth_server.url, timeout=10, headers=bearer(auth_server.full)
    ) as client:
        assert (await client.get("/openapi.json")).status_code == 200
        assert (await client.get("/no/such/path")).status_code == 404


RAW_HEADS = [
    # Percent-encoded separators decode to a protected path: still protected.
    b"GET /v1%2Fmodels HTTP/1.1\r\nHost: localhost",
    b"GET /v1%2fmodels HTTP/1.1\r\nHost: localhost",
    b"GET /%76%31/%6d%6f%64%65%6c%73 HTTP/1.1\r\nHost: localhost",
    # Dot segments after a public prefix are not normalised into a public path.
    b"GET /health/../v1/models HTTP/1.1\r\nHost: localhost",
    b"GET /health/%2e%2e/v1/models HTTP/1.1\r\nHost: localhost",
    b"GET /health%2F..%2Fv1%2Fmodels HTTP/1.1\r\nHost: localhost",
    b"GET //v1/models HTTP/1.1\r\nHost: localhost",
    # Odd Host headers and proxy-style rewrites change nothing.
    b"GET /v1/models HTTP/1.1\r\nHost: evil.example:1/health",
    b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Original-URL: /health",
    b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Rewrite-URL: /metrics",
    b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Forwarded-Prefix: /health",
    b"GET /v1/models HTTP/1.1",  # no Host at all
    b"GET /v1/models HTTP/1.1\r\nHost: ",
    # Absolute-form request targets, with a public-looking authority.
    b"GET http://127.0.0.1/v1/models HTTP/1.1\r\nHost: 127.0.0.1",
    b"GET http://health/v1/models HTTP/1.1\r\nHost: health",
    b"POST /v1/chat%2Fcompletions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json",
]


async def test_encodings_and_hosts_do_not_bypass_auth(auth_server: AuthServer) -> None:
    for head in RAW_HEADS:
        status, headers, body = await raw_http(auth_server.url, head + b"\r\nConnection: close")
        assert status == 401, (head, status, body)
        assert_unauthorized(status, headers, body)


async def test_a_percent_encoded_path_is_the_same_route_with_a_key(auth_server: AuthServer) -> None:
    """The middleware checks the decoded path, the same string the router matches."""
    key = auth_server.sim_only.encode()
    head = b"GET /v1%2Fmodels HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer "
    status, _, body = await raw_http(auth_server.url, head + key)
    assert status == 200, body
    assert [m["id"] for m in json.loads(body)["data"]] == ["sim"]
    # And a percent-encoded public path is that public route.
    status, _, body = await raw_http(
        auth_server.url, b"GET /%68ealth HTTP/1.1\r\nHost: x\r\nConnection: close"
    )
    assert (status, json.loads(body)) == (200, {"status": "ok"})


# --- a key never leaks -------------------------------------------------------------------------


async def test_keys_never_appear_in_responses_metrics_or_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "keys.yaml"
    full = add_key(path, "full")
    limited = add_key(path, "limited", models=("sim",), rpm=2, tpm=500)
    unknown = new_key()
    secrets_ = [full, limited, unknown]
    seen: list[bytes] = []

    def record(response: httpx.Response) -> httpx.Response:
        seen.append(response.content)
        seen.append(repr(response.headers.multi_items()).encode())
        return response

    async with (
        serve(auth_settings(path)) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as client,
    ):
        statuses: list[int] = []
        for key, method, url, body in [
            (full, "POST", "/v1/chat/completions", CHAT),
            (full, "POST", "/v1/chat/completions", {**CHAT, "stream": True}),
            (full, "POST", "/v1/completions", completion("nope")),  # 404 model
            (full, "POST", "/v1/completions", {"model": "sim"}),  # 400
            (full, "POST", "/v1/completions", completion(max_tokens=10_000)),  # 400 context
            (full, "GET", "/v1/models", None),
            (full, "GET", "/openapi.json", None),
            (full, "GET", "/missing", None),
            (limited, "POST", "/v1/completions", completion("slow")),  # 403
            (limited, "POST", "/v1/completions", completion()),
            (limited, "POST", "/v1/completions", completion()),
            (limited, "POST", "/v1/completions", completion()),  # 429 rpm
            (limited, "POST", "/v1/completions", completion(max_tokens=600)),  # 429 > tpm
            (limited, "POST", "/generate", {"prompt": "hi", "max_tokens": 2}),
            (unknown, "POST", "/v1/chat/completions", CHAT),  # 401
            (unknown, "GET", "/metrics", None),
            (full, "GET", "/health", None),
        ]:
            response = record(await client.request(method, url, json=body, headers=bearer(key)))
            statuses.append(response.status_code)
        malformed = record(await client.post("/v1/completions", content=b"{", headers=bearer(full)))
        statuses.append(malformed.status_code)
        metrics = record(await client.get("/metrics"))

    assert {200, 400, 401, 403, 404, 429} <= set(statuses), statuses
    assert b'"limited"' in metrics.content  # key names are labels; keys are not
    # Messages, and every attribute of every record (structured extras such as access lines).
    logs = [r.getMessage() for r in caplog.records]
    logs += [repr(vars(r)) for r in caplog.records]
    logs += [caplog.text]
    assert any("API key" in line for line in logs)  # the keys file load was logged
    for secret in secrets_:
        token = secret.removeprefix("sk-llmserve-")
        for blob in seen:
            assert secret.encode() not in blob
            assert token.encode() not in blob
        for line in logs:
            assert token not in line


# --- when auth is off, the server says so ------------------------------------------------------


def test_auth_off_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(models=SIM_MODELS, auth=AuthConfig(enabled=False))
    with caplog.at_level(logging.WARNING, logger="llmserve.app"):
        app = create_app(settings, ModelRegistry.from_config(settings.models, settings.cache_dir))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("AUTHENTICATION IS OFF" in r.getMessage() for r in warnings), warnings
    assert AuthMiddleware not in [getattr(m, "cls", None) for m in app.user_middleware]


def test_auth_on_without_keys_warns_that_every_request_will_be_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = auth_settings(tmp_path / "absent.yaml")
    with caplog.at_level(logging.WARNING, logger="llmserve.app"):
        app = create_app(settings, ModelRegistry.from_config(settings.models, settings.cache_dir))
    messages = [r.getMessage() for r in caplog.records]
    assert any("no API keys" in m and "absent.yaml" in m for m in messages), messages
    assert not any("AUTHENTICATION IS OFF" in m for m in messages)
    assert AuthMiddleware in [getattr(m, "cls", None) for m in app.user_middleware]


def test_the_default_keys_file_is_in_the_user_config_dir() -> None:
    assert Settings(models=SIM_MODELS).keys_path == Path.home() / ".config/llmserve/keys.yaml"
    explicit = Path("/srv/keys.yaml")
    assert auth_settings(explicit).keys_path == explicit


async def test_with_auth_off_clients_cannot_mint_unbounded_metric_labels() -> None:
    """Auth off: each bearer token is its own fair-queueing tenant, which is fine; but a label
    value per client-chosen token is not."""
    settings = Settings(models=SIM_MODELS, auth=AuthConfig(enabled=False))
    tokens = [new_key() for _ in range(30)]
    async with (
        serve(settings) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as client,
    ):
        before = key_label_values((await client.get("/metrics")).text)
        for token in tokens:
            for model in ("sim", "no-such-model"):  # a served request and a refused one
                await client.post("/v1/completions", json=completion(model), headers=bearer(token))
        scrape = (await client.get("/metrics")).text
    for token in tokens:
        assert token not in scrape
    minted = key_label_values(scrape) - before
    assert len(minted) <= 1, f"{len(minted)} new 'key' label values on /metrics: {minted}"


def key_label_values(scrape: str) -> set[str]:
    return {
        sample.labels["key"]
        for family in text_string_to_metric_families(scrape)
        for sample in family.samples
        if "key" in sample.labels
    }
