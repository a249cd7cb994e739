"""Stored responses in Redis: two gateway replicas over one real redis-server, managed keys scoped by team."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ADMIN_KEY, Server, replicas
from tests.redis_server import RedisServer
from tests.upstream import UpstreamServer

POLICY = """
server: {{managed_keys: true}}
reliability: {{retries: {{max_retries: 0}}}}
backends:
  up: {{type: openai, base_url: "{url}", model: up}}
models:
  remote: {{backend: up}}
responses:
  scope: team
  store_ttl_s: 2
state:
  redis_url: "{redis}"
  timeout_s: 1.0  # generous: 2 loaded cores
"""


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def servers(
    redis_server: RedisServer, upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Server]]:
    folder = tmp_path_factory.mktemp("responses-redis")
    policy = folder / "policy.yaml"
    policy.write_text(POLICY.format(url=upstream.base_url, redis=redis_server.url))
    with replicas(policy, folder, 2) as running:
        yield running


def _key(server: Server, team: str) -> str:
    response = httpx.post(
        f"{server.url}/admin/keys",
        json={"name": f"ci-{team}", "team": team},
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    key: str = response.json()["key"]
    return key


def test_a_response_stored_on_one_replica_is_continued_on_the_other_by_its_team_only(
    servers: list[Server], upstream: UpstreamServer
) -> None:
    first, second = servers
    alice, bob, mallory = _key(first, "search"), _key(first, "search"), _key(first, "ads")
    created = first.client(alice).responses.create(model="remote", input="Hi!", instructions="Be brief.")
    fetched = second.client(bob).responses.retrieve(created.id)  # another replica, another key of the team
    assert fetched.model_dump() == created.model_dump()

    continued = second.client(bob).responses.create(model="remote", input="And now?", previous_response_id=created.id)
    messages: list[dict[str, Any]] = upstream.last_request().body["messages"]
    assert messages == [  # the instructions are not carried over (as OpenAI does); the first turn is
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello from the upstream"},
        {"role": "user", "content": "And now?"},
    ]
    assert continued.previous_response_id == created.id

    outsider = second.client(mallory)
    with pytest.raises(openai.NotFoundError):
        outsider.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        outsider.responses.delete(created.id)
    first.client(alice).responses.delete(continued.id)
    with pytest.raises(openai.NotFoundError):
        second.client(bob).responses.retrieve(continued.id)


def test_stored_responses_expire_after_their_ttl(servers: list[Server]) -> None:
    first, second = servers
    key = _key(first, "search")
    created = first.client(key).responses.create(model="remote", input="Hi!")
    assert second.client(key).responses.retrieve(created.id).id == created.id
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # store_ttl_s: 2
        try:
            second.client(key).responses.retrieve(created.id)
        except openai.NotFoundError:
            return
        time.sleep(0.2)
    raise AssertionError("the stored response outlived its TTL")


def test_store_false_keeps_nothing(servers: list[Server]) -> None:
    first, second = servers
    key = _key(first, "search")
    created = first.client(key).responses.create(model="remote", input="Hi!", store=False)
    assert created.store is False
    with pytest.raises(openai.NotFoundError):
        second.client(key).responses.retrieve(created.id)


def test_while_redis_is_down_the_answer_is_given_unstored_and_reads_are_503(
    servers: list[Server], redis_server: RedisServer
) -> None:
    first, _ = servers
    key = _key(first, "search")
    client = first.client(key)
    stored = client.responses.create(model="remote", input="Hi!")  # the key is now known to this replica
    redis_server.kill()
    try:
        created = client.responses.create(model="remote", input="Hi!")
        assert created.output_text == "Hello from the upstream"
        assert first.log_lines(f"response {created.id} not stored")
        with pytest.raises(openai.InternalServerError) as caught:
            client.responses.retrieve(stored.id)
        assert caught.value.status_code == 503 and caught.value.body["code"] == "store_unavailable"  # type: ignore[index]
    finally:
        redis_server.start()
