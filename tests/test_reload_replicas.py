"""Two gateway processes sharing a real redis-server: a reload through one reaches the other within a second, a
replica restarted on the same file runs what the others run, and one that cannot load the shared policy says so."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_KEY, Server, replicas, start_server, stop_server
from tests.redis_server import RedisServer
from tests.upstream import UpstreamServer

POLICY = """
reliability: {{retries: {{max_retries: 0}}}}
backends:
  up: {{type: openai, base_url: "{url}", model: m}}
state:
  redis_url: "{redis}"
  timeout_s: 1.0  # generous: 2 loaded cores
models:
  alpha: {{backend: up}}
"""
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def pair(redis_server: RedisServer, upstream: UpstreamServer, tmp_path: Path) -> Iterator[tuple[Path, list[Server]]]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(url=upstream.base_url, redis=redis_server.url))
    with replicas(policy, tmp_path, 2) as servers:
        yield policy, servers


def version_of(server: Server) -> str:
    found: str = httpx.get(f"{server.url}/readyz", timeout=5).json()["policy"]
    return found


def put(server: Server, text: str) -> httpx.Response:
    return httpx.put(f"{server.url}/admin/policy", content=text, headers=ADMIN, timeout=30)


def seconds_until(server: Server, version: str, within: float = 10.0) -> float:
    began = time.monotonic()
    while version_of(server) != version:
        if time.monotonic() - began > within:
            raise AssertionError(f"{server.url} still runs {version_of(server)}, not {version}")
        time.sleep(0.01)
    return time.monotonic() - began


def test_a_put_on_one_replica_reaches_the_other_within_a_second(pair: tuple[Path, list[Server]]) -> None:
    policy, (first, second) = pair
    assert version_of(first) == version_of(second)  # the same file: one shared version
    text = policy.read_text() + "  beta: {backend: up}\n"
    answer = put(first, text)
    assert answer.status_code == 200, answer.text
    version = answer.json()["version"]
    waited = seconds_until(second, version)
    print(f"\nthe other replica ran {version} {waited * 1000:.0f} ms after the PUT answered")
    assert waited < 1.0
    chat = {"model": "beta", "messages": [{"role": "user", "content": "hi"}]}
    reply = httpx.post(f"{second.url}/v1/chat/completions", json=chat, timeout=30)
    assert reply.status_code == 200 and reply.headers["x-tiergate-policy"] == version
    history = httpx.get(f"{second.url}/admin/policy", headers=ADMIN, timeout=5).json()["history"]
    assert (history[0]["trigger"], history[0]["result"], history[0]["summary"]) == ("store", "ok", "models +beta")


def test_a_replica_restarted_on_the_same_file_runs_the_shared_policy(
    pair: tuple[Path, list[Server]], tmp_path: Path
) -> None:
    policy, servers = pair
    version = put(servers[0], policy.read_text() + "  gamma: {backend: up}\n").json()["version"]
    seconds_until(servers[1], version)
    stop_server(servers[1])
    servers[1] = start_server(policy, tmp_path / "gateway-restarted.log")
    seconds_until(servers[1], version)  # adopted from the store, not the file it read
    models = httpx.get(f"{servers[1].url}/v1/models", timeout=5).json()["data"]
    assert {model["id"] for model in models} == {"alpha", "gamma"}


def test_a_new_file_on_every_replica_gives_one_version(pair: tuple[Path, list[Server]]) -> None:
    policy, (first, second) = pair
    before = version_of(first)
    policy.write_text(policy.read_text() + "  delta: {backend: up}\n")  # both watch this file
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (version_of(first) == before or version_of(first) != version_of(second)):
        time.sleep(0.05)
    assert version_of(first) == version_of(second) != before
    assert int(version_of(first).split("-")[0]) == int(before.split("-")[0]) + 1  # one publish, not one each
