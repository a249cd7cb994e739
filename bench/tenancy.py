"""What keys, limits and budgets cost per request: an open gateway vs a managed key with RPM, TPM, a budget and a
concurrency cap, on the memory store and on a real redis-server, all over one zero-delay upstream, side by side.

Usage: .venv/bin/python bench/tenancy.py [--quick] [--out bench/results/tenancy.json]
Everything listens on 127.0.0.1. Sequential requests are interleaved over the targets (one keep-alive connection
each), so load from elsewhere hits them alike; then each target gets a closed loop at concurrency 32.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.loadgen import connect, percentile, post_request, run, throughput  # noqa: E402
from bench.overhead import BODY, CHAT, PY, Service, free_port, start, start_tiergate, zero_policy  # noqa: E402

ADMIN_KEY = "bench-admin-key"
LIMITS = {"rpm": 10_000_000, "tpm": 50_000_000, "budget_usd": 1_000_000.0, "max_concurrent": 1000}


def policy(upstream: str, redis_url: str | None, managed: bool) -> dict[str, Any]:
    found = zero_policy(upstream)
    # priced, so that budget holds and settles happen (a free backend needs no hold)
    found["backends"]["zero"]["price"] = {"input_per_million": 1.0, "output_per_million": 1.0}
    if managed:
        found["server"] = {"managed_keys": True}
    if redis_url is not None:
        found["state"] = {"redis_url": redis_url}
    return found


def create_key(service: Service) -> str:
    body = json.dumps({"name": "bench", "team": "bench", **LIMITS}).encode()
    request = urllib.request.Request(
        service.url + "/admin/keys",
        data=body,
        headers={"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        key: str = json.loads(answer.read())["key"]
    return key


def start_redis(folder: Path, port: int) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is missing: `make test` installs it (apt-get install redis-server)")
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(folder)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    time.sleep(0.3)  # the gateway's first store call comes much later, when the key is created
    return process


async def sequential(targets: dict[str, tuple[str, str]], rounds: int, warmup: int) -> dict[str, list[float]]:
    body = json.dumps(BODY).encode()
    requests = {name: post_request(url + CHAT, body, headers) for name, (url, headers) in targets.items()}
    connections = {name: await connect(url) for name, (url, _) in targets.items()}
    seconds: dict[str, list[float]] = {name: [] for name in targets}
    try:
        for index in range(warmup + rounds):
            for name in targets:
                reply = await connections[name].exchange(requests[name])
                if reply.status != 200:
                    raise RuntimeError(f"{name}: HTTP {reply.status}")
                if index >= warmup:
                    seconds[name].append(reply.seconds)
    finally:
        for connection in connections.values():
            connection.close()
    return seconds


def table(results: dict[str, Any]) -> str:
    rows = [
        "| target | p50 (ms) | p99 (ms) | added p50 vs open (ms) | req/s at c=32 | p99 at c=32 (ms) | non-2xx |",
        "|---|---|---|---|---|---|---|",
    ]
    base = results["open"]["p50_ms"]
    for name, found in results.items():
        added = found["p50_ms"] - base
        rows.append(
            f"| {name} | {found['p50_ms']:.2f} | {found['p99_ms']:.2f} | {added:+.2f} | {found['rps']:.0f} | "
            f"{found['load_p99_ms']:.1f} | {found['non2xx']} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test of the harness")
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args()
    rounds, warmup, seconds = (200, 30, 3.0) if args.quick else (1000, 100, 10.0)
    os.environ["TIERGATE_ADMIN_KEY"] = ADMIN_KEY
    os.environ.setdefault("TIERGATE_LOG_LEVEL", "INFO")  # the access line is not what is measured here
    with ExitStack() as stack:
        logs = Path(tempfile.mkdtemp(prefix="tenancy-"))
        print(f"logs in {logs}")
        port = free_port()
        upstream = start("upstream", [PY, str(BENCH / "zero_upstream.py"), "--port", str(port)], "/health", port, logs)
        stack.callback(upstream.stop)
        redis_port = free_port()
        redis = start_redis(logs, redis_port)
        stack.callback(redis.terminate)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        configs = {
            "open": policy(upstream.url, None, managed=False),
            "managed key + limits, memory": policy(upstream.url, None, managed=True),
            "managed key + limits, redis": policy(upstream.url, redis_url, managed=True),
        }
        targets: dict[str, tuple[str, str]] = {}
        for index, (name, config) in enumerate(configs.items()):
            service = start_tiergate(config, logs, name=f"tiergate-{index}")
            stack.callback(service.stop)
            headers = "" if name == "open" else f"Authorization: Bearer {create_key(service)}\r\n"
            targets[name] = (service.url, headers)
        latencies = run(sequential(targets, rounds, warmup))
        results: dict[str, Any] = {}
        body = json.dumps(BODY).encode()
        for name, (url, headers) in targets.items():
            loaded = run(throughput(url + CHAT, body, 32, seconds, 30.0, headers))
            results[name] = {
                "p50_ms": percentile(latencies[name], 50) * 1000,
                "p99_ms": percentile(latencies[name], 99) * 1000,
                "rps": loaded["rps"],
                "load_p99_ms": loaded["p99_ms"],
                "non2xx": loaded["non2xx"] + loaded["errors"],
            }
    print(f"\nKeys, limits and budgets: {rounds} sequential requests per target, then {seconds:g} s at c=32\n")
    print(table(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
