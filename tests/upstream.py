"""A fault-injecting OpenAI-compatible upstream for tests: canned answers, scripted failures, attempt counts.

Run it in-process (`with UpstreamServer() as upstream: ...`, uvicorn in a thread on a free loopback port) or
as a process (`python -m tests.upstream --port 8001`). What each request gets is a `Behaviour`, taken in order:

1. the JSON in the request header `x-upstream-behaviour`, if present;
2. the next one planned for the request's `model` (`upstream.plan("m", Behaviour(status=429), Behaviour())`,
   or POST /_plan {"model": "m", "behaviours": [{...}], "default": {...}}); "*" plans for every model;
3. the model's default, then the "*" default, then a normal answer.

GET /_stats counts attempts per model and path, finished answers, client disconnects and exchanges still running
(`wait_idle()` waits for those); POST /_reset clears plans and counts; POST /_release lets go of streams held
with `hold=True`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import orjson
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Peer = tuple[str, int]

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


@dataclass
class Behaviour:
    """What one request gets. Stream positions count data events sent (the role chunk is the first)."""

    status: int = 200  # non-2xx: an OpenAI-shaped error body with `error_code` as its code
    error_code: str | None = None  # e.g. "context_length_exceeded"
    error_message: str = "injected failure"
    retry_after: str | None = None  # Retry-After header, seconds or an HTTP date
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # silence before the status line
    text: str = "Hello from the upstream"  # the answer; streamed one word per chunk
    chunk_delay_s: float = 0.0  # between stream chunks
    after_chunks: int = 2  # where the mid-stream faults below happen
    pause_s: float = 0.0  # mid-stream silence
    hold: bool = False  # mid-stream: wait until release() (or the client leaves)
    reset: Literal["before_headers", "after_headers", "mid_stream"] | None = None  # TCP reset
    cut: bool = False  # mid-stream: end the body cleanly, without [DONE]
    error_event: bool = False  # mid-stream: send data: {"error": ...} and end
    raw_body: str | None = None  # send this body (200, application/json) instead of an answer
    raw_chunked: bool = False  # send raw_body in 64 KiB pieces, chunked, with no Content-Length
    omit_usage: bool = False  # streams: no usage chunk even when asked (as llama_cpp.server does)
    tool_call: dict[str, str] | None = None  # {"name", "arguments"}: chat answers with this call instead of text

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Behaviour:
        known = {item.name for item in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown behaviour fields: {sorted(unknown)}")
        return cls(**data)


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    client: Peer  # the caller's address and port: the same port twice means a reused connection


class FaultyUpstream:
    """The ASGI app. Thread-safe controls: tests call them from another thread than the server's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._plans: dict[str, list[Behaviour]] = {}
        self._defaults: dict[str, Behaviour] = {}
        self._counts: Counter[str] = Counter()
        self._released = threading.Event()
        self.requests: list[Recorded] = []
        self.connections: dict[Peer, asyncio.Transport] = {}

    # --- controls ---

    def plan(self, model: str, *behaviours: Behaviour, default: Behaviour | None = None) -> None:
        with self._lock:
            self._plans.setdefault(model, []).extend(behaviours)
            if default is not None:
                self._defaults[model] = default

    def reset(self) -> None:
        with self._lock:
            self._plans.clear()
            self._defaults.clear()
            self._counts.clear()
            self.requests.clear()
            self._released.clear()

    def release(self) -> None:
        self._released.set()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            counts = dict(self._counts)
        return {
            "attempts": sum(value for key, value in counts.items() if key.startswith("model:")),
            "by_model": {key[6:]: value for key, value in counts.items() if key.startswith("model:")},
            "by_path": {key[5:]: value for key, value in counts.items() if key.startswith("path:")},
            "finished": counts.get("finished", 0),
            "disconnects": counts.get("disconnects", 0),  # the client left before the answer ended
            "resets": counts.get("resets", 0),  # we reset the connection, as a behaviour asked
            "in_flight": max(0, counts.get("started", 0) - counts.get("ended", 0)),
        }

    def attempts(self, model: str | None = None) -> int:
        stats = self.stats()
        return int(stats["attempts"] if model is None else stats["by_model"].get(model, 0))

    def wait_idle(self, timeout: float = 5.0) -> dict[str, Any]:
        """Stats once no exchange is running: a client can be done reading before the server's side has ended."""
        deadline = time.monotonic() + timeout
        while self.stats()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.stats()

    def _behaviour_for(self, model: str, header: str | None) -> Behaviour:
        if header:
            return Behaviour.parse(orjson.loads(header))
        with self._lock:
            for key in (model, "*"):
                if self._plans.get(key):
                    return self._plans[key].pop(0)
            return self._defaults.get(model) or self._defaults.get("*") or Behaviour()

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    # --- ASGI ---

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        raw = await _read_body(receive)
        path: str = scope["path"]
        if path.startswith("/_"):
            await self._admin(path, raw, send)
            return
        if path.endswith("/models"):
            await _json(send, 200, {"object": "list", "data": [{"id": "upstream", "object": "model"}]})
            return
        if not path.endswith(("/chat/completions", "/completions")):
            await _json(send, 404, _error(404, f"no route {path}", None))
            return
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            await _json(send, 400, _error(400, "body is not JSON", None))
            return
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        model = str(body.get("model", ""))
        with self._lock:
            self.requests.append(Recorded(path, headers, body, (str(scope["client"][0]), int(scope["client"][1]))))
            del self.requests[:-50]
        self._count(f"model:{model}")
        self._count(f"path:{path}")
        behaviour = self._behaviour_for(model, headers.get("x-upstream-behaviour"))
        exchange = _Exchange(self, scope, receive, send, behaviour)
        await exchange.run(body, chat=path.endswith("/chat/completions"))

    async def _admin(self, path: str, raw: bytes, send: Send) -> None:
        if path == "/_stats":
            await _json(send, 200, self.stats())
        elif path == "/_reset":
            self.reset()
            await _json(send, 200, {"ok": True})
        elif path == "/_release":
            self.release()
            await _json(send, 200, {"ok": True})
        elif path == "/_plan":
            data = orjson.loads(raw)
            default = data.get("default")
            self.plan(
                data.get("model", "*"),
                *(Behaviour.parse(item) for item in data.get("behaviours", [])),
                default=Behaviour.parse(default) if default is not None else None,
            )
            await _json(send, 200, {"ok": True})
        else:
            await _json(send, 404, _error(404, f"no admin route {path}", None))


