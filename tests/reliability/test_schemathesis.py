"""Schemathesis against the OpenAPI spec llmserve serves (GET /openapi.json on a running
``llmserve serve`` process, over its socket): generated valid and invalid requests for every
operation must never get a 5xx or a traceback, every error must be the OpenAI error body, and
every response must match what the spec says.

The routes parse JSON themselves, so FastAPI cannot see their bodies; the served spec declares
them all the same (``api/openapi.py``). Should an operation lack one, its body schema is taken
from the wire models the route validates against (``wire/schema.py``) so that the fuzzer still
has something to send, with ``model`` narrowed to the served model's name so that requests get
past the model lookup to validation and the engine; where the spec declares a body, nothing is
added.

Bounded for CI: a fixed number of examples per operation and mode (derandomised, so each run
sends the same requests). ``FUZZ_EXAMPLES=500 pytest tests/reliability/test_schemathesis.py``
runs a longer search.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from pydantic import BaseModel
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from llmserve.wire.schema import ChatCompletionRequest, CompletionRequest, GenerateRequest
from tests.reliability.helpers import (
    PING_COMPLETION,
    assert_no_traceback,
    assert_openai_error,
    simulated_config,
)
from tests.support.gateway import ServerProcess, gateway_process

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
CONFORMANCE_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "12"))
# No answer to a generated request may take longer (the model is fast; nothing should queue).
SLOWEST_ANSWER_S = 5.0

BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/generate": GenerateRequest,
}


@dataclass
class FuzzTarget:
    gateway: ServerProcess
    served: dict[str, Any]  # the spec exactly as served
    schema: Any  # schemathesis schema: the served spec, with request bodies where it had none
    session: requests.Session

    @property
    def url(self) -> str:
        return self.gateway.url


def with_request_bodies(spec: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(spec)
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    for path, model in BODIES.items():
        operation = spec["paths"][path]["post"]
        if "requestBody" in operation:
            continue
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        schema["properties"]["model"] = {"enum": ["sim"]}
        components[model.__name__] = schema
        operation["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            },
        }
    return spec


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    workdir = Path(tmp_path_factory.mktemp("fuzz"))
    # A fast model with a small context: no generated request takes long.
    config = simulated_config(tokens_per_second=1_000_000, max_model_len=512)
    gateway = gateway_process(workdir / "llmserve.yaml", config)
    asyncio.run(gateway.start("/ready"))
    try:
        served = httpx.get(gateway.url + "/openapi.json", timeout=10).json()
        schema = schemathesis.openapi.from_dict(with_request_bodies(served))
        with requests.Session() as session:
            yield FuzzTarget(gateway, served, schema, session)
    finally:
        asyncio.run(gateway.stop())


def first_values(headers: dict[str, Any]) -> dict[str, str]:
    """Schemathesis keeps every value of a header; the checks here want the first, by lower name."""
    return {
        name.lower(): value[0] if isinstance(value, list) else value
        for name, value in headers.items()
    }


def run_operations(
    target: FuzzTarget, examples: int, examine: Any, modes: tuple[GenerationMode, ...]
) -> int:
    """Run ``examine(operation, case, response)`` on generated cases of every operation and
    mode; returns how many requests were sent."""
    sent = 0
    for result in target.schema.get_all_operations():
        operation = result.ok()
        for mode in modes:

            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(mode))
            def one(case: Any) -> None:
                nonlocal sent
                began = time.monotonic()
                response = case.call(base_url=target.url, session=target.session, timeout=30)
                sent += 1
                elapsed = time.monotonic() - began
                assert elapsed < SLOWEST_ANSWER_S, f"{elapsed:.1f} s: {case.as_curl_command()}"
                examine(operation, case, response)  # noqa: B023 - called within this iteration

            # Unsatisfiable: nothing to make invalid (an operation without parameters or body).
            with contextlib.suppress(Unsatisfiable):
                one()
    return sent


def test_fuzzed_requests_never_get_a_5xx_or_a_traceback(target: FuzzTarget) -> None:
    """Valid and invalid requests (schemathesis' positive and negative modes) to every operation:
    no 5xx, every 4xx the OpenAI error body, no traceback anywhere (responses or the server's
    log), and afterwards nothing held and the server still serving."""
    failures: dict[str, str] = {}

    def examine(operation: Any, case: Any, response: Any) -> None:
        where = f"{operation.label} -> {response.status_code}"
        problem = None
        try:
            case.validate_response(response, checks=[not_a_server_error])
            assert_no_traceback(response.content, where)
            if response.status_code >= 400:
                assert_openai_error(
                    response.status_code,
                    first_values(response.headers),
                    response.content,
                    response.status_code,
                    where=where,
                )
        except (AssertionError, BaseExceptionGroup) as exc:
            problem = f"{where}: {str(exc).splitlines()[0][:200]}"
        if problem is not None:
            curl = case.as_curl_command()
            if problem not in failures or len(curl) < len(failures[problem]):
                failures[problem] = curl  # the shortest request that shows it

    sent = run_operations(
        target, FUZZ_EXAMPLES, examine, (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    )
    assert sent > FUZZ_EXAMPLES * 3, sent
    report = [f"{problem}\n    {curl[:1000]}" for problem, curl in failures.items()]
    assert not report, "fuzzing found:\n" + "\n".join(report)
    ping = httpx.post(target.url + "/v1/completions", json=PING_COMPLETION, timeout=10)
    assert ping.status_code == 200, ping.text
    metrics = httpx.get(target.url + "/metrics", timeout=10).text
    for line in metrics.splitlines():
        if line.startswith(("llmserve_requests_in_flight{", "llmserve_queue_requests{")):
            assert float(line.rsplit(" ", 1)[1]) == 0, line
    assert "Traceback" not in target.gateway.log_text(), target.gateway.log_text(3000)


def test_fuzzed_responses_conform_to_the_served_spec(target: FuzzTarget) -> None:
    """Every response is one the served spec declares, with the declared status, media type,
    schema and headers: errors (400, 404, 413, 429, 503...) with the OpenAI error schema,
    ``text/event-stream`` for streams, ``text/plain`` for /metrics. Each distinct mismatch is
    listed with one request that shows it.

    By hand: ``curl -s localhost:8000/openapi.json | jq '.paths["/v1/completions"]'`` and
    compare with ``curl -si localhost:8000/v1/completions -d '{}'`` (a 400).
    """
    found: dict[str, str] = {}

    def examine(operation: Any, case: Any, response: Any) -> None:
        try:
            case.validate_response(
                response,
                checks=[
                    status_code_conformance,
                    content_type_conformance,
                    response_schema_conformance,
                    response_headers_conformance,
                ],
            )
        except (AssertionError, BaseExceptionGroup) as exc:
            failures = exc.exceptions if isinstance(exc, BaseExceptionGroup) else (exc,)
            for failure in failures:
                title = getattr(failure, "title", type(failure).__name__)
                media = first_values(response.headers).get("content-type", "").split(";")[0]
                key = f"{operation.label}: {title} ({response.status_code} {media})"
                curl = case.as_curl_command()
                if key not in found or len(curl) < len(found[key]):
                    found[key] = curl  # the shortest request that shows it

    run_operations(
        target, CONFORMANCE_EXAMPLES, examine, (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    )
    report = [f"{key}\n    {curl[:400]}" for key, curl in sorted(found.items())]
    assert not report, "responses the served spec does not describe:\n" + "\n".join(report)


def test_the_served_spec_declares_bodies_errors_and_media_types(target: FuzzTarget) -> None:
    """The served spec describes the API as it is, for clients and scanners alike: each POST
    its JSON request body; each generation route its errors (400, 404, 413, 429, 503 with an
    error schema) and its ``text/event-stream`` answer; /metrics its text/plain answer."""
    paths = target.served["paths"]
    missing = []
    for path in BODIES:
        operation = paths[path]["post"]
        content = operation.get("requestBody", {}).get("content", {})
        if "application/json" not in content:
            missing.append(f"POST {path}: no application/json request body")
        responses = operation.get("responses", {})
        for status in ("400", "404", "413", "429", "503"):
            if status not in responses:
                missing.append(f"POST {path}: {status} not declared")
        if "text/event-stream" not in responses.get("200", {}).get("content", {}):
            missing.append(f"POST {path}: 200 text/event-stream not declared")
    metrics = paths["/metrics"]["get"]["responses"]["200"].get("content", {})
    if not any(media.startswith("text/plain") for media in metrics):
        missing.append(f"GET /metrics: declared as {sorted(metrics)}, served as text/plain")
    assert not missing, "the served OpenAPI spec is incomplete:\n" + "\n".join(missing)
