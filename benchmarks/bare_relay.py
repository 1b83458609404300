"""A minimal aiohttp pass-through relay: the floor a gateway's per-token cost is compared with.
It forwards the body and streams the upstream's bytes back as they come; it validates nothing,
limits nothing and observes nothing.

    python -m benchmarks.bare_relay --port 9100 --upstream http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

from benchmarks.servers import run_aiohttp


def build_app(upstream: str) -> web.Application:
    async def start(app: web.Application) -> None:
        app["client"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def stop(app: web.Application) -> None:
        await app["client"].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        client: aiohttp.ClientSession = request.app["client"]
        body = await request.read()
        async with client.post(
            upstream + request.path, data=body, headers={"Content-Type": "application/json"}
        ) as up:
            response = web.StreamResponse(
                status=up.status, headers={"Content-Type": "text/event-stream"}
            )
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            return response

    app = web.Application()
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_post("/v1/chat/completions", relay)
    app.router.add_post("/v1/completions", relay)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--upstream", default="http://127.0.0.1:9000")
    args = parser.parse_args()
    run_aiohttp(build_app(args.upstream), args.port)


if __name__ == "__main__":
    main()
