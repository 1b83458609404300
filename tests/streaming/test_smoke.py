import httpx
from tests.conftest import RunningServer


async def test_server_answers_ready(sim_server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=sim_server.url) as client:
        response = await client.get("/ready")
    assert response.status_code == 200
    assert response.json()["models"] == {"sim": True, "slow": True}
