"""One process that loads the policy's local models once and serves them to the workers over a unix socket.

`python -m gateway.engine_process --policy P --socket PATH`, started by `tiergate serve --workers N` (N > 1).
Several workers must not each load every model (memory, and llama.cpp threads that would fight for the same
cores); vLLM splits its API servers from its engine core the same way. The socket is created with mode 0600
in a private folder: nothing on the network reaches it. The wire format is backends/engine_wire.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from backends import engine_wire as wire
from backends.base import Backend, GenerationRequest, TokenCounter
from backends.errors import BackendUnavailable, BadRequest, InternalError, NotFound, TiergateError, Unsupported
from backends.llamacpp import LlamaCppSettings
from backends.memory_estimate import refusal
from backends.protocol import ChatRequest
from gateway.http import ClientGone, json_response, unless_disconnected
from gateway.logs import WITH_PID, log_off_the_hot_path
from router.loader import load_policy
from router.table import RoutingTable, compile_policy

log = logging.getLogger("tiergate.engine")
ENGINE_KINDS = ("llamacpp",)  # backend types loaded in the engine process (in-process weights)
PR_SET_PDEATHSIG = 1
NDJSON = "application/x-ndjson"
RETIRED_DRAIN_S = 310.0  # a swapped-out model waits this long at most for its requests (300 s deadline + slack)


def engine_backend_names(table: RoutingTable) -> list[str]:
    """The backends the engine process loads: in-process models the policy does not disable."""
    return [
        name
        for name, settings in table.backends.items()
        if settings.type in ENGINE_KINDS and name not in table.disabled
    ]


class Engine:
    """The loaded backends and how their loading went; read by the routes."""

    def __init__(self, backends: Mapping[str, Backend], settings: Mapping[str, str] | None = None) -> None:
        self.backends = dict(backends)
        self.settings = dict(settings or {})  # name -> wire.settings_digest of what it was loaded with
        self.failures: dict[str, str] = {}
        self.loading_done = False
        self.in_flight: dict[int, int] = {}  # id(backend) -> requests on it: a swapped-out model closes at 0
        self._swaps: dict[tuple[str, str], asyncio.Task[None]] = {}  # (name, digest) -> its load, shared by workers
        self._closing: set[asyncio.Task[None]] = set()

    @contextlib.contextmanager
    def using(self, backend: Backend) -> Iterator[None]:
        key = id(backend)
        self.in_flight[key] = self.in_flight.get(key, 0) + 1
        try:
            yield
        finally:
            self.in_flight[key] -= 1
            if not self.in_flight[key]:
                del self.in_flight[key]

    async def swap(self, name: str, settings: LlamaCppSettings) -> None:
        """Load `name` with `settings` beside what serves under that name, then put it in its place.

        Called by each worker whose reload built this backend anew (its EngineBackend.start); the workers share
        one load per settings digest. Requests still on the old model finish on it; it is closed after them.
        """
        digest = wire.settings_digest(settings)
        if self.settings.get(name) == digest and name in self.backends and name not in self.failures:
            return
        key = (name, digest)
        if key not in self._swaps:
            self._swaps[key] = asyncio.create_task(self._load_beside(name, settings, digest))
            self._swaps[key].add_done_callback(lambda _: self._swaps.pop(key, None))
        await asyncio.shield(self._swaps[key])

    async def _load_beside(self, name: str, settings: LlamaCppSettings, digest: str) -> None:
        refused = await asyncio.to_thread(refusal, [(name, settings)])
        if refused is not None:
            raise BackendUnavailable(refused)
        began = time.perf_counter()
        fresh = settings.create(name)
        try:
            await fresh.start()
        except BaseException:
            await fresh.aclose()
            raise
        old = self.backends.get(name)
        self.backends[name], self.settings[name] = fresh, digest
        self.failures.pop(name, None)
        log.info("engine swapped %s in %.1f s (pid %d)", name, time.perf_counter() - began, os.getpid())
        if old is not None:
            task = asyncio.create_task(self._close_when_idle(name, old))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _close_when_idle(self, name: str, old: Backend) -> None:
        deadline = time.monotonic() + RETIRED_DRAIN_S
        while self.in_flight.get(id(old)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await old.aclose()
        log.info("engine closed the previous %s (pid %d)", name, os.getpid())

    async def aclose(self) -> None:
        for task in [*self._swaps.values(), *self._closing]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for backend in self.backends.values():
            await backend.aclose()

    async def load(self) -> None:
        try:
            for name, backend in self.backends.items():  # one at a time: loading competes for the same cores
                began = time.perf_counter()
                try:
                    await backend.start()
                except Exception as error:
                    message = error.message if isinstance(error, TiergateError) else f"{type(error).__name__}: {error}"
                    self.failures[name] = message
                    log.error("could not load %s: %s", name, message)
                else:
                    log.info("engine loaded %s in %.1f s (pid %d)", name, time.perf_counter() - began, os.getpid())
        finally:
            self.loading_done = True

    def backend(self, name: str) -> Backend:
        found = self.backends.get(name)
        if found is None:
            raise NotFound(f"the engine process has no backend '{name}'", code="backend_not_found")
        return found

    def status(self) -> dict[str, object]:
        return {
            "pid": os.getpid(),
            "loading_done": self.loading_done,
            "backends": {
                name: {
                    "ready": backend.ready(),
                    "error": self.failures.get(name),
                    "status": backend.status(),
                    "settings": self.settings.get(name),
                }
                for name, backend in self.backends.items()
            },
        }


def engine_app(engine: Engine) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loading = asyncio.create_task(engine.load())  # the socket answers /status while models load
        try:
            yield
        finally:
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            await engine.aclose()

    async def status(request: Request) -> Response:
        return json_response(engine.status())

    async def generate(request: Request) -> Response:
        try:
            backend = engine.backend(request.path_params["name"])
            parsed = wire.decode_request(await request.body())
            backend.check(parsed)
            with engine.using(backend):
                answer = await unless_disconnected(request.receive, backend.generate(parsed))
        except ClientGone:
            return Response(status_code=499)  # the worker went away (its client did): nobody reads this
        except TiergateError as error:
            return Response(wire.line("error", wire.encode_error(error)), media_type="application/x-ndjson")
        return Response(wire.line("answer", answer), media_type="application/x-ndjson")

    async def stream(request: Request) -> Response:
        # Errors travel as the last line, even before the first chunk: the worker raises them where the
        # in-process backend would have, so a refusal before the first chunk still becomes an HTTP status.
        try:
            backend = engine.backend(request.path_params["name"])
            parsed = wire.decode_request(await request.body())
            backend.check(parsed)
        except TiergateError as error:
            return Response(wire.line("error", wire.encode_error(error)), media_type="application/x-ndjson")
        # Starlette cancels this generator when the worker hangs up, which stops the decode loop.
        return StreamingResponse(_lines(engine, backend, parsed), media_type="application/x-ndjson")

    async def count(request: Request) -> Response:
        """count_tokens for a worker: the loaded model's tokenizer on the rendered prompt."""
        try:
            backend = engine.backend(request.path_params["name"])
            parsed = wire.decode_request(await request.body())
            if not isinstance(backend, TokenCounter) or not isinstance(parsed, ChatRequest):
                raise Unsupported(f"backend '{request.path_params['name']}' cannot count tokens")
            with engine.using(backend):  # a swap closes the old model only once nothing uses it
                tokens = await backend.count_tokens(parsed)
        except TiergateError as error:
            return Response(wire.line("error", wire.encode_error(error)), media_type=NDJSON)
        return Response(wire.line("answer", {"input_tokens": tokens}), media_type=NDJSON)

    async def swap(request: Request) -> Response:
        """A worker's reload built this backend with these settings: load them here (once for all workers)."""
        try:
            settings = LlamaCppSettings.model_validate_json(await request.body())
            await engine.swap(request.path_params["name"], settings)
        except ValidationError as error:
            return Response(wire.line("error", wire.encode_error(BadRequest(str(error)))), media_type=NDJSON)
        except TiergateError as error:
            return Response(wire.line("error", wire.encode_error(error)), media_type=NDJSON)
        except Exception as error:  # the model's own load failure, whatever it is
            failed = BackendUnavailable(f"backend '{request.path_params['name']}': {type(error).__name__}: {error}")
            return Response(wire.line("error", wire.encode_error(failed)), media_type=NDJSON)
        return Response(wire.line("answer", {"swapped": request.path_params["name"]}), media_type=NDJSON)

    routes = [
        Route("/status", status, methods=["GET"]),
        Route("/backends/{name}", swap, methods=["PUT"]),
        Route("/generate/{name}", generate, methods=["POST"]),
        Route("/stream/{name}", stream, methods=["POST"]),
        Route("/count/{name}", count, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


async def _lines(engine: Engine, backend: Backend, request: GenerationRequest) -> AsyncIterator[bytes]:
    with engine.using(backend):
        try:
            async for chunk in backend.stream(request):
                yield wire.line("chunk", chunk)
        except TiergateError as error:
            yield wire.line("error", wire.encode_error(error))
        except Exception as error:
            log.exception("engine stream failed")
            failed = InternalError(f"engine stream failed: {type(error).__name__}")
            yield wire.line("error", wire.encode_error(failed))


def bind_private(path: Path) -> socket.socket:
    """A listening unix socket only this user may connect to (uvicorn would make its own 0666)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    old_mask = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_mask)
    os.chmod(path, 0o600)
    sock.listen(256)
    return sock


def die_with_parent() -> None:
    """Linux: SIGTERM when the `tiergate serve` that started us dies, even by SIGKILL; no orphan keeps the model."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="gateway.engine_process", description=__doc__)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--socket", required=True, type=Path)
    args = parser.parse_args(argv)
    die_with_parent()
    listener = log_off_the_hot_path(os.environ.get("TIERGATE_LOG_LEVEL", "INFO"), WITH_PID)
    table = compile_policy(load_policy(args.policy))
    names = engine_backend_names(table)
    engine = Engine(
        {name: table.backends[name].create(name) for name in names},
        {name: wire.settings_digest(table.backends[name]) for name in names},
    )
    log.info("engine process %d serving %s on %s", os.getpid(), ", ".join(names) or "nothing", args.socket)
    sock = bind_private(args.socket)
    config = uvicorn.Config(
        engine_app(engine), access_log=False, log_level="warning", loop="uvloop", log_config=None, lifespan="on"
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        with contextlib.suppress(FileNotFoundError):
            args.socket.unlink()
        listener.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
