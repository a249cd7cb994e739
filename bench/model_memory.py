"""Memory a llamacpp backend really takes (RSS and PSS increase) next to backends/memory_estimate.py's estimate.

Each (model, n_ctx) loads in a fresh subprocess, the way backends/llamacpp.py loads it, and is measured after
the load, after one short generation and after a prompt that fills the context (every KV cell, logits row and
attention scratch byte touched: the most the backend will ever hold). `python bench/model_memory.py [--json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.llamacpp import LlamaCppSettings  # noqa: E402
from backends.memory_estimate import MB, estimate  # noqa: E402

POLICY = ROOT / "policies" / "default.yaml"
LARGER_N_CTX = 8192
# llama.cpp's own account of what it allocated (verbose load log), to tell which part the overhead is.
BUFFER_LINES = re.compile(r"(KV|compute|output) buffer size\s*=\s*([\d.]+) MiB")


def policy_settings(backend: str, n_ctx: int | None) -> LlamaCppSettings:
    entry = yaml.safe_load(POLICY.read_text())["backends"][backend]
    settings = LlamaCppSettings.model_validate(entry)
    return settings if n_ctx is None else settings.model_copy(update={"n_ctx": n_ctx})


def memory_now() -> dict[str, int]:
    """VmRSS and its anonymous/file parts, and PSS (weights are mmap'd file pages, shared with the page cache)."""
    found: dict[str, int] = {}
    for source, keys in (("/proc/self/status", ("VmRSS", "RssAnon", "RssFile")), ("/proc/self/smaps_rollup", ("Pss",))):
        for line in Path(source).read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in keys:
                found[key] = int(line.split()[1]) * 1024
    return found


def child(backend: str, n_ctx: int) -> None:
    settings = policy_settings(backend, n_ctx)
    guess = estimate(settings, backend)
    # Imported before the baseline: next to a running model the library is already loaded.
    from llama_cpp import Llama, llama_model_n_layer

    before = memory_now()
    llama = Llama(
        model_path=str(guess.path),
        n_ctx=settings.n_ctx,
        n_threads=settings.n_threads or os.cpu_count(),
        n_batch=settings.n_batch,
        n_gpu_layers=settings.n_gpu_layers,
        logits_all=settings.logprobs,
        verbose=True,  # the buffer sizes it logs go to stderr, which the parent reads
    )
    loaded = memory_now()
    llama.create_completion("The capital of France is", max_tokens=16, temperature=0.0)
    short = memory_now()
    filler = llama.tokenize(b" The quick brown fox jumps over the lazy dog, and then it runs away." * 2000)
    prompt = filler[: llama.n_ctx() - 8]
    llama.reset()
    llama.eval(prompt)
    full = memory_now()
    result = {
        "backend": backend,
        "n_ctx": llama.n_ctx(),
        "n_layer": llama_model_n_layer(llama.model),
        "logprobs": settings.logprobs,
        "file_bytes": guess.file_bytes,
        "estimate": {
            "weights": guess.weights_bytes,
            "kv_cache": guess.kv_cache_bytes,
            "logits": guess.logits_bytes,
            "overhead": guess.overhead_bytes,
            "total": guess.total_bytes,
        },
        "increase": {
            stage: {key: after[key] - before[key] for key in before}
            for stage, after in (("load", loaded), ("short", short), ("full", full))
        },
        "prompt_tokens": len(prompt),
    }
    print("RESULT " + json.dumps(result), flush=True)


def measure(backend: str, n_ctx: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", backend, str(n_ctx)], capture_output=True, text=True, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{backend} n_ctx {n_ctx}: child failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    buffers: dict[str, float] = {}
    for kind, size in BUFFER_LINES.findall(done.stderr):
        buffers[kind] = buffers.get(kind, 0.0) + float(size)  # KV is logged once per cache (SWA models: two)
    result["llama_cpp_buffers_mib"] = buffers
    return result


def table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'model':<7} {'n_ctx':>6} {'logprobs':>8} {'file MB':>8} {'est KV':>7} {'est MB':>7} "
        f"{'RSS load':>9} {'RSS gen':>8} {'RSS full':>9} {'PSS full':>9} {'full/est':>8}  llama.cpp buffers MiB"
    )
    rows = [head]
    for item in results:
        est, inc = item["estimate"], item["increase"]
        full = inc["full"]["VmRSS"]
        buffers = " ".join(f"{kind} {size:.0f}" for kind, size in sorted(item["llama_cpp_buffers_mib"].items()))
        rows.append(
            f"{item['backend']:<7} {item['n_ctx']:>6} {item['logprobs']!s:>8} {item['file_bytes'] / MB:>8.0f} "
            f"{est['kv_cache'] / MB:>7.0f} {est['total'] / MB:>7.0f} {inc['load']['VmRSS'] / MB:>9.0f} "
            f"{inc['short']['VmRSS'] / MB:>8.0f} {full / MB:>9.0f} {inc['full']['Pss'] / MB:>9.0f} "
            f"{full / est['total']:>8.2f}  {buffers}"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", nargs=2, metavar=("BACKEND", "N_CTX"), help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON after the table")
    parser.add_argument("--backends", nargs="*", default=["smol", "gemma"], help="llamacpp backends of the policy")
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    results = []
    for backend in args.backends:
        for n_ctx in (policy_settings(backend, None).n_ctx, LARGER_N_CTX):
            results.append(measure(backend, n_ctx))
            print(table(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(results))
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
