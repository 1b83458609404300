"""The monitoring assets under deploy/ against the real tools: promtool checks the Prometheus
config and alert rules and runs their unit tests; a real Prometheus on loopback scrapes a running
gateway under traffic every second, evaluates the rules, and answers every dashboard query.

Without the prometheus / promtool binaries these tests are skipped, except under CI (the CI
environment variable set), where a missing binary is a failure, not a silent skip."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import pytest_asyncio
import yaml

from llmserve.config import AdmissionConfig, Limits, Settings, SimulatedModel
from tests.conftest import RunningServer, free_port, serve
from tests.support.eventually import eventually

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "llmserve.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
MODEL = "sim"  # what the dashboard's $model variable is set to in the live queries
CHAT = [{"role": "user", "content": "hello there"}]
WITHIN_S = 20.0


def require(binary: str) -> str:
    path = shutil.which(binary) or shutil.which(binary, path="/usr/bin")
    if path is None:
        reason = f"{binary} is not installed (Debian: apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def promtool(*args: str) -> None:
    result = subprocess.run(
        [require("promtool"), *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels of collapsed rows included."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) with Grafana's variables replaced as Grafana would."""
    out = []
    for panel in panels(dashboard()):
        for target in panel.get("targets", []):
            expr = re.sub(r"\$\{?model\}?", MODEL, target["expr"])
            out.append((panel["title"], expr.replace("$__rate_interval", "10s")))
    return out


# --- promtool ------------------------------------------------------------------------------


def test_prometheus_config_is_valid() -> None:
    """The shipped config as is: its rule_files path resolves beside it."""
    promtool("check", "config", "prometheus.yml")


def test_alert_rules_are_valid() -> None:
    promtool("check", "rules", "alerts.yml")


def test_alert_rules_pass_their_unit_tests() -> None:
    promtool("test", "rules", "alerts_test.yml")


def test_every_alert_is_labelled_annotated_and_unit_tested() -> None:
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    cases = [case for group in tests for case in group["alert_rule_test"]]
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name
        assert "$value" in rule["annotations"]["description"], name
        own = [case for case in cases if case["alertname"] == name]
        assert any(case.get("exp_alerts") for case in own), f"{name} is never tested firing"
        assert any(not case.get("exp_alerts") for case in own), f"{name} never tested silent"


# --- Grafana -------------------------------------------------------------------------------


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["datasource"]["uid"] == "${datasource}"
    assert "label_values(" in json.dumps(model["query"])
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(board):
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")), panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert all(ref_ids) and len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert all(target["expr"].strip() for target in panel["targets"]), panel["title"]


def test_dashboard_covers_the_metrics() -> None:
    exprs = " ".join(expr for _, expr in dashboard_queries())
    for metric in (
        "llmserve_generation_tokens_total",
        "llmserve_prompt_tokens_total",
        "llmserve_time_to_first_token_seconds_bucket",
        "llmserve_inter_token_latency_seconds_bucket",
        "llmserve_request_duration_seconds_bucket",
        "llmserve_queue_wait_seconds_bucket",
        "llmserve_queue_requests",
        "llmserve_queue_tokens",
        "llmserve_queue_capacity_requests",
        "llmserve_requests_in_flight",
        "llmserve_requests_total",
        "llmserve_rejections_total",
        "vllm:kv_cache_usage_perc",
        "llmserve_gpu_memory_used_bytes",
        "llmserve_gpu_memory_total_bytes",
        "llmserve_gpu_utilization_ratio",
        "llmserve_rate_limit_store_up",
    ):
        assert re.search(rf"{re.escape(metric)}\b", exprs), f"no panel shows {metric}"


def test_grafana_provisioning() -> None:
    sources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    [source] = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http://")
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "llmserve.yml").read_text())
    [provider] = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


# --- a real Prometheus scraping a running gateway ------------------------------------------


