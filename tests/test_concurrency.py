"""Queueing, disconnects and liveness while a model is busy: the model is always freed for the next request."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import ROOT, Server, start_server, stop_server

LONG = [{"role": "user", "content": "Write a very long story about a dragon, with many chapters."}]


def wait_until_idle(gateway: Server, backend: str, within: float = 10) -> dict[str, object]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        status = gateway.status(backend)
        if not status["busy"] and status["waiting"] == 0:
            return status
        time.sleep(0.05)
    raise AssertionError(f"{backend} still busy after {within} s: {gateway.status(backend)}")


def assert_decoding_stopped(gateway: Server, backend: str) -> int:
    """After a disconnect the token counter must stand still (the decode loop ended)."""
    before = wait_until_idle(gateway, backend)["sampled_tokens"]
    time.sleep(0.5)
    after = gateway.status(backend)["sampled_tokens"]
    assert after == before
    assert isinstance(before, int)
    return before


def test_disconnect_mid_stream_frees_the_model(gateway: Server, client: OpenAI) -> None:
    start = gateway.status("smol")["sampled_tokens"]
    assert isinstance(start, int)
    stream = client.chat.completions.create(model="smol", messages=LONG, max_tokens=1500, temperature=0.8, stream=True)
    received = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            received += 1
        if received == 5:
            break
    stream.close()  # hang up mid-generation
    stopped_at = assert_decoding_stopped(gateway, "smol")
    assert stopped_at - start < 200  # far fewer than the 1500 asked for
    answer = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert answer.choices[0].message.content


def test_disconnect_while_waiting_for_a_whole_answer_frees_the_model(gateway: Server) -> None:
    start = gateway.status("smol")["sampled_tokens"]
    assert isinstance(start, int)
    impatient = gateway.client(timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model="smol", messages=LONG, max_tokens=1500, temperature=0.8)
    stopped_at = assert_decoding_stopped(gateway, "smol")
    assert stopped_at - start < 400


def test_ten_concurrent_requests_are_all_answered(client: OpenAI) -> None:
    def ask(index: int) -> str:
        answer = client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": f"Say the number {index}."}], max_tokens=8
        )
        return answer.choices[0].message.content or ""

    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(ask, range(10)))
    assert len(answers) == 10 and all(answers)


def test_health_answers_while_the_model_is_busy(gateway: Server, client: OpenAI) -> None:
    done = threading.Event()

    def generate() -> None:
        try:
            client.chat.completions.create(model="smol", messages=LONG, max_tokens=150, temperature=0.8)
        finally:
            done.set()

    worker = threading.Thread(target=generate)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while not gateway.status("smol")["busy"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gateway.status("smol")["busy"]
        for _ in range(5):
            # a generous bound on a loopback call; a blocked event loop would take seconds
            assert httpx.get(f"{gateway.url}/healthz", timeout=0.5).json() == {"status": "ok"}
        assert not done.is_set()
    finally:
        worker.join()


@pytest.fixture(scope="module")
def strict_gateway(tmp_path_factory: pytest.TempPathFactory) -> Server:
    """A gateway with an API key and a one-request queue."""
    logs = tmp_path_factory.mktemp("strict")
    server = start_server(
        ROOT / "tests" / "policies" / "strict.yaml", logs / "strict.log", env={"TEST_KEY": "s3cret-key"}
    )
    yield server  # type: ignore[misc]
    stop_server(server)


def test_missing_or_wrong_key_is_401(strict_gateway: Server) -> None:
    with pytest.raises(openai.AuthenticationError):
        strict_gateway.client(api_key="wrong").models.list()
    missing = httpx.get(f"{strict_gateway.base_url}/models")
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert [model.id for model in strict_gateway.client(api_key="s3cret-key").models.list()] == ["smol"]
    log = Path(strict_gateway.log).read_text()
    assert "s3cret-key" not in log


def test_a_full_queue_sheds_load_with_503_and_retry_after(strict_gateway: Server) -> None:
    client = strict_gateway.client(api_key="s3cret-key")
    statuses: list[int] = []
    retry_after: list[str] = []

    def ask() -> None:
        try:
            client.chat.completions.create(model="smol", messages=LONG, max_tokens=60)
            statuses.append(200)
        except openai.APIStatusError as error:
            statuses.append(error.status_code)
            retry_after.append(error.response.headers.get("retry-after", ""))

    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(4):
            pool.submit(ask)
    # one decodes, one waits, the other two are refused at once
    assert sorted(statuses) == [200, 200, 503, 503]
    assert retry_after == ["1", "1"]