class _Exchange:
    """One request: waits, faults and the answer, stopping early if the client leaves."""

    def __init__(self, app: FaultyUpstream, scope: Scope, receive: Receive, send: Send, behaviour: Behaviour) -> None:
        self.app = app
        self.client: Peer = tuple(scope["client"])
        self.receive = receive
        self.send = send
        self.behaviour = behaviour
        self.gone = asyncio.Event()
        self.sent = 0
        self.aborted = False

    async def run(self, body: dict[str, Any], *, chat: bool) -> None:
        self.app._count("started")
        watcher = asyncio.ensure_future(self._watch())
        try:
            await self._run(body, chat)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            self.app._count("resets" if self.aborted else "disconnects" if self.gone.is_set() else "finished")
            self.app._count("ended")

    async def _watch(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.gone.set()

    async def _wait(self, seconds: float) -> bool:
        """Sleep; False if the client left meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.gone.wait(), seconds)
        return not self.gone.is_set()

    async def _hold(self) -> bool:
        while not self.app._released.is_set():
            if not await self._wait(0.005):
                return False
        return True

    async def _abort(self) -> None:
        self.aborted = True
        transport = self.app.connections.get(self.client)
        if transport is not None:
            if self.sent:
                # An RST makes the client's kernel drop bytes it has not read yet: give the chunks time to land.
                while transport.get_write_buffer_size() and not self.gone.is_set():
                    await asyncio.sleep(0.005)
                await asyncio.sleep(0.2)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
            transport.abort()
        await asyncio.sleep(0.01)  # let uvicorn see the connection gone, so it sends no 500 of its own

    async def _run(self, body: dict[str, Any], chat: bool) -> None:
        behaviour = self.behaviour
        if behaviour.delay_s and not await self._wait(behaviour.delay_s):
            return
        if behaviour.reset == "before_headers":
            await self._abort()
            return
        if behaviour.status >= 300:
            headers = dict(behaviour.headers)
            if behaviour.retry_after is not None:
                headers["retry-after"] = behaviour.retry_after
            payload = _error(behaviour.status, behaviour.error_message, behaviour.error_code)
            await _json(self.send, behaviour.status, payload, headers)
            return
        if behaviour.raw_body is not None:
            if behaviour.raw_chunked:
                await self._chunked(behaviour.raw_body.encode())
                return
            await _raw(self.send, 200, behaviour.raw_body.encode(), "application/json", behaviour.headers)
            return
        answer = _Answer(body, behaviour.text, chat, behaviour.tool_call)
        if not body.get("stream"):
            content = orjson.dumps(answer.whole())
            if behaviour.reset == "after_headers":
                await self._start(200, "application/json", {"content-length": str(len(content))})
                await self._abort()
                return
            await _raw(self.send, 200, content, "application/json", behaviour.headers)
            return
        await self._start(200, "text/event-stream", {"cache-control": "no-cache", **behaviour.headers})
        if behaviour.reset == "after_headers":
            await self._abort()
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and not behaviour.omit_usage
        for event in answer.events(include_usage):
            if self.sent == behaviour.after_chunks and not await self._midway():
                return
            await self._event(event)
            if behaviour.chunk_delay_s and not await self._wait(behaviour.chunk_delay_s):
                return
        if self.sent <= behaviour.after_chunks and not await self._midway():
            return
        await self.send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def _midway(self) -> bool:
        """The mid-stream faults; False when the stream must stop here."""
        behaviour = self.behaviour
        if behaviour.pause_s and not await self._wait(behaviour.pause_s):
            return False
        if behaviour.hold and not await self._hold():
            return False
        if behaviour.reset == "mid_stream":
            await self._abort()
            return False
        if behaviour.error_event:
            await self._event(_error(500, behaviour.error_message, behaviour.error_code))
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
            return False
        if behaviour.cut:
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
            return False
        return True

    async def _chunked(self, content: bytes) -> None:
        await self._start(200, "application/json", self.behaviour.headers)
        for start in range(0, len(content), 64 * 1024):
            if self.gone.is_set():
                return
            piece = content[start : start + 64 * 1024]
            await self.send({"type": "http.response.body", "body": piece, "more_body": True})
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _start(self, status: int, content_type: str, headers: dict[str, str]) -> None:
        pairs = [(b"content-type", content_type.encode())]
        pairs += [(key.encode(), value.encode()) for key, value in headers.items()]
        await self.send({"type": "http.response.start", "status": status, "headers": pairs})

    async def _event(self, payload: dict[str, Any]) -> None:
        data = b"data: " + orjson.dumps(payload) + b"\n\n"
        await self.send({"type": "http.response.body", "body": data, "more_body": True})
        self.sent += 1


class _Answer:
    """The canned answer to one request, whole or as stream events."""

    def __init__(self, body: dict[str, Any], text: str, chat: bool, tool_call: dict[str, str] | None = None) -> None:
        self.chat = chat
        self.tool_call = tool_call if chat else None
        self.model = str(body.get("model", ""))
        self.pieces = [word + " " for word in text.split(" ")]
        self.pieces[-1] = self.pieces[-1][:-1]
        if chat:
            words = sum(len(str(message.get("content") or "").split()) for message in body.get("messages", []))
        else:
            words = len(str(body.get("prompt", "")).split())
        self.usage = {
            "prompt_tokens": words,
            "completion_tokens": len(self.pieces),
            "total_tokens": words + len(self.pieces),
        }
        self.base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-upstream-{uuid.uuid4().hex[:12]}",  # unique, as real APIs
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": "fp_upstream",
        }

    def whole(self) -> dict[str, Any]:
        text = "".join(self.pieces)
        if self.tool_call is not None:
            call = {"id": "call_upstream1", "type": "function", "function": dict(self.tool_call)}
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls"}
            return {**self.base, "object": "chat.completion", "choices": [choice], "usage": self.usage}
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice |= {"logprobs": None, "finish_reason": "stop"}
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self.base, "object": kind, "choices": [choice], "usage": self.usage}

    def events(self, include_usage: bool) -> Iterator[dict[str, Any]]:
        if self.tool_call is not None:  # the call's head, then its arguments in two fragments split mid-value
            arguments, name = self.tool_call["arguments"], self.tool_call["name"]
            head = {"index": 0, "id": "call_upstream1", "type": "function", "function": {"name": name, "arguments": ""}}
            yield self._chunk({"role": "assistant", "content": None, "tool_calls": [head]}, None)
            half = len(arguments) // 2
            for fragment in (arguments[:half], arguments[half:]):
                yield self._chunk({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}, None)
            yield self._chunk({}, "tool_calls")
            if include_usage:
                yield {**self.base, "choices": [], "usage": self.usage}
            return
        if self.chat:
            yield self._chunk({"role": "assistant", "content": ""}, None)
        for piece in self.pieces:
            yield self._chunk({"content": piece} if self.chat else piece, None)
        yield self._chunk({} if self.chat else "", "stop")
        if include_usage:
            yield {**self.base, "choices": [], "usage": self.usage}

    def _chunk(self, delta: Any, finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        choice["delta" if self.chat else "text"] = delta
        return {**self.base, "choices": [choice]}


def _error(status: int, message: str, code: str | None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _raw(send: Send, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
    pairs = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    pairs += [(key.encode(), value.encode()) for key, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": pairs})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _json(send: Send, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
    await _raw(send, status, orjson.dumps(payload), "application/json", headers)


def _protocol_for(connections: dict[Peer, asyncio.Transport]) -> type[H11Protocol]:
    """uvicorn's h11 protocol, remembering each connection's transport so a behaviour can reset it."""

    class Recording(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            if peer:
                connections[(str(peer[0]), int(peer[1]))] = transport

        def connection_lost(self, exc: Exception | None) -> None:
            peer = self.transport.get_extra_info("peername") if self.transport else None
            if peer:
                connections.pop((str(peer[0]), int(peer[1])), None)
            super().connection_lost(exc)

    return Recording


class UpstreamServer:
    """`FaultyUpstream` served by uvicorn in a background thread on 127.0.0.1 and a free port."""

    def __init__(self, app: FaultyUpstream | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app or FaultyUpstream()
        self._socket = socket.socket()
        self._socket.bind((host, port))
        self.port = int(self._socket.getsockname()[1])
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_level="critical",
            access_log=False,
            loop="asyncio",
            http=_protocol_for(self.app.connections),
            timeout_keep_alive=5,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def __enter__(self) -> UpstreamServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fault-injecting upstream did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()

    # Shortcuts to the app's controls.
    def plan(self, model: str, *behaviours: Behaviour, default: Behaviour | None = None) -> None:
        self.app.plan(model, *behaviours, default=default)

    def stats(self) -> dict[str, Any]:
        return self.app.stats()

    def wait_idle(self, timeout: float = 5.0) -> dict[str, Any]:
        return self.app.wait_idle(timeout)

    def attempts(self, model: str | None = None) -> int:
        return self.app.attempts(model)

    def last_request(self) -> Recorded:
        return self.app.requests[-1]

    def release(self) -> None:
        self.app.release()

    def reset(self) -> None:
        self.app.reset()


def behaviour_header(behaviour: Behaviour) -> dict[str, str]:
    """Headers that give one request this behaviour (for a backend's `headers` setting)."""
    return {"x-upstream-behaviour": orjson.dumps(asdict(behaviour)).decode()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    with UpstreamServer(host=args.host, port=args.port) as server:
        print(f"fault-injecting upstream on {server.base_url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server._thread.join()


if __name__ == "__main__":
    main()
