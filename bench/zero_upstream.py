"""A zero-delay OpenAI-compatible upstream for overhead benchmarks: canned chat.completion JSON and SSE streams.

Usage: .venv/bin/python bench/zero_upstream.py --port 9001 [--chunks 64] [--gap-ms 20]
A streamed answer has `max_tokens` content chunks when the request sets it (capped), else --chunks; the first
chunk goes out at once, the next ones --gap-ms apart, then the finish chunk and [DONE].
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_CHUNKS = 10_000
JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def completion(model: str) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-zero",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18},
        }
    )


def chunk(model: str, delta: dict[str, str], finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-zero",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


class ZeroUpstream:
    """The ASGI app: POST /v1/chat/completions answers at once; anything else is 404 (GET /health is 200)."""

    def __init__(self, chunks: int, gap_s: float) -> None:
        self.chunks = chunks
        self.gap_s = gap_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "GET" and scope["path"] == "/health":
            await self._reply(send, 200, b'{"status":"ok"}')
            return
        if scope["method"] != "POST" or not scope["path"].endswith("/chat/completions"):
            await self._reply(send, 404, b'{"error":{"message":"not found","type":"invalid_request_error"}}')
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = orjson.loads(body)
        model = str(request.get("model", "zero"))
        if not request.get("stream"):
            await self._reply(send, 200, completion(model))
            return
        count = min(int(request.get("max_tokens") or self.chunks), MAX_CHUNKS)
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        more = {"type": "http.response.body", "more_body": True}
        await send({**more, "body": chunk(model, {"role": "assistant", "content": "tok"})})
        for _ in range(count - 1):
            await asyncio.sleep(self.gap_s)
            await send({**more, "body": chunk(model, {"content": " tok"})})
        await send({**more, "body": chunk(model, {}, "length") + b"data: [DONE]\n\n"})
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    async def _reply(send: Send, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": JSON_HEADERS})
        await send({"type": "http.response.body", "body": body})


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=64, help="content chunks of a stream without max_tokens")
    parser.add_argument("--gap-ms", type=float, default=20.0, help="pause between two stream chunks")
    args = parser.parse_args()
    uvicorn.run(
        ZeroUpstream(args.chunks, args.gap_ms / 1000),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        backlog=4096,
        lifespan="off",
    )


if __name__ == "__main__":
    main()
