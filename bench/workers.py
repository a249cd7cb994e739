"""What `tiergate serve --workers 2` buys over one worker: proxy throughput at c=32, and a local model shared.

Usage: .venv/bin/python bench/workers.py [--quick] [--skip-local] [--out bench/results/workers.json]
Both gateways use the same policy and the same Redis (`state:`), so only the number of workers differs. They
take turns in slices under the same load tool (wrk, or bench/loadgen.py) against the zero-delay upstream.
The local part runs SmolLM2 through 1 and 2 workers: with 2, the model is still loaded once (in the engine
process), so tokens/s and memory should stay about the same, not double.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.overhead import (  # noqa: E402
    CHAT,
    CONCURRENCY,
    LOCAL_PROMPT,
    PY,
    Service,
    Settings,
    cpu_model,
    ensure_wrk,
    free_port,
    measure_throughput,
    smol_policy,
    start,
    zero_policy,
)
from bench.procs import family  # noqa: E402

LOADED = re.compile(r"\[(\d+)\] tiergate loaded ")
LOCAL_CONCURRENCY = 4
LOCAL_TOKENS = 32


def start_redis(logs: Path) -> Service:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is missing: `make redis-server` installs it (more than 1 worker needs Redis)")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    log = logs / "redis.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, cwd=logs)
    time.sleep(0.3)
    return Service("redis", f"redis://127.0.0.1:{port}/0", process, log)


def start_workers(policy: dict[str, Any], workers: int, logs: Path, ready_within: float = 600) -> Service:
    """`tiergate serve --workers N`, returned once every worker has started its backends."""
    name = f"tiergate-{workers}w-{next(iter(policy['models']))}"
    path = logs / f"{name}-policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    port = free_port()
    argv = [PY, "-m", "gateway.cli", "serve", "--policy", str(path), "--port", str(port), "--workers", str(workers)]
    service = start(name, argv, "/readyz", port, logs, ready_within=ready_within)
    deadline = time.monotonic() + ready_within
    while workers > 1 and len(set(LOADED.findall(service.log.read_text()))) < workers:
        if time.monotonic() > deadline:
            service.stop()
            raise RuntimeError(f"{name}: not every worker started; see {service.log}")
        time.sleep(0.2)
    return service


def tree(pid: int) -> list[int]:
    return sorted(family(pid))


def memory_mb(pid: int) -> float:
    """Proportional set size of a process tree: shared pages split among their sharers, so nothing counts twice."""
    total = 0
    for member in tree(pid):
        try:
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def holding(pid: int, needle: str) -> int:
    found = 0
    for member in tree(pid):
        try:
            found += needle in Path(f"/proc/{member}/maps").read_text()
        except OSError:
            continue
    return found


def local_tokens_per_s(service: Service, seconds: float) -> dict[str, Any]:
    """Closed loop, LOCAL_CONCURRENCY clients, greedy answers of LOCAL_TOKENS tokens; completion tokens per second."""
    port = int(service.url.rsplit(":", 1)[1])
    body = json.dumps({"model": "smol", "messages": LOCAL_PROMPT, "temperature": 0, "max_tokens": LOCAL_TOKENS})

    def one() -> int:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        connection.request("POST", CHAT, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
        connection.close()
        return int(answer["usage"]["completion_tokens"]) if response.status == 200 else 0

    def client(stop_at: float) -> tuple[int, int]:
        tokens = requests = 0
        while time.monotonic() < stop_at:
            tokens += one()
            requests += 1
        return tokens, requests

    one()  # warm-up
    began = time.monotonic()
    with ThreadPoolExecutor(LOCAL_CONCURRENCY) as pool:
        done = list(pool.map(client, [began + seconds] * LOCAL_CONCURRENCY))
    wall = time.monotonic() - began
    tokens = sum(count for count, _ in done)
    return {"tokens_per_s": tokens / wall, "requests": sum(count for _, count in done), "wall_s": wall}


def measure_local(redis: Service, settings: Settings, logs: Path) -> dict[str, Any]:
    policy = {**smol_policy(), "state": {"redis_url": redis.url}}
    needle = Path(policy["backends"]["smol"]["model"]["file"]).name
    seconds = 10.0 if settings.slices == 1 else 30.0
    results: dict[str, Any] = {"model": needle, "concurrency": LOCAL_CONCURRENCY, "max_tokens": LOCAL_TOKENS}
    for workers in (1, 2):
        service = start_workers(policy, workers, logs)
        try:
            found = local_tokens_per_s(service, seconds)
            found["processes_holding_model"] = holding(service.process.pid, needle)
            found["memory_pss_mb"] = memory_mb(service.process.pid)
            results[f"{workers}w"] = found
            print(
                f"  {workers} worker(s): {found['tokens_per_s']:.1f} tokens/s, {found['requests']} answers, model "
                f"mapped by {found['processes_holding_model']} process(es), {found['memory_pss_mb']:.0f} MB PSS",
                flush=True,
            )
        finally:
            service.stop()
    return results


def table(results: dict[str, Any]) -> str:
    put = results["throughput"]
    one, two = put["1 worker"], put["2 workers"]
    lines = [
        f"| zero-delay upstream, c={CONCURRENCY} ({one['tool']}) | 1 worker | 2 workers | 2 vs 1 |",
        "|---|---|---|---|",
        f"| throughput (req/s) | {one['rps']:.0f} | {two['rps']:.0f} | {two['rps'] / one['rps']:.2f}x |",
        f"| latency p50 (ms) | {one['p50_ms']:.1f} | {two['p50_ms']:.1f} | {two['p50_ms'] / one['p50_ms']:.2f}x |",
        f"| latency p99 (ms) | {one['p99_ms']:.1f} | {two['p99_ms']:.1f} | {two['p99_ms'] / one['p99_ms']:.2f}x |",
        f"| gateway CPU per request (ms) | {one['cpu_ms_per_request']:.3f} | {two['cpu_ms_per_request']:.3f} | |",
        f"| errors / non-2xx | {one['errors']} / {one['non2xx']} | {two['errors']} / {two['non2xx']} | |",
    ]
    local = results.get("local")
    if local is not None:
        a, b = local["1w"], local["2w"]
        lines += [
            "",
            f"| SmolLM2 local, {local['concurrency']} clients x {local['max_tokens']} tokens | 1 worker | 2 workers | "
            "2 vs 1 |",
            "|---|---|---|---|",
            f"| tokens/s | {a['tokens_per_s']:.1f} | {b['tokens_per_s']:.1f} | "
            f"{b['tokens_per_s'] / a['tokens_per_s']:.2f}x |",
            f"| processes with the GGUF mapped | {a['processes_holding_model']} | {b['processes_holding_model']} | |",
            f"| memory of all processes (PSS, MB) | {a['memory_pss_mb']:.0f} | {b['memory_pss_mb']:.0f} | "
            f"{b['memory_pss_mb'] - a['memory_pss_mb']:+.0f} MB |",
        ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test of the harness")
    parser.add_argument("--skip-local", action="store_true", help="leave the SmolLM2 part out")
    parser.add_argument("--out", type=Path, default=BENCH / "results/workers.json")
    args = parser.parse_args()
    settings = Settings.of(args.quick)
    logs = args.out.parent / "workers-logs"
    logs.mkdir(parents=True, exist_ok=True)
    wrk = ensure_wrk()
    load_before = os.getloadavg()
    results: dict[str, Any] = {"quick": args.quick, "cores": os.cpu_count(), "cpu": cpu_model()}
    with ExitStack() as stack:
        redis = start_redis(logs)
        stack.callback(redis.stop)
        port = free_port()
        upstream = start("upstream", [PY, str(BENCH / "zero_upstream.py"), "--port", str(port)], "/health", port, logs)
        stack.callback(upstream.stop)
        policy = {**zero_policy(upstream.url), "state": {"redis_url": redis.url}}
        services: dict[str, Service] = {}
        for label, workers in (("1 worker", 1), ("2 workers", 2)):
            services[label] = start_workers(policy, workers, logs, ready_within=120)
            stack.callback(services[label].stop)
        print(f"workers: throughput at c={CONCURRENCY}, {settings.seconds:g} s each, in turns:", flush=True)
        results["throughput"] = measure_throughput(services, wrk, settings)
        if not args.skip_local:
            print("workers: SmolLM2 through 1 and 2 workers (one engine process with 2)...", flush=True)
            results["local"] = measure_local(redis, settings, logs)
    results["loadavg_before"], results["loadavg_after"] = load_before, os.getloadavg()
    print()
    print(
        f"Machine: {results['cores']} cores, {results['cpu']}; load average {load_before[0]:.1f} before, "
        f"{results['loadavg_after'][0]:.1f} after. The load generator runs on the same cores."
    )
    print()
    print(table(results))
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