@dataclass
class Live:
    server: RunningServer
    api: httpx.AsyncClient
    traffic: asyncio.Task[None]

    async def query(self, promql: str) -> dict[str, Any]:
        response = await self.api.get("/api/v1/query", params={"query": promql})
        return response.json()  # type: ignore[no-any-return]

    async def result(self, promql: str) -> list[dict[str, Any]]:
        body = await self.query(promql)
        assert body["status"] == "success", f"{promql}: {body}"
        return body["data"]["result"]  # type: ignore[no-any-return]

    async def eventually(self, check: Callable[[], Awaitable[str | None]]) -> None:
        """Poll ``check`` (None: satisfied, else what is missing) for up to WITHIN_S."""
        problems: list[str | None] = []

        async def satisfied() -> bool:
            if self.traffic.done():
                self.traffic.result()  # the load generator failed: show why
            problems.append(await check())
            return problems[-1] is None

        try:
            await eventually(satisfied, WITHIN_S, interval=0.5)
        except AssertionError:
            pytest.fail(f"not within {WITHIN_S} s: {problems[-1]}")


def gateway_settings() -> Settings:
    """Model "sim", fast with a roomy queue; "tiny", one running and one waiting (503s)."""
    return Settings(
        models=[
            SimulatedModel(
                engine="simulated", name=MODEL, tokens_per_second=200, first_token_latency_s=0.01
            ),
            SimulatedModel(
                engine="simulated",
                name="tiny",
                tokens_per_second=40,
                first_token_latency_s=0.05,
                admission=AdmissionConfig(max_in_flight=1, max_waiting_requests=1),
            ),
        ],
        limits=Limits(),
    )


async def chat(client: httpx.AsyncClient, model: str, *, stream: bool) -> int:
    body = {"model": model, "messages": CHAT, "max_tokens": 12, "stream": stream}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        await response.aread()
        return response.status_code


async def invalid(client: httpx.AsyncClient) -> int:
    body = {"model": MODEL, "messages": "not a list"}
    return (await client.post("/v1/chat/completions", json=body)).status_code


async def refusals(client: httpx.AsyncClient) -> None:
    """Overload "tiny" (503 queue_full, streaming and not) and send invalid requests (400)."""
    codes = await asyncio.gather(
        *(chat(client, "tiny", stream=i % 2 == 0) for i in range(8)),
        invalid(client),
        invalid(client),
    )
    assert codes.count(503) >= 4 and codes.count(400) == 2, codes


async def steady_traffic(client: httpx.AsyncClient) -> None:
    while True:
        codes = await asyncio.gather(
            chat(client, MODEL, stream=True), chat(client, MODEL, stream=False)
        )
        assert list(codes) == [200, 200], codes
        await asyncio.sleep(0.05)


