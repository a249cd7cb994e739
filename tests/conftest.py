"""Shared fixtures: real tiergate servers on loopback, driven with the official openai SDK."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx
import pytest
from openai import OpenAI

from tests.upstream import UpstreamServer


class Startable(Protocol):
    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


Part = TypeVar("Part", bound=Startable)


@contextlib.asynccontextmanager
async def started(part: Part) -> AsyncIterator[Part]:
    """A backend or embedder started for the block and closed after it, in-process."""
    await part.start()
    try:
        yield part
    finally:
        await part.aclose()

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "test-admin-key"  # every test server gets it as TIERGATE_ADMIN_KEY: /readyz details need it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    clients: list[OpenAI] = field(default_factory=list)  # closed with the server, not left to the GC

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def client(self, api_key: str = "none", **options: object) -> OpenAI:
        made = OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, **options)  # type: ignore[arg-type]
        self.clients.append(made)
        return made

    def readiness(self) -> dict[str, Any]:
        """The admin's /readyz: backends with their state and figures, models, circuits."""
        response = httpx.get(f"{self.url}/readyz", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=5)
        body: dict[str, Any] = response.json()
        return body

    def status(self, backend: str) -> dict[str, object]:
        found: dict[str, object] = self.readiness()["backends"][backend]
        return found

    def log_lines(self, *needles: str, within: float = 5.0) -> list[str]:
        """The log lines that contain every needle, waiting up to `within` for the first of them."""
        deadline = time.monotonic() + within
        while True:
            found = [line for line in self.log.read_text().splitlines() if all(needle in line for needle in needles)]
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not found:
            raise AssertionError(f"no line with {needles!r} in the gateway log:\n{self.log.read_text()}")
        return found


def start_server(policy: Path, log: Path, env: dict[str, str] | None = None, ready_within: float = 120) -> Server:
    port = free_port()
    with log.open("wb") as handle:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--policy", str(policy), "--port", str(port)],
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TIERGATE_ADMIN_KEY": ADMIN_KEY, **(env or {})},
        )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + ready_within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tiergate exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"tiergate not ready within {ready_within} s:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    for client in server.clients:
        client.close()
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@contextlib.contextmanager
def serving(policy_text: str, folder: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    """A gateway on a policy written for the test (e.g. pointing at a fault-injecting upstream)."""
    policy = folder / "policy.yaml"
    policy.write_text(policy_text)
    server = start_server(policy, folder / "gateway.log", env)
    try:
        yield server
    finally:
        stop_server(server)


@contextlib.contextmanager
def replicas(policy: Path, folder: Path, count: int) -> Iterator[list[Server]]:
    """`count` gateway processes on one policy file (replicas sharing its `state:`), all stopped at the end, also
    those a test put in the list in place of one it restarted."""
    servers: list[Server] = []
    try:
        for index in range(count):
            servers.append(start_server(policy, folder / f"gateway-{index}.log"))
        yield servers
    finally:
        for server in servers:
            stop_server(server)


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    """A fault-injecting OpenAI-compatible upstream for the test module (see tests/upstream.py)."""
    with UpstreamServer() as server:
        yield server


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The default policy (SmolLM2, Gemma 270M, MiniLM) served for real, as `make serve` does."""
    server = start_server(ROOT / "policies" / "default.yaml", tmp_path_factory.mktemp("logs") / "default.log")
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def client(gateway: Server) -> OpenAI:
    return gateway.client()
