"""A lean HTTP/1.1 load generator on asyncio + httptools: timed exchanges, a closed-loop throughput run, SSE streams.

Used in-process by bench/overhead.py for sequential timings, and as a separate process for load:
  .venv/bin/python bench/loadgen.py throughput --url URL --body JSON [--concurrency 32] [--duration 10]
  .venv/bin/python bench/loadgen.py streams --url URL --body JSON --count 200 [--stall-ms 200]
Each prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import httptools

T = TypeVar("T")


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile (share in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(share / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass
class Reply:
    """One exchange as the client saw it (times in seconds, from perf_counter)."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    sent_at: float = 0.0
    event_times: list[float] = field(default_factory=list)  # arrival of each read that completed >= 1 SSE event
    events: int = 0
    ended_at: float = 0.0

    @property
    def seconds(self) -> float:
        return self.ended_at - self.sent_at

    @property
    def first_event_s(self) -> float:
        return self.event_times[0] - self.sent_at if self.event_times else float("nan")

    def gaps_s(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.event_times, self.event_times[1:], strict=False)]


class Connection(asyncio.Protocol):
    """One keep-alive connection; `exchange()` sends a prepared request and resolves when the answer is complete."""

    def __init__(self, keep_body: bool = True) -> None:
        self.keep_body = keep_body
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.reply = Reply()
        self.done: asyncio.Future[Reply] | None = None
        self._header_name = b""
        self._tail = b""

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(exc or ConnectionResetError("the server closed the connection"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.reply.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.reply.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        text = self._tail + body
        completed = text.count(b"\n\n")
        self._tail = b"" if text.endswith(b"\n\n") else text[-1:] if text.endswith(b"\n") else b""
        if completed:
            self.reply.event_times.append(time.perf_counter())
            self.reply.events += completed
        if self.keep_body:
            self.reply.body += body

    def on_message_complete(self) -> None:
        self.reply.ended_at = time.perf_counter()
        if self.done is not None and not self.done.done():
            self.done.set_result(self.reply)

    def _fail(self, error: BaseException) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(error)

    async def exchange(self, request: bytes) -> Reply:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        self.reply = Reply()
        self._tail = b""
        self.done = asyncio.get_running_loop().create_future()
        self.reply.sent_at = time.perf_counter()
        self.transport.write(request)
        return await self.done

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def split_url(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"


def post_request(url: str, body: bytes, extra_headers: str = "") -> bytes:
    host, port, path = split_url(url)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra_headers}\r\n"
    )
    return head.encode("latin-1") + body


async def connect(url: str, keep_body: bool = True) -> Connection:
    host, port, _ = split_url(url)
    _, protocol = await asyncio.get_running_loop().create_connection(lambda: Connection(keep_body), host, port)
    return protocol


async def throughput(
    url: str, body: bytes, concurrency: int, duration_s: float, timeout_s: float, extra_headers: str = ""
) -> dict[str, Any]:
    """Closed loop: `concurrency` keep-alive connections, each sending its next request when the last one is done.

    `extra_headers`: raw header lines, each ending in CRLF (e.g. an Authorization header)."""
    request = post_request(url, body, extra_headers)
    latencies: list[float] = []
    counts = {"non2xx": 0, "errors": 0}
    began = time.perf_counter()
    stop_at = began + duration_s

    async def worker() -> None:
        connection: Connection | None = None
        while time.perf_counter() < stop_at:
            try:
                if connection is None:
                    connection = await connect(url, keep_body=False)
                reply = await asyncio.wait_for(connection.exchange(request), timeout_s)
            except (OSError, TimeoutError):
                counts["errors"] += 1
                if connection is not None:
                    connection.close()
                connection = None
                await asyncio.sleep(0.01)
                continue
            latencies.append(reply.seconds)
            if not 200 <= reply.status < 300:
                counts["non2xx"] += 1
        if connection is not None:
            connection.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    return {
        "requests": len(latencies),
        "duration_s": elapsed,
        "rps": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        **counts,
    }


async def one_stream(url: str, request: bytes, timeout_s: float) -> Reply:
    connection = await connect(url, keep_body=False)
    try:
        reply = await asyncio.wait_for(connection.exchange(request), timeout_s)
    finally:
        connection.close()
    if reply.status != 200:
        raise ConnectionError(f"HTTP {reply.status}")
    return reply


async def streams(
    url: str, body: bytes, count: int, spread_s: float, stall_s: float, timeout_s: float
) -> dict[str, Any]:
    """`count` SSE streams held at once (started evenly over `spread_s`); a stall is a gap > `stall_s` or a failure."""
    request = post_request(url, body, "Accept: text/event-stream\r\n")

    async def started(index: int) -> Reply:
        await asyncio.sleep(spread_s * index / count)
        return await one_stream(url, request, timeout_s)

    began = time.perf_counter()
    results = await asyncio.gather(*(started(index) for index in range(count)), return_exceptions=True)
    replies = [result for result in results if isinstance(result, Reply)]
    failures = [f"{type(result).__name__}: {result}" for result in results if isinstance(result, BaseException)]
    gaps = [gap for reply in replies for gap in reply.gaps_s()]
    worst = [max(reply.gaps_s(), default=0.0) for reply in replies]
    stalled = sum(1 for gap in worst if gap > stall_s)
    return {
        "streams": count,
        "completed": len(replies),
        "errors": len(failures),
        "first_errors": sorted(set(failures))[:3],
        "stalled": stalled,
        "ok": not failures and stalled == 0,
        "events_per_stream": statistics.median([reply.events for reply in replies]) if replies else 0,
        "ttft_p50_ms": percentile([reply.first_event_s for reply in replies], 50) * 1000,
        "ttft_p99_ms": percentile([reply.first_event_s for reply in replies], 99) * 1000,
        "gap_p50_ms": percentile(gaps, 50) * 1000,
        "gap_p99_ms": percentile(gaps, 99) * 1000,
        "gap_max_ms": max(gaps, default=float("nan")) * 1000,
        "seconds": time.perf_counter() - began,
    }


def run(work: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed (as the servers do), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(work)
    return uvloop.run(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["throughput", "streams"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="the JSON request body")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (throughput)")
    parser.add_argument("--count", type=int, default=50, help="concurrent streams (streams)")
    parser.add_argument("--spread", type=float, default=0.5, help="seconds over which streams start (streams)")
    parser.add_argument("--stall-ms", type=float, default=200.0)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds one exchange may take")
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable (throughput)")
    args = parser.parse_args()
    body = args.body.encode()
    if args.mode == "throughput":
        headers = "".join(f"{line}\r\n" for line in args.header)
        result = run(throughput(args.url, body, args.concurrency, args.duration, args.timeout, headers))
    else:
        result = run(streams(args.url, body, args.count, args.spread, args.stall_ms / 1000, args.timeout))
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