def prometheus_config(target: str, path: Path) -> Path:
    """The shipped config, scraping this gateway every second with the shipped rules."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / "alerts.yml")]
    [job] = [job for job in config["scrape_configs"] if job["job_name"] == "llmserve"]
    job["static_configs"] = [{"targets": [target]}]
    config["scrape_configs"] = [job]  # no `vllm serve` engine here
    path.write_text(yaml.safe_dump(config))
    return path


def open_log(path: Path) -> IO[bytes]:
    return path.open("wb")


async def start_prometheus(binary: str, target: str, workdir: Path) -> tuple[Any, str]:
    port = free_port()
    with open_log(workdir / "prometheus.log") as log:
        process = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={prometheus_config(target, workdir / 'prometheus.yml')}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            stdout=log,
            stderr=log,
        )
    url = f"http://127.0.0.1:{port}"

    async def ready(client: httpx.AsyncClient) -> bool:
        assert process.returncode is None, "Prometheus exited"  # no use waiting on
        try:
            return (await client.get(url + "/-/ready")).status_code == 200
        except httpx.TransportError:
            return False

    async with httpx.AsyncClient(timeout=2) as client:
        try:
            await eventually(lambda: ready(client), 15.0, "Prometheus ready", 0.1)
            return process, url
        except AssertionError:
            pass
    await stop(process)
    pytest.fail(f"Prometheus did not start:\n{(workdir / 'prometheus.log').read_text()[-3000:]}")


async def stop(process: Any) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Live]:
    binary = require("prometheus")
    async with (
        serve(gateway_settings()) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as client,
    ):
        await refusals(client)
        traffic = asyncio.create_task(steady_traffic(client))
        process = None
        try:
            target = server.url.removeprefix("http://")
            workdir = tmp_path_factory.mktemp("prometheus")
            process, url = await start_prometheus(binary, target, workdir)
            async with httpx.AsyncClient(base_url=url, timeout=10) as api:
                yield Live(server, api, traffic)
        finally:
            traffic.cancel()
            await asyncio.wait({traffic})
            if process is not None:
                await stop(process)
        if not traffic.cancelled():
            traffic.result()  # the load generator failed: say why


@pytest.mark.asyncio(loop_scope="module")
async def test_prometheus_scrapes_the_gateway(live: Live) -> None:
    async def tokens_flow() -> str | None:
        if await live.result("sum(rate(llmserve_generation_tokens_total[10s])) > 0"):
            return None
        return "no generated tokens/s"

    async def ttft_has_samples() -> str | None:
        ttft = "llmserve_time_to_first_token_seconds_bucket"
        rows = await live.result(f"histogram_quantile(0.95, sum by (le) (rate({ttft}[10s])))")
        values = [float(row["value"][1]) for row in rows]
        return None if values and all(math.isfinite(v) for v in values) else f"TTFT p95 {values}"

    async def queue_gauges() -> str | None:
        rows = await live.result('llmserve_queue_requests{job="llmserve"}')
        models = {row["metric"]["model"] for row in rows}
        return None if models == {MODEL, "tiny"} else f"llmserve_queue_requests for {models}"

    async def refusals_counted() -> str | None:
        for promql in (
            'llmserve_rejections_total{reason="queue_full"} > 0',
            'llmserve_rejections_total{reason="validation"} > 0',
            'llmserve_requests_total{model="tiny", status="queue_full"} > 0',
        ):
            if not await live.result(promql):
                return f"nothing for {promql}"
        return None

    for check in (tokens_flow, ttft_has_samples, queue_gauges, refusals_counted):
        await live.eventually(check)


@pytest.mark.asyncio(loop_scope="module")
async def test_alert_rules_load_and_evaluate(live: Live) -> None:
    expected = {rule["alert"] for rule in alert_rules()}

    async def rules_healthy() -> str | None:
        body = (await live.api.get("/api/v1/rules", params={"type": "alert"})).json()
        health = {r["name"]: r["health"] for g in body["data"]["groups"] for r in g["rules"]}
        if set(health) != expected:
            return f"rules loaded: {sorted(health)}"
        bad = {name: h for name, h in health.items() if h != "ok"}
        return f"not healthy: {bad}" if bad else None

    await live.eventually(rules_healthy)
    alerts = (await live.api.get("/api/v1/alerts")).json()["data"]["alerts"]
    active = {alert["labels"]["alertname"] for alert in alerts}
    # The gateway is up; its rate-limit store gauge may read its initial 0 (no limited key in
    # this suite), which must not count as an outage without store errors.
    assert not active & {"LLMServeTargetDown", "LLMServeRateLimitStoreDown"}, alerts


@pytest.mark.asyncio(loop_scope="module")
async def test_every_dashboard_query_runs(live: Live) -> None:
    queries = dashboard_queries()
    for title, expr in queries:
        assert "$" not in expr, f"{title}: a variable left unreplaced in {expr}"
        body = await live.query(expr)
        assert body["status"] == "success", f"{title}: {expr}: {body}"

    async def model_variable_resolves() -> str | None:
        response = await live.api.get(
            "/api/v1/label/model/values", params={"match[]": "llmserve_requests_in_flight"}
        )
        models = response.json()["data"]
        return None if MODEL in models else f"$model's label_values gives {models}"

    await live.eventually(model_variable_resolves)

    core = {
        "Generated tokens/s",
        "Time to first token",
        "Queue depth vs capacity",
        "In-flight requests",
        "Requests by status",
    }
    assert core <= {title for title, _ in queries}

    async def core_panels_show_data() -> str | None:
        empty = set()
        for title in core:
            exprs = [expr for t, expr in queries if t == title]
            if not any([await live.result(expr) for expr in exprs]):
                empty.add(title)
        return f"empty panels: {sorted(empty)}" if empty else None

    await live.eventually(core_panels_show_data)
