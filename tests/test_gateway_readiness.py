"""/readyz: a bare public status, details for the admin only, ready per route; and the app factory string."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.health import readiness
from router.loader import LoadedPolicy, load_policy
from router.table import compile_policy
from tests.conftest import ADMIN_KEY, ROOT, Server, free_port, serving
from tests.upstream import UpstreamServer

MISSING = "/nonexistent/tiergate-test-model.gguf"

POLICY = """
backends:
  good:   {{type: openai, base_url: "{url}", model: good}}
  broken: {{type: llamacpp, model: {{path: "{missing}"}}}}
models:
  good: {{backend: good}}
  resilient: {{backend: broken, fallbacks: [good]}}
"""


@pytest.fixture(scope="module")
def gateway(upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # serving() waits for a 200 from /readyz: starting at all is the test that a broken optional backend
    # does not keep the gateway unready.
    with serving(POLICY.format(url=upstream.base_url, missing=MISSING), tmp_path_factory.mktemp("ready")) as server:
        yield server


def test_one_broken_optional_backend_does_not_keep_the_gateway_unready(gateway: Server) -> None:
    response = httpx.get(f"{gateway.url}/readyz", timeout=5)
    assert response.status_code == 200
    assert gateway.client().chat.completions.create(model="resilient", messages=[{"role": "user", "content": "hi"}])


def test_readyz_without_the_admin_key_says_only_ready_or_not(gateway: Server, upstream: UpstreamServer) -> None:
    response = httpx.get(f"{gateway.url}/readyz", timeout=5)
    body = response.json()
    assert set(body) == {"status", "policy"} and body["status"] == "ready"
    assert re.fullmatch(r"[0-9]+-[0-9a-f]{8}", body["policy"])  # the version only: a counter and a digest prefix
    for secret in (upstream.url, "127.0.0.1", "good", "broken", MISSING, "Error"):
        assert secret not in response.text


def test_readyz_with_a_wrong_key_is_refused(gateway: Server) -> None:
    response = httpx.get(f"{gateway.url}/readyz", headers={"authorization": "Bearer guess"}, timeout=5)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_readyz_with_the_admin_key_has_the_details(gateway: Server, upstream: UpstreamServer) -> None:
    body = httpx.get(f"{gateway.url}/readyz", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=5).json()
    assert body["status"] == "ready"
    assert body["backends"]["good"]["state"] == "ready"
    assert body["backends"]["good"]["upstream"].startswith(upstream.url)
    assert body["backends"]["broken"]["state"].startswith("failed: ")
    assert MISSING in body["backends"]["broken"]["state"]
    assert body["models"] == {"good": "ready", "resilient": "ready"}
    assert "circuits" in body


def test_healthz_stays_public(gateway: Server) -> None:
    assert httpx.get(f"{gateway.url}/healthz", timeout=5).json() == {"status": "ok"}


# --- what "ready" means, per route ---


def test_a_model_with_nothing_loaded_is_unavailable_once_loading_ended(tmp_path: Path) -> None:
    table = compile_policy(_loaded(tmp_path, POLICY.format(url="http://127.0.0.1:9/v1", missing=MISSING)))
    assert readiness(table, loaded={"good"}, loading=set()).status == "ready"
    assert readiness(table, loaded={"good"}, loading={"broken"}).status == "loading"
    unready = readiness(table, loaded={"broken"}, loading=set())
    assert unready.status == "unavailable"
    assert unready.models == {"good": "unavailable", "resilient": "ready"}


def _loaded(folder: Path, text: str) -> LoadedPolicy:
    path = folder / "policy.yaml"
    path.write_text(text)
    return load_policy(str(path))


# --- the policy switch, with no admin key set ---


def test_details_are_public_only_when_the_policy_says_so(tmp_path: Path, upstream: UpstreamServer) -> None:
    base = POLICY.format(url=upstream.base_url, missing=MISSING)
    for switch, shown in ((False, False), (True, True)):
        table = compile_policy(_loaded(tmp_path, f"server: {{readyz_details: {str(switch).lower()}}}\n{base}"))
        with TestClient(create_app(table, admin_key=None)) as local:
            body = local.get("/readyz").json()
        assert ("backends" in body) is shown


# --- the app factory, as `uvicorn --factory` starts it ---


def test_the_factory_string_builds_a_working_app(upstream: UpstreamServer, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(url=upstream.base_url, missing=MISSING))
    port = free_port()
    log = tmp_path / "uvicorn.log"
    env = {**os.environ, "TIERGATE_POLICY": str(policy), "TIERGATE_ADMIN_KEY": ADMIN_KEY}
    command = [sys.executable, "-m", "uvicorn", "--factory", "gateway.app:app_from_env", "--port", str(port)]
    with log.open("wb") as handle:
        process = subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        with OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0) as client:
            answer = client.chat.completions.create(model="good", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == "Hello from the upstream"
    finally:
        process.terminate()
        process.wait(timeout=20)
