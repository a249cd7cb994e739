"""A local model served by the shared engine process, seen from a worker: the same name, price and capabilities.

The model runs (and its response_format constraint is applied) in the engine process; this backend sends the
request over a unix socket and reads the answer back (backends/engine_wire.py). When the engine cannot be
reached, requests fail at once with BackendUnavailable (503), and /readyz says the backend is not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp
import orjson

from backends import engine_wire as wire
from backends import llamacpp_translate as translate
from backends.base import GenerationRequest, Payload
from backends.constraint import constraint_from_request
from backends.errors import BackendUnavailable, InternalError, TiergateError
from backends.llamacpp import LlamaCppSettings
from backends.protocol import ChatRequest
from backends.tool_constraint import check_tools_safe

STATUS_EVERY_S = 1.0  # how fresh /readyz's view of the engine is
CONNECT_TIMEOUT_S = 2.0
STATUS_TIMEOUT_S = 2.0
READ_BUFFER = 4 * 1024 * 1024  # aiohttp reads a line of up to twice this: one whole answer, logprobs included


class EngineBackend:
    def __init__(self, name: str, settings: LlamaCppSettings, socket_path: str, load_timeout_s: float = 900.0) -> None:
        self.name = name
        self.settings = settings
        self.digest = wire.settings_digest(settings)  # what the engine must have loaded to serve us
        self.socket_path = socket_path
        self.load_timeout_s = load_timeout_s
        self.capabilities = settings.capabilities()
        self.price = settings.price.price()
        self._session: aiohttp.ClientSession | None = None
        self._watch: asyncio.Task[None] | None = None
        self._ready = False
        self._status: dict[str, Any] = {}
        self._engine_pid: int | None = None

    # --- lifecycle and readiness ---

    async def start(self) -> None:
        """Wait until the engine has loaded this model; its load error, if any, becomes ours."""
        connector = aiohttp.UnixConnector(path=self.socket_path, limit=self.settings.max_queue + 16)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, read_bufsize=READ_BUFFER)
        deadline = asyncio.get_running_loop().time() + self.load_timeout_s
        asked = False
        while True:
            entry = await self._poll()
            if entry is not None and not asked and (entry.get("settings") != self.digest or entry.get("error")):
                await self._load_in_engine()  # a reload changed or added it, or it failed to load before
                asked = True
                continue
            if entry is not None and entry.get("error"):
                raise BackendUnavailable(str(entry["error"]))
            if self._ready:
                break
            if asyncio.get_running_loop().time() > deadline:
                raise BackendUnavailable(f"backend '{self.name}': the engine process did not load it in time")
            await asyncio.sleep(0.2)
        self._watch = asyncio.create_task(self._keep_watching())

    async def _load_in_engine(self) -> None:
        """Have the engine load this backend with our settings beside what it serves under this name (one load
        for every worker that asks), and swap it in once its self-test passed."""
        assert self._session is not None
        url = f"http://engine/backends/{self.name}"
        timeout = aiohttp.ClientTimeout(total=self.load_timeout_s)
        try:
            async with self._session.put(url, data=self.settings.model_dump_json(), timeout=timeout) as response:
                item = orjson.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as error:
            raise BackendUnavailable(f"backend '{self.name}': the engine process did not load it: {error}") from error
        if "error" in item:
            raise wire.decode_error(item["error"])

    async def _keep_watching(self) -> None:
        known_pid = self._engine_pid
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            entry = await self._poll()
            # A restarted engine loads the policy file; a reload since may have given this backend other settings.
            # Only after a restart: a retired client asking for its old settings would undo a swap.
            if entry is not None and self._engine_pid != known_pid and entry.get("settings") != self.digest:
                with contextlib.suppress(TiergateError):
                    await self._load_in_engine()
            if entry is not None:
                known_pid = self._engine_pid

    async def _poll(self) -> dict[str, Any] | None:
        """This backend's entry in the engine's /status (None: unreachable); updates ready() and status()."""
        assert self._session is not None
        try:
            async with self._session.get(
                "http://engine/status", timeout=aiohttp.ClientTimeout(total=STATUS_TIMEOUT_S)
            ) as response:
                body = orjson.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
            self._ready = False
            self._status = {"engine": "unreachable"}
            return None
        entry: dict[str, Any] = body.get("backends", {}).get(self.name) or {"error": "not in the engine process"}
        self._engine_pid = body.get("pid")
        self._ready = bool(entry.get("ready"))
        self._status = {**(entry.get("status") or {}), "engine_pid": self._engine_pid}
        return entry

    def ready(self) -> bool:
        return self._ready

    def status(self) -> dict[str, Any]:
        return dict(self._status)

    async def aclose(self) -> None:
        self._ready = False
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- the Backend interface ---

    def check(self, request: GenerationRequest) -> None:
        """What can be refused without the model (the engine checks token ids against the vocabulary too)."""
        if isinstance(request, ChatRequest):
            translate.check_chat(request, self.name, logprobs=self.settings.logprobs)
            check_tools_safe(request)
        else:
            translate.check_completion(request, self.name, logprobs=self.settings.logprobs)
        constraint_from_request(request)

    async def generate(self, request: GenerationRequest) -> Payload:
        async with contextlib.aclosing(self._exchange("generate", request)) as lines:
            async for kind, value in lines:
                if kind == "answer":
                    answer: Payload = value
                    return answer
        raise InternalError(f"backend '{self.name}': the engine process ended the answer early")

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Payload]:
        async with contextlib.aclosing(self._exchange("stream", request)) as lines:
            async for kind, value in lines:
                if kind == "chunk":
                    yield value

    async def count_tokens(self, request: ChatRequest) -> int:
        """The engine's model counts (its tokenizer and chat template are there)."""
        async with contextlib.aclosing(self._exchange("count", request)) as lines:
            async for kind, value in lines:
                if kind == "answer":
                    return int(value["input_tokens"])
        raise InternalError(f"backend '{self.name}': the engine process did not count")

    async def _exchange(self, path: str, request: GenerationRequest) -> AsyncGenerator[tuple[str, Any], None]:
        """The engine's lines for one request; its error line is raised here as the error it was there."""
        if self._session is None:
            raise BackendUnavailable(f"backend '{self.name}' is not started", retry_after=5)
        url = f"http://engine/{path}/{self.name}"
        try:
            async with self._session.post(url, data=wire.encode_request(request)) as response:
                if response.status != 200:
                    raise BackendUnavailable(f"backend '{self.name}': the engine process answered {response.status}")
                while raw := await response.content.readline():
                    item = orjson.loads(raw)
                    if "error" in item:
                        raise wire.decode_error(item["error"])
                    kind, value = next(iter(item.items()))
                    yield kind, value
        except (aiohttp.ClientError, orjson.JSONDecodeError, ValueError) as error:
            self._ready = False
            raise BackendUnavailable(
                f"backend '{self.name}': the engine process is not reachable ({type(error).__name__})", retry_after=1
            ) from error
