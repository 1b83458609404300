import httpx

from llmserve.config import Settings, UpstreamModel
from tests.conftest import RunningServer, serve


async def test_upstream_context_length_is_listed_as_configured(sim_server: RunningServer) -> None:
    configured = UpstreamModel(engine="openai", name="up", url=sim_server.url, max_model_len=256)
    unset = UpstreamModel(engine="openai", name="up2", url=sim_server.url)
    async with (
        serve(Settings(models=[configured, unset])) as gateway,
        httpx.AsyncClient(base_url=gateway.url) as client,
    ):
        listed = (await client.get("/v1/models")).json()["data"]
    by_id = {m["id"]: m for m in listed}
    assert by_id["up"]["max_model_len"] == 256
    assert "max_model_len" not in by_id["up2"]  # unknown: not invented from an estimate
