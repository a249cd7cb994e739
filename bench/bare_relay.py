"""The floor: a bare ASGI relay (parse JSON, forward on a pooled aiohttp session, relay the answer or the stream).

Usage: .venv/bin/python bench/bare_relay.py --port 9002 --upstream http://127.0.0.1:9001/v1
"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
import orjson


class BareRelay:
    """The least a Python gateway does: no validation, no routing, no logging."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        if scope["method"] == "GET":  # readiness
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = orjson.loads(body)
        assert self.session is not None
        path = scope["path"].removeprefix("/v1")
        async with self.session.post(self.upstream + path, data=orjson.dumps(request)) as response:
            headers = [(b"content-type", response.headers.get("content-type", "application/json").encode())]
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            if request.get("stream"):
                async for data in response.content.iter_any():
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            else:
                await send({"type": "http.response.body", "body": await response.read()})

    async def lifespan(self, receive: Any, send: Any) -> None:
        await receive()  # lifespan.startup
        connector = aiohttp.TCPConnector(limit=1024, keepalive_timeout=4)
        self.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await self.session.close()
        await send({"type": "lifespan.shutdown.complete"})


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the upstream's API root, e.g. http://127.0.0.1:9001/v1")
    args = parser.parse_args()
    uvicorn.run(
        BareRelay(args.upstream),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        backlog=4096,
    )


if __name__ == "__main__":
    main()
