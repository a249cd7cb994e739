"""Managed keys through the admin API and `tiergate keys`, against real gateways (and a real Redis shared by two)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway.keys_cli import Budget, parse_budget
from router.store.base import hash_api_key
from tests.conftest import ADMIN_KEY, ROOT, Server, serving
from tests.redis_server import RedisServer

STATIC_KEY = "static-client-key-1234"
PLAIN_KEY = re.compile(r"^tg-[A-Za-z0-9_-]{43}$")  # token_urlsafe(32): 43 characters
# The upstream is never called: these tests exercise the admin API and the stored records only.
POLICY = """
server:
  api_keys: ["{static}"]
backends:
  up: {{type: openai, base_url: "http://127.0.0.1:9/v1", model: m}}
models:
  alpha: {{backend: up}}
  beta: {{backend: up}}
teams:
  narrow: {{models: [alpha], budget_usd: 20, budget_period: month}}
{state}
"""


def policy(state: str = "") -> str:
    return POLICY.format(static=STATIC_KEY, state=state)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(policy(), tmp_path_factory.mktemp("admin")) as server:
        yield server


def call(server: Server, method: str, path: str, body: Any = None, key: str | None = ADMIN_KEY) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.request(method, server.url + path, json=body, headers=headers, timeout=10)


def create(server: Server, **fields: Any) -> dict[str, Any]:
    response = call(server, "POST", "/admin/keys", {"name": "ci", "team": "search", **fields})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def error_of(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}  # OpenAI's shape
    return body


# --- the guard ---


def test_without_an_admin_key_admin_routes_are_refused(tmp_path: Path) -> None:
    with serving(policy(), tmp_path, env={"TIERGATE_ADMIN_KEY": ""}) as server:
        for key in (None, ADMIN_KEY, STATIC_KEY):
            for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"), ("DELETE", "/admin/keys/key_1")):
                response = call(server, method, path, {"name": "x", "team": "t"}, key=key)
                assert response.status_code == 403, (method, path, key)
                error = error_of(response)
                assert error["code"] == "admin_disabled"
                assert "TIERGATE_ADMIN_KEY" in error["message"]


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "Missing admin key"),
        ("Bearer", "Missing admin key"),
        ("Basic dGVzdA==", "Missing admin key"),
        ("Bearer not-the-admin-key", "Incorrect admin key provided"),
        (f"Bearer {ADMIN_KEY}x", "Incorrect admin key provided"),
    ],
)
def test_no_or_a_wrong_bearer_gets_401(gateway: Server, header: str | None, message: str) -> None:
    headers = {"authorization": header} if header is not None else {}
    response = httpx.get(f"{gateway.url}/admin/keys", headers=headers, timeout=10)
    assert response.status_code == 401
    error = error_of(response)
    assert error["message"].startswith(message)
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")


def test_client_keys_get_403_on_admin_routes(gateway: Server) -> None:
    managed = create(gateway)["key"]
    for key in (STATIC_KEY, managed):
        for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"), ("GET", "/admin/spend?scope=team:x")):
            response = call(gateway, method, path, {"name": "evil", "team": "t"}, key=key)
            assert response.status_code == 403, (method, path)
            error = error_of(response)
            assert error["message"] == "Client keys cannot use admin routes; use the admin key"
            assert (error["type"], error["code"]) == ("permission_error", "admin_key_required")
    names = [record["name"] for record in call(gateway, "GET", "/admin/keys").json()["data"]]
    assert "evil" not in names  # nothing was created by the refused POSTs


def test_the_admin_key_gets_200(gateway: Server) -> None:
    response = call(gateway, "GET", "/admin/keys")
    assert response.status_code == 200
    assert response.json()["object"] == "list"


# --- create, list, get, revoke ---


def test_create_list_get_revoke_round_trip(gateway: Server) -> None:
    before = time.time()
    created = create(
        gateway,
        name="batch jobs",
        team="search",
        models=["alpha", "beta"],
        rpm=60,
        tpm=100_000,
        budget_usd=5,
        budget_period="month",
        max_concurrent=4,
        expires_in_days=2,
    )
    plain = created.pop("key")
    assert PLAIN_KEY.match(plain)
    assert created["id"].startswith("key_") and len(created["id"]) == 4 + 16
    assert created["prefix"] == plain[:7]
    assert before <= created["created_at"] <= time.time()
    assert created["expires_at"] == pytest.approx(created["created_at"] + 2 * 86_400)
    expected = {
        "object": "api_key",
        "name": "batch jobs",
        "team": "search",
        "models": ["alpha", "beta"],
        "rpm": 60,
        "tpm": 100_000,
        "budget_usd": 5.0,
        "budget_period": "month",
        "max_concurrent": 4,
        "revoked_at": None,
    }
    assert {name: created[name] for name in expected} == expected

    shown = call(gateway, "GET", f"/admin/keys/{created['id']}")
    assert shown.status_code == 200
    assert shown.json() == created  # the same record, less the plain key
    listing = call(gateway, "GET", "/admin/keys")
    assert created in listing.json()["data"]
    for response in (shown, listing):
        assert plain not in response.text and plain[7:] not in response.text
        assert hash_api_key(plain) not in response.text
        assert '"key"' not in response.text and "key_hash" not in response.text

    revoked = call(gateway, "DELETE", f"/admin/keys/{created['id']}")
    assert revoked.status_code == 200
    revoked_at = revoked.json()["revoked_at"]
    assert revoked_at is not None and revoked_at >= created["created_at"]
    assert revoked.json() == {**created, "revoked_at": revoked_at}
    again = call(gateway, "DELETE", f"/admin/keys/{created['id']}")
    assert again.json()["revoked_at"] == revoked_at  # revoking twice keeps the first time
    kept = [record for record in call(gateway, "GET", "/admin/keys").json()["data"] if record["id"] == created["id"]]
    assert kept == [revoked.json()]  # kept for audit, marked revoked
    assert call(gateway, "GET", "/admin/keys", key=plain).status_code == 403  # revoked, still a client key


def test_defaults_of_a_minimal_key(gateway: Server) -> None:
    created = create(gateway, name="minimal", team="ops")
    assert {name: created[name] for name in ("models", "rpm", "tpm", "budget_usd", "budget_period")} == {
        "models": [],
        "rpm": None,
        "tpm": None,
        "budget_usd": None,
        "budget_period": "day",
    }
    assert (created["max_concurrent"], created["expires_at"], created["revoked_at"]) == (None, None, None)


def test_each_key_is_new(gateway: Server) -> None:
    first, second = create(gateway), create(gateway)
    assert first["id"] != second["id"] and first["key"] != second["key"]


def test_an_explicit_expiry_is_kept(gateway: Server) -> None:
    at = time.time() + 3600
    assert create(gateway, expires_at=at)["expires_at"] == pytest.approx(at)


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_an_unknown_id_is_404(gateway: Server, method: str) -> None:
    response = call(gateway, method, "/admin/keys/key_0000000000000000")
    assert response.status_code == 404
    error = error_of(response)
    assert error["message"] == "No key with id 'key_0000000000000000'"
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "id", "key_not_found")


def test_the_plain_key_never_reaches_the_log(gateway: Server) -> None:
    created = create(gateway, name="audited")
    plain = created["key"]
    call(gateway, "GET", f"/admin/keys/{created['id']}")
    call(gateway, "GET", "/admin/keys", key=plain)  # refused: a client key on an admin route
    call(gateway, "DELETE", f"/admin/keys/{created['id']}")
    call(gateway, "DELETE", f"/admin/keys/{plain}")  # a key pasted where its id belongs: 404
    gateway.log_lines('"method":"POST"', f'"key_id":"{created["id"]}"', '"status":201')  # logging is async
    gateway.log_lines('"method":"DELETE"', '"route":"/admin/keys/{key_id}"', f'"key_id":"{created["id"]}"')
    gateway.log_lines('"method":"GET"', '"route":"/admin/keys"', '"status":403')
    gateway.log_lines('"method":"DELETE"', '"status":404')
    text = gateway.log.read_text()
    assert plain not in text and plain[3:] not in text and hash_api_key(plain) not in text
    assert "audited" not in text  # bodies are not logged


# --- invalid bodies ---


INVALID = "Invalid value for '{}': "
INVALID_BODIES = [  # (body, param, message); a body of fields only is added to a valid name and team
    ({"name": "a", "team": "t", "colour": "red"}, "colour", "Unrecognized request argument supplied: colour"),
    ({"name": "a"}, "team", "Missing required parameter: 'team'"),
    ({"name": "", "team": "t"}, "name", INVALID + "String should have at least 1 character"),
    ({"rpm": 0}, "rpm", INVALID + "Input should be greater than or equal to 1"),
    ({"rpm": "60"}, "rpm", INVALID + "Input should be a valid integer"),  # strict: no strings for numbers
    ({"tpm": 1.5}, "tpm", INVALID + "Input should be a valid integer"),
    ({"budget_usd": -1}, "budget_usd", INVALID + "Input should be greater than 0"),
    ({"budget_period": "week"}, "budget_period", INVALID + "Input should be 'day' or 'month'"),
    ({"models": "alpha"}, "models", INVALID + "Input should be a valid list"),
    ({"models": [1]}, "models[0]", INVALID + "Input should be a valid string"),
    ({"max_concurrent": True}, "max_concurrent", INVALID + "Input should be a valid integer"),
    ({"expires_in_days": 0}, "expires_in_days", INVALID + "Input should be greater than 0"),
    ({"expires_at": 1_000_000}, "expires_at", INVALID + "it is in the past"),
]


@pytest.mark.parametrize(("fields", "param", "message"), INVALID_BODIES)
def test_invalid_bodies_get_400_naming_the_param(
    gateway: Server, fields: dict[str, Any], param: str, message: str
) -> None:
    body = fields if "name" in fields else {"name": "a", "team": "t", **fields}
    response = call(gateway, "POST", "/admin/keys", body)
    assert response.status_code == 400
    error = error_of(response)
    assert (error["param"], error["message"], error["type"]) == (param, message.format(param), "invalid_request_error")


def test_two_expiries_are_one_too_many(gateway: Server) -> None:
    response = call(gateway, "POST", "/admin/keys", {"name": "a", "team": "t", "expires_at": 2e9, "expires_in_days": 1})
    assert response.status_code == 400
    assert error_of(response)["message"] == "give expires_in_days or expires_at, not both"


@pytest.mark.parametrize(("content", "message"), [(b"{x", "the body is not valid JSON"), (b"[]", "the body must be")])
def test_a_body_that_is_no_json_object_gets_400(gateway: Server, content: bytes, message: str) -> None:
    headers = {"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"}
    response = httpx.post(f"{gateway.url}/admin/keys", content=content, headers=headers, timeout=10)
    assert response.status_code == 400
    assert error_of(response)["message"].startswith(message)


def test_an_unknown_model_gets_400(gateway: Server) -> None:
    response = call(gateway, "POST", "/admin/keys", {"name": "a", "team": "t", "models": ["alpha", "gpt-5"]})
    assert response.status_code == 400
    error = error_of(response)
    assert error["message"] == "Invalid value for 'models[1]': unknown model 'gpt-5' (known: alpha, beta)"
    assert (error["param"], error["code"]) == ("models[1]", "model_not_found")


def test_a_model_outside_the_teams_models_gets_400(gateway: Server) -> None:
    response = call(gateway, "POST", "/admin/keys", {"name": "a", "team": "narrow", "models": ["beta"]})
    assert response.status_code == 400
    error = error_of(response)
    assert error["message"] == "Invalid value for 'models[0]': team 'narrow' may not use 'beta' (its models: alpha)"
    assert create(gateway, team="narrow", models=["alpha"])["models"] == ["alpha"]


# --- spend ---


def test_spend_of_a_fresh_key_and_of_a_team(gateway: Server) -> None:
    created = create(gateway, budget_usd=5, budget_period="month")
    response = call(gateway, "GET", f"/admin/spend?scope=key:{created['id']}")
    assert response.status_code == 200
    body = response.json()
    month = time.strftime("%Y-%m", time.gmtime())
    assert body == {
        "object": "spend",
        "scope": f"key:{created['id']}",
        "period": "month",
        "window": month,
        "limit_usd": 5.0,
        "spent_usd": 0.0,
        "held_usd": 0.0,
        "remaining_usd": 5.0,
    }
    team = call(gateway, "GET", "/admin/spend?scope=team:narrow").json()
    assert (team["period"], team["limit_usd"], team["window"]) == ("month", 20.0, month)
    daily = call(gateway, "GET", "/admin/spend?scope=team:narrow&period=day").json()
    assert daily["window"] == time.strftime("%Y-%m-%d", time.gmtime())


@pytest.mark.parametrize(
    ("query", "status", "param"),
    [
        ("scope=user:x", 400, "scope"),
        ("", 400, "scope"),
        ("scope=key:key_none", 404, "id"),
        ("scope=team:t&period=year", 400, "period"),
    ],
)
def test_spend_refuses_what_it_cannot_answer(gateway: Server, query: str, status: int, param: str) -> None:
    response = call(gateway, "GET", f"/admin/spend?{query}")
    assert response.status_code == status
    assert error_of(response)["param"] == param


# --- the CLI, end to end ---


def tiergate(server: Server | None, *args: str, admin_key: str | None = ADMIN_KEY) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("TIERGATE_")}
    if server is not None:
        env["TIERGATE_URL"] = server.url
    if admin_key is not None:
        env["TIERGATE_ADMIN_KEY"] = admin_key
    command = [sys.executable, "-m", "gateway.cli", "keys", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_parse_budget() -> None:
    assert parse_budget("5/day") == Budget(5.0, "day")
    assert parse_budget("5") == Budget(5.0, "day")
    assert parse_budget("$0.50/month") == Budget(0.5, "month")
    assert parse_budget(".25/Month") == Budget(0.25, "month")
    for bad in ("5/week", "-1/day", "0/day", "five", "5/", "/day", "1e3"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected AMOUNT"):
            parse_budget(bad)


def test_cli_create_list_revoke(gateway: Server) -> None:
    made = tiergate(
        gateway,
        "create", "--team", "search", "--name", "cli key", "--models", "alpha,beta", "--rpm", "60",
        "--tpm", "100000", "--budget-usd", "5/day", "--max-concurrent", "2", "--expires-in-days", "30",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    plain = next(word for word in made.stdout.split() if word.startswith("tg-"))
    assert PLAIN_KEY.match(plain)
    assert "not shown again" in made.stderr
    key_id = re.search(r"created (key_[0-9a-f]{16})", made.stdout)
    assert key_id is not None
    record = call(gateway, "GET", f"/admin/keys/{key_id[1]}").json()
    assert record["prefix"] == plain[:7]
    shown = {name: record[name] for name in ("name", "team", "models", "rpm", "tpm", "budget_usd", "budget_period")}
    assert shown == {
        "name": "cli key",
        "team": "search",
        "models": ["alpha", "beta"],
        "rpm": 60,
        "tpm": 100_000,
        "budget_usd": 5.0,
        "budget_period": "day",
    }
    assert record["max_concurrent"] == 2
    assert record["expires_at"] == pytest.approx(record["created_at"] + 30 * 86_400)

    monthly = tiergate(gateway, "create", "--team", "ops", "--budget-usd", "2.5/month")
    assert monthly.returncode == 0, monthly.stderr
    monthly_id = re.search(r"created (key_[0-9a-f]{16})", monthly.stdout)
    assert monthly_id is not None
    record = call(gateway, "GET", f"/admin/keys/{monthly_id[1]}").json()
    assert (record["name"], record["budget_usd"], record["budget_period"]) == ("ops", 2.5, "month")

    listed = tiergate(gateway, "list")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["id", "name", "team", "prefix", "models", "rpm", "tpm", "budget", "expires", "revoked"]
    row = next(line for line in rows if line.startswith(key_id[1]))
    assert f"{plain[:7]}..." in row and "alpha,beta" in row and "5/day" in row and row.endswith("-")
    assert plain not in listed.stdout

    revoked = tiergate(gateway, "revoke", key_id[1])
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.startswith(f"revoked {key_id[1]} at ")
    assert call(gateway, "GET", f"/admin/keys/{key_id[1]}").json()["revoked_at"] is not None
    row = next(line for line in tiergate(gateway, "list").stdout.splitlines() if line.startswith(key_id[1]))
    assert row.endswith("UTC")  # the revoked column now has a time


def test_cli_errors_are_messages_with_exit_code_1(gateway: Server) -> None:
    unknown = tiergate(gateway, "create", "--team", "t", "--models", "alpha,nope")
    assert (unknown.returncode, unknown.stdout) == (1, "")
    assert "error 400: Invalid value for 'models[1]': unknown model 'nope'" in unknown.stderr
    zero = tiergate(gateway, "create", "--team", "t", "--rpm", "0")
    assert zero.returncode == 1 and "Invalid value for 'rpm'" in zero.stderr
    missing = tiergate(gateway, "revoke", "key_0000000000000000")
    assert missing.returncode == 1 and "error 404: No key with id 'key_0000000000000000'" in missing.stderr
    wrong = tiergate(gateway, "list", admin_key="wrong")
    assert wrong.returncode == 1 and "error 401: Incorrect admin key provided" in wrong.stderr
    unset = tiergate(gateway, "list", admin_key=None)
    assert unset.returncode == 1 and "TIERGATE_ADMIN_KEY is not set" in unset.stderr
    week = tiergate(gateway, "create", "--team", "t", "--budget-usd", "5/week")
    assert week.returncode == 2 and "expected AMOUNT[/day|/month]" in week.stderr  # argparse's usage error


def test_cli_without_a_gateway(tmp_path: Path) -> None:
    nowhere = tiergate(None, "list", "--url", "http://127.0.0.1:9")
    assert nowhere.returncode == 1
    assert "cannot reach the gateway at http://127.0.0.1:9" in nowhere.stderr


# --- Redis: two gateway processes, one store ---


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as started:
        yield started


def test_a_key_made_through_one_gateway_is_seen_by_another_on_the_same_redis(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    state = f'state: {{redis_url: "{redis_server.url}", prefix: "admin-test:"}}'
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with serving(policy(state), tmp_path / "a") as first, serving(policy(state), tmp_path / "b") as second:
        created = tiergate(first, "create", "--team", "search", "--models", "alpha", "--budget-usd", "5/day")
        assert created.returncode == 0, created.stderr
        plain = next(word for word in created.stdout.split() if word.startswith("tg-"))
        listed = call(second, "GET", "/admin/keys").json()["data"]
        assert [record["prefix"] for record in listed] == [plain[:7]]
        key_id = listed[0]["id"]
        assert call(second, "GET", "/admin/keys", key=plain).status_code == 403  # the second knows it as a client key

        assert call(second, "DELETE", f"/admin/keys/{key_id}").status_code == 200
        assert call(first, "GET", f"/admin/keys/{key_id}").json()["revoked_at"] is not None
        assert_stored_hashed(redis_server, plain)

        redis_server.kill()
        for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"), ("GET", f"/admin/keys/{key_id}")):
            down = call(first, method, path, {"name": "a", "team": "t"})
            assert down.status_code == 503, down.text
            assert error_of(down)["code"] == "store_unavailable"
        assert call(first, "GET", "/admin/keys", key=plain).status_code == 401  # refused still, not served
        assert call(first, "GET", "/admin/keys", key=None).status_code == 401


def assert_stored_hashed(redis_server: RedisServer, plain: str) -> None:
    raw = redis.Redis(port=redis_server.port)
    try:
        names = [name.decode() for name in raw.scan_iter("*")]
        assert names and all(name.startswith("admin-test:") for name in names)
        stored = " ".join(names) + " ".join(str(raw.get(name)) for name in names if raw.type(name) == b"string")
        assert hash_api_key(plain) in stored  # the hash is what the store keeps ...
        assert plain not in stored and plain[3:] not in stored  # ... never the key
    finally:
        raw.close()
