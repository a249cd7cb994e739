"""`tiergate serve --workers N`: the factory each worker process builds its app with, and the engine they share.

With N > 1, uvicorn's supervisor runs N workers on one listening socket. The policy's in-process models are
not loaded by each of them: one engine process (gateway/engine_process.py) loads them once, and each worker
gets an EngineBackend client of the same name, price and capabilities in their place.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from fastapi import FastAPI

from backends.base import Backend
from backends.engine_client import EngineBackend
from backends.llamacpp import LlamaCppSettings
from gateway.app import create_app
from gateway.engine_process import engine_backend_names
from gateway.logs import WITH_PID, log_off_the_hot_path
from gateway.reload import PartFactory, PolicySource
from router.loader import DEFAULT_POLICY
from router.table import RoutingTable, compile_policy

ENGINE_SOCKET_ENV = "TIERGATE_ENGINE_SOCKET"  # set by `tiergate serve` for its workers; unset: no engine
RESPAWN_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # an engine that keeps dying is restarted less and less often
log = logging.getLogger("tiergate")


def worker_backend(table: RoutingTable, name: str, engine_socket: str | None) -> Backend:
    """One of the table's backends; an in-process model as a client of the engine process (when there is one)."""
    settings = table.backends[name]
    if engine_socket and isinstance(settings, LlamaCppSettings) and name in engine_backend_names(table):
        return EngineBackend(name, settings, engine_socket)
    return settings.create(name)


def worker_backends(table: RoutingTable, engine_socket: str | None) -> dict[str, Backend]:
    return {name: worker_backend(table, name, engine_socket) for name in table.backends if name not in table.disabled}


def worker_app() -> FastAPI:
    """The app of one worker process (uvicorn spawns each one fresh: logging is set up here too)."""
    log_off_the_hot_path(os.environ.get("TIERGATE_LOG_LEVEL", "INFO"), WITH_PID)  # a daemon thread; dies with us
    policy = PolicySource.read(os.environ.get("TIERGATE_POLICY", DEFAULT_POLICY))
    table = compile_policy(policy.loaded)
    socket = os.environ.get(ENGINE_SOCKET_ENV) or None
    # a reload's new or changed local model is loaded by the engine, once for every worker (EngineBackend.start)
    parts = PartFactory(backend=lambda new, name: worker_backend(new, name, socket))
    return create_app(
        table,
        backends=worker_backends(table, socket),
        admin_key=os.environ.get("TIERGATE_ADMIN_KEY") or None,
        policy=policy,
        parts=parts,
        watch=True,
    )


class EngineProcess:
    """The engine process for one `serve`: started before the workers, restarted if it dies, stopped with serve."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.folder = Path(tempfile.mkdtemp(prefix="tiergate-engine-"))  # mode 0700: ours alone
        self.socket = self.folder / "engine.sock"
        self.process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        self.process = self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="engine-watch", daemon=True)
        self._watcher.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "gateway.engine_process", "--policy", self.policy]
        command += ["--socket", str(self.socket)]
        return subprocess.Popen(command)  # its output goes where serve's goes

    def _watch(self) -> None:
        failures = 0
        while not self._stopping.wait(0.5):
            assert self.process is not None
            code = self.process.poll()
            if code is None:
                continue
            delay = RESPAWN_DELAYS_S[min(failures, len(RESPAWN_DELAYS_S) - 1)]
            log.error("engine process %d exited with %s; starting another in %.0f s", self.process.pid, code, delay)
            failures += 1
            if self._stopping.wait(delay):
                return
            self.process = self._spawn()

    def stop(self) -> None:
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
