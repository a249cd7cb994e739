"""Graceful drain, for real: SIGTERM to a gateway process with streams and whole answers in flight. /readyz turns
unready at once, every request in flight completes, new connections are refused once the listener closes, and the
process exits 0; what outlives `server.drain_s` is cut."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import Server, start_server
from tests.upstream import Behaviour, UpstreamServer

POLICY = """
server: {{drain_s: {drain}, drain_delay_s: {delay}}}
reliability: {{retries: {{max_retries: 0}}}}
backends:
  up: {{type: openai, base_url: "{url}", model: m}}
  slow: {{type: openai, base_url: "{url}", model: w}}
models:
  alpha: {{backend: up}}
  beta: {{backend: slow}}
"""
WORDS = "one two three four five six seven eight nine ten"  # ten chunks, 0.25 s apart: 2.5 s a stream
STREAM = Behaviour(text=WORDS, chunk_delay_s=0.25)  # model m: streams (alpha)
WHOLE = Behaviour(delay_s=2.5)  # model w: whole answers (beta), as long as a stream


def start(tmp_path: Path, upstream: UpstreamServer, drain: float, delay: float) -> Server:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(drain=drain, delay=delay, url=upstream.base_url))
    return start_server(policy, tmp_path / "gateway.log")


def in_flight(url: str, streams: int, wholes: int) -> tuple[list[threading.Thread], list[str]]:
    """Requests that run ~2.5 s each; returns once every one of them is under way at the gateway."""
    outcomes: list[str] = []
    started = threading.Semaphore(0)

    def stream() -> None:
        body = {"model": "alpha", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as response:
                started.release()
                lines = [line for line in response.iter_lines() if line.startswith("data:")]
            words = "".join(line for line in lines if '"content"' in line)
            outcomes.append("done" if lines[-1] == "data: [DONE]" and "ten" in words else f"cut: {lines[-2:]}")
        except httpx.HTTPError as error:
            outcomes.append(f"error: {error!r}")

    def whole() -> None:
        body = {"model": "beta", "messages": [{"role": "user", "content": "hi"}]}
        try:
            started.release()  # under way once the upstream sees it: the callers wait for that (in_flight_at)
            response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
            outcomes.append("done" if response.status_code == 200 else f"status {response.status_code}")
        except httpx.HTTPError as error:
            outcomes.append(f"error: {error!r}")

    threads = [threading.Thread(target=stream) for _ in range(streams)]
    threads += [threading.Thread(target=whole) for _ in range(wholes)]
    for thread in threads:
        thread.start()
    for _ in threads:
        assert started.acquire(timeout=20)
    return threads, outcomes


def refused(url: str) -> bool:
    """A new connection is refused: the listener is closed."""
    try:
        httpx.get(f"{url}/healthz", timeout=2)
    except httpx.ConnectError:
        return True
    return False


def in_flight_at(upstream: UpstreamServer, count: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while upstream.stats()["in_flight"] < count:
        assert time.monotonic() < deadline, f"only {upstream.stats()['in_flight']} of {count} requests under way"
        time.sleep(0.01)


def test_sigterm_unready_at_once_every_request_completes_then_refused_and_exit_0(
    tmp_path: Path, upstream: UpstreamServer
) -> None:
    upstream.reset()
    upstream.plan("m", default=Behaviour(text=f"{WORDS} {WORDS}", chunk_delay_s=0.25))  # 5 s: past the delay
    server = start(tmp_path, upstream, drain=20, delay=2.0)
    url = server.url
    threads, outcomes = in_flight(url, streams=6, wholes=0)
    in_flight_at(upstream, 6)
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    ready = httpx.get(f"{url}/readyz", timeout=5)  # a new connection: the listener is still open for drain_delay_s
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    while time.monotonic() - signalled < 2.8:
        time.sleep(0.05)
    assert refused(url), "the listener was still open after drain_delay_s"
    for thread in threads:
        thread.join(timeout=30)
    assert outcomes == ["done"] * 6
    assert server.process.wait(timeout=30) == 0
    log = server.log.read_text()
    assert "SIGTERM: draining, 6 requests in flight; the listener closes in 2.0 s" in log


def test_without_a_delay_the_listener_closes_at_once_and_whole_answers_finish_too(
    tmp_path: Path, upstream: UpstreamServer
) -> None:
    upstream.reset()
    upstream.plan("m", default=STREAM)
    upstream.plan("w", default=WHOLE)
    server = start(tmp_path, upstream, drain=20, delay=0)
    url = server.url
    threads, outcomes = in_flight(url, streams=3, wholes=3)
    in_flight_at(upstream, 6)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert refused(url)
    for thread in threads:
        thread.join(timeout=30)
    assert outcomes == ["done"] * 6
    assert server.process.wait(timeout=30) == 0


def test_what_outlives_drain_s_is_cut_and_the_process_still_exits_0(tmp_path: Path, upstream: UpstreamServer) -> None:
    upstream.reset()
    upstream.plan("m", default=Behaviour(text=WORDS * 4, chunk_delay_s=0.25))  # 10 s streams
    server = start(tmp_path, upstream, drain=1, delay=0)
    threads, outcomes = in_flight(server.url, streams=2, wholes=0)
    in_flight_at(upstream, 2)
    began = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0
    stopped = time.monotonic() - began
    for thread in threads:
        thread.join(timeout=30)
    assert all(outcome != "done" for outcome in outcomes), outcomes
    assert stopped < 8, f"stopped after {stopped:.1f} s, not about drain_s (1 s)"
