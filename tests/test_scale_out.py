"""The scale-out path without containers: two gateway processes sharing a real redis-server, a self-hosted
`openai` upstream (llama-cpp-python's server with Gemma 270M) as the large tier, and a round-robin client in front.
Keys, limits and reloads must agree across both replicas, whichever one a request lands on."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI, RateLimitError

from tests.conftest import ADMIN_KEY, Server, replicas
from tests.llama_server import llama_server
from tests.redis_server import RedisServer

POLICY = """
server: {{managed_keys: true}}
reliability: {{retries: {{max_retries: 0}}}}
state:
  redis_url: "{redis}"
  timeout_s: 1.0  # generous: 2 loaded cores
backends:
  engine: {{type: openai, base_url: "{url}", model: gemma, capabilities: {{max_context: 1024}}}}
models:
  big: {{backend: engine}}
"""
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
ASK = [{"role": "user", "content": "The capital of France is"}]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[Server]]]:
    folder = tmp_path_factory.mktemp("scale-out")
    with RedisServer(folder) as redis, llama_server(folder) as url:
        policy = folder / "policy.yaml"
        policy.write_text(POLICY.format(redis=redis.url, url=url))
        with replicas(policy, folder, 2) as servers:
            yield policy, servers


def round_robin(servers: list[Server], key: str) -> Iterator[OpenAI]:
    """A client per replica, taken in turn: what a round-robin load balancer does."""
    return itertools.cycle([server.client(api_key=key) for server in servers])


def new_key(server: Server, **limits: object) -> tuple[str, str]:
    made = httpx.post(f"{server.url}/admin/keys", json={"name": "scale", "team": "t", **limits}, headers=ADMIN)
    assert made.status_code == 201, made.text
    return made.json()["id"], made.json()["key"]


def test_answers_from_the_self_hosted_tier_through_both_replicas(deployment: tuple[Path, list[Server]]) -> None:
    _, servers = deployment
    _, key = new_key(servers[0])
    clients = round_robin(servers, key)
    for _ in range(4):
        answer = next(clients).chat.completions.with_raw_response.create(model="big", messages=ASK, max_tokens=2)  # type: ignore[arg-type]
        assert answer.headers["x-tiergate-backend"] == "engine"
        assert answer.parse().usage is not None and answer.parse().usage.completion_tokens >= 1


def test_a_rate_limit_holds_across_replicas(deployment: tuple[Path, list[Server]]) -> None:
    _, servers = deployment
    _, key = new_key(servers[1], rpm=3)
    clients = round_robin(servers, key)
    served = refused = 0
    for _ in range(6):  # well inside the 20 s a request takes to come back at 3 per minute
        try:
            next(clients).chat.completions.create(model="big", messages=ASK, max_tokens=1)  # type: ignore[arg-type]
            served += 1
        except RateLimitError:
            refused += 1
    assert (served, refused) == (3, 3)  # one shared bucket, not 3 per replica


def test_a_key_revoked_on_one_replica_is_refused_by_the_other(deployment: tuple[Path, list[Server]]) -> None:
    _, servers = deployment
    key_id, key = new_key(servers[0])
    assert servers[1].client(api_key=key).models.list().data
    assert httpx.delete(f"{servers[1].url}/admin/keys/{key_id}", headers=ADMIN).status_code == 200
    time.sleep(0.6)  # state.key_cache_s: 0.5 s
    for server in servers:
        assert httpx.get(f"{server.base_url}/models", headers={"authorization": f"Bearer {key}"}).status_code == 401


def test_a_reload_through_one_replica_is_served_by_both(deployment: tuple[Path, list[Server]]) -> None:
    policy, servers = deployment
    text = policy.read_text() + "  alias: {backend: engine}\n"
    answer = httpx.put(f"{servers[0].url}/admin/policy", content=text, headers=ADMIN, timeout=30)
    assert answer.status_code == 200, answer.text
    version = answer.json()["version"]
    deadline = time.monotonic() + 5
    while any(httpx.get(f"{server.url}/readyz").json()["policy"] != version for server in servers):
        assert time.monotonic() < deadline, "the other replica did not follow the reload"
        time.sleep(0.05)
    _, key = new_key(servers[1])
    clients = round_robin(servers, key)
    for _ in range(2):
        reply = next(clients).chat.completions.with_raw_response.create(model="alias", messages=ASK, max_tokens=1)  # type: ignore[arg-type]
        assert reply.headers["x-tiergate-policy"] == version
