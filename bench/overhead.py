"""Gateway overhead: tiergate vs LiteLLM's proxy vs a bare aiohttp relay, all over one zero-delay upstream.

Usage: .venv/bin/python bench/overhead.py [--quick] [--skip-litellm] [--skip-local] [--out bench/results/overhead.json]
Everything listens on 127.0.0.1; bench/README-overhead.md says what each number means.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import Connection, Reply, connect, percentile, post_request, run  # noqa: E402
from bench.procs import cpu_seconds  # noqa: E402

PY = sys.executable
LITELLM_VERSION = "1.106.12"  # newer [proxy] extras need packages this registry lacks
COMPROMISED_LITELLM = {"1.82.7", "1.82.8"}
LITELLM_VENV = BENCH / ".venv-litellm"
CHAT = "/v1/chat/completions"
PROMPT = [{"role": "user", "content": "Say hello"}]
BODY = {"model": "zero", "messages": PROMPT, "max_tokens": 16}
LOCAL_PROMPT = [{"role": "user", "content": "Tell me a story about a robot who learns to paint."}]  # runs to 128
LOCAL_TTFT_TOKENS = 8  # the first token is all TTFT needs; short streams leave time for more rounds
LOCAL_BUDGET_S = 240  # more rounds only while within this; 2 at least
STREAM_CHUNKS, STREAM_GAP_MS, STALL_MS = 64, 20, 200
STREAM_LEVELS = (50, 100, 200, 400)
CONCURRENCY = 32
SEQUENTIAL_BUDGET_S = 240  # per sequential phase
GATEWAYS = ("tiergate", "litellm", "relay")


@dataclass(frozen=True)
class Settings:
    rounds: int  # sequential non-streamed rounds (after warm-up)
    warmup: int
    ttft_rounds: int  # sequential 1-chunk streams
    gap_rounds: int  # sequential 64-chunk streams
    seconds: float  # throughput run per target, in all
    slices: int  # the throughput run of each target is cut into this many turns
    local_rounds: int

    @staticmethod
    def of(quick: bool) -> Settings:
        if quick:
            return Settings(rounds=150, warmup=30, ttft_rounds=40, gap_rounds=1, seconds=3, slices=1, local_rounds=2)
        return Settings(rounds=1000, warmup=100, ttft_rounds=200, gap_rounds=4, seconds=10, slices=2, local_rounds=5)


# --- the machine and how busy others kept it ---


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def busy_seconds() -> float:
    """CPU seconds all processes of this machine spent busy since boot (from /proc/stat)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU seconds of this process and its children (servers count once they have exited)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and all its descendants, as /proc shows them now."""
    return cpu_seconds(pid)


# --- services ---


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    name: str
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen[bytes]
    log: Path

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(
    name: str,
    argv: list[str],
    ready_path: str,
    port: int,
    logs: Path,
    env: dict[str, str] | None = None,
    ready_within: float = 120,
) -> Service:
    log = logs / f"{name}.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env or dict(os.environ))
    service = Service(name, f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + ready_within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}; see {log}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(service.url + ready_path, timeout=2) as answer:
                if answer.status == 200:
                    return service
        except OSError:
            pass
        time.sleep(0.25)
    service.stop()
    raise RuntimeError(f"{name} not ready within {ready_within:g} s; see {log}")


def zero_policy(upstream: str) -> dict[str, Any]:
    """tiergate in front of the zero upstream: one `openai` backend, one public model."""
    return {
        "version": 1,
        "backends": {
            "zero": {
                "type": "openai",
                "base_url": f"{upstream}/v1",
                "model": "zero",
                "capabilities": {"streaming": True},
                "max_connections": 1024,  # the 400-stream level needs that many upstream connections
            }
        },
        "models": {"zero": {"backend": "zero", "description": "the zero-delay upstream"}},
    }


def smol_policy() -> dict[str, Any]:
    """policies/default.yaml cut down to the SmolLM2 llama.cpp backend and its model."""
    default = yaml.safe_load((ROOT / "policies/default.yaml").read_text())
    return {
        "version": 1,
        "server": default.get("server", {}),
        "backends": {"smol": default["backends"]["smol"]},
        "models": {"smol": default["models"]["smol"]},
    }


def start_tiergate(policy: dict[str, Any], logs: Path, name: str = "tiergate", ready_within: float = 120) -> Service:
    path = logs / f"{name}-policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    port = free_port()
    argv = [PY, "-m", "gateway.cli", "serve", "--policy", str(path), "--port", str(port)]
    return start(name, argv, "/readyz", port, logs, ready_within=ready_within)


def ensure_litellm(logs: Path) -> Path:
    """LiteLLM's proxy in its own virtual environment (bench/.venv-litellm), installed once."""
    if LITELLM_VERSION in COMPROMISED_LITELLM:
        raise SystemExit(f"litellm {LITELLM_VERSION} is a compromised release; refusing to install it")
    python, cli = LITELLM_VENV / "bin/python", LITELLM_VENV / "bin/litellm"
    probe = [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"]
    if cli.exists() and subprocess.run(probe, capture_output=True, text=True).stdout.strip() == LITELLM_VERSION:
        return cli
    print(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV} (a few minutes)...", flush=True)
    with (logs / "litellm-install.log").open("wb") as log:
        if not python.exists():
            subprocess.run([PY, "-m", "venv", str(LITELLM_VENV)], check=True, stdout=log, stderr=log)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, f"litellm[proxy]=={LITELLM_VERSION}"], check=True, stdout=log, stderr=log, timeout=1800)
    return cli


def start_litellm(cli: Path, upstream: str, logs: Path) -> Service:
    config = {
        "model_list": [
            {
                "model_name": "zero",
                "litellm_params": {"model": "openai/zero", "api_base": f"{upstream}/v1", "api_key": "x"},
            }
        ],
        "litellm_settings": {"telemetry": False},
    }
    path = logs / "litellm-config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    env.update(
        LITELLM_LOCAL_MODEL_COST_MAP="True",  # no download of the cost map
        LITELLM_TELEMETRY="False",
        # tiergate runs without API keys here too; LiteLLM refuses that unless told
        LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY="true",
    )
    port = free_port()
    argv = [str(cli), "--config", str(path), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    return start("litellm", argv, "/health/liveliness", port, logs, env=env, ready_within=300)


def ensure_wrk() -> str | None:
    """wrk from Debian's package (installed when we are root and apt-get works); None: use bench/loadgen.py."""
    found = shutil.which("wrk")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    print("installing wrk (apt-get)...", flush=True)
    for command in (["apt-get", "install", "-y", "-q", "wrk"], ["apt-get", "update", "-q"]):
        subprocess.run(command, capture_output=True, timeout=600)
        if found := shutil.which("wrk"):
            return found
    subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], capture_output=True, timeout=600)
    return shutil.which("wrk")


# --- measurements ---


async def sequential(
    urls: dict[str, str], body: dict[str, Any], rounds: int, warmup: int, check: Callable[[Reply], str | None]
) -> dict[str, list[Reply | None]]:
    """Interleaved rounds, one request per target in turn on one keep-alive connection each; warm-up dropped.

    Rounds stop early once SEQUENTIAL_BUDGET_S has passed (a slow target must not hold the run for ever).
    """
    stop_at = time.monotonic() + SEQUENTIAL_BUDGET_S
    requests = {name: post_request(url + CHAT, json.dumps(body).encode()) for name, url in urls.items()}
    connections: dict[str, Connection] = {name: await connect(url) for name, url in urls.items()}
    replies: dict[str, list[Reply | None]] = {name: [] for name in urls}
    try:
        for index in range(warmup + rounds):
            if index > warmup + 10 and time.monotonic() > stop_at:
                break
            for name in urls:
                try:
                    reply: Reply | None = await asyncio.wait_for(connections[name].exchange(requests[name]), 60)
                except (OSError, TimeoutError):
                    connections[name].close()
                    connections[name] = await connect(urls[name])
                    reply = None
                if index >= warmup:
                    replies[name].append(reply if reply is not None and check(reply) is None else None)
    finally:
        for connection in connections.values():
            connection.close()
    return replies


def answered(reply: Reply) -> str | None:
    return None if reply.status == 200 and b'"choices"' in reply.body else f"HTTP {reply.status}"


def streamed(events: int) -> Callable[[Reply], str | None]:
    def check(reply: Reply) -> str | None:
        if reply.status != 200 or not reply.body.rstrip().endswith(b"[DONE]"):
            return f"HTTP {reply.status}, no [DONE]"
        return None if reply.events == events else f"{reply.events} events, expected {events}"

    return check


def added(replies: dict[str, list[Reply | None]], value: Callable[[Reply], float]) -> dict[str, dict[str, float]]:
    """Per target: p50/p99 of its own value and of (target - direct) paired round by round, in ms."""
    direct = replies["direct"]
    result: dict[str, dict[str, float]] = {}
    for name, own in replies.items():
        values = [value(reply) * 1000 for reply in own if reply is not None]
        paired = [
            value(mine) * 1000 - value(base) * 1000 for mine, base in zip(own, direct, strict=True) if mine and base
        ]
        result[name] = {
            "p50_ms": percentile(values, 50),
            "p99_ms": percentile(values, 99),
            "added_p50_ms": percentile(paired, 50),
            "added_p99_ms": percentile(paired, 99),
            "samples": len(values),
            "errors": sum(1 for reply in own if reply is None),
        }
    return result


def gap_stats(replies: dict[str, list[Reply | None]]) -> dict[str, dict[str, float]]:
    gaps: dict[str, dict[str, float]] = {}
    for name, own in replies.items():
        values = [gap * 1000 for reply in own if reply is not None for gap in reply.gaps_s()]
        gaps[name] = {"p50_ms": percentile(values, 50), "p99_ms": percentile(values, 99), "samples": len(values)}
    for entry in gaps.values():
        entry["added_p50_ms"] = entry["p50_ms"] - gaps["direct"]["p50_ms"]
        entry["added_p99_ms"] = entry["p99_ms"] - gaps["direct"]["p99_ms"]
    return gaps


def measure_sequential(urls: dict[str, str], settings: Settings) -> dict[str, Any]:
    """Latency, TTFT and chunk gaps, one request at a time, targets interleaved round by round.

    LiteLLM gets a pass of its own (with direct, a third of the rounds): it keeps working after it has answered
    (logging and cost callbacks), and on two cores that work would land on whichever target comes next.
    """
    passes = [{name: url for name, url in urls.items() if name != "litellm"}]
    if "litellm" in urls:
        passes.append({"direct": urls["direct"], "litellm": urls["litellm"]})
    found: dict[str, dict[str, Any]] = {"latency": {}, "ttft": {}, "gaps": {}}
    for index, group in enumerate(passes):
        share = 3 if index else 1
        replies = run(sequential(group, BODY, settings.rounds // share, settings.warmup // share, answered))
        latency = added(replies, lambda reply: reply.seconds)
        if "tiergate" in group:
            header = [float(reply.headers["x-tiergate-overhead-ms"]) for reply in replies["tiergate"] if reply]
            latency["tiergate"]["overhead_header_p50_ms"] = percentile(header, 50)
            latency["tiergate"]["overhead_header_p99_ms"] = percentile(header, 99)
        one_chunk = {**BODY, "stream": True, "max_tokens": 1}  # the path to the first chunk, without the 20 ms waits
        first = run(sequential(group, one_chunk, settings.ttft_rounds // share, 5, streamed(3)))
        long_stream = {**BODY, "stream": True, "max_tokens": STREAM_CHUNKS}
        rounds = max(1, settings.gap_rounds // share)
        whole = run(sequential(group, long_stream, rounds, 0, streamed(STREAM_CHUNKS + 2)))
        parts = {"latency": latency, "ttft": added(first, lambda reply: reply.first_event_s), "gaps": gap_stats(whole)}
        for key, part in parts.items():
            for name, entry in part.items():
                found[key].setdefault(name, entry)  # direct: from the first pass
    return found


def settle(service: Service, limit_s: float = 30.0) -> None:
    """Wait until the service's processes are idle (< 5 % of a core over 0.5 s), so leftovers don't hit the next."""
    stop_at = time.monotonic() + limit_s
    while time.monotonic() < stop_at:
        before = service.cpu_seconds()
        time.sleep(0.5)
        if service.cpu_seconds() - before < 0.025:
            return


def wrk_run(wrk: str, url: str, seconds: float) -> dict[str, Any]:
    env = {**os.environ, "WRK_BODY": json.dumps(BODY)}
    argv = [wrk, "-t1", f"-c{CONCURRENCY}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(BENCH / "wrk_post.lua")]
    done = subprocess.run([*argv, url + CHAT], capture_output=True, text=True, env=env, timeout=seconds + 60)
    line = next((line for line in done.stdout.splitlines() if line.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{done.stdout}\n{done.stderr}")
    found: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
    found["rps"] = found["requests"] / found["duration_s"]
    found["errors"] = sum(found.pop(key) for key in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    found["non2xx"] = found.pop("non2xx")
    found.pop("status_errors")  # the same answers as non2xx, counted by wrk itself
    return found


def loadgen_run(url: str, seconds: float) -> dict[str, Any]:
    argv = [PY, str(BENCH / "loadgen.py"), "throughput", "--url", url + CHAT, "--body", json.dumps(BODY)]
    argv += ["--concurrency", str(CONCURRENCY), "--duration", str(seconds)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120, check=True)
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def measure_throughput(services: dict[str, Service], wrk: str | None, settings: Settings) -> dict[str, Any]:
    """Closed loop at concurrency 32; the targets take turns in slices, so load from elsewhere hits them alike."""

    def load(url: str, seconds: float) -> dict[str, Any]:
        return wrk_run(wrk, url, seconds) if wrk else loadgen_run(url, seconds)

    for service in services.values():
        load(service.url, 1.0)  # warm-up: connection pools, caches
        settle(service)
    slices: dict[str, list[dict[str, Any]]] = {name: [] for name in services}
    cpu = dict.fromkeys(services, 0.0)
    for _ in range(settings.slices):
        for name, service in services.items():
            before = service.cpu_seconds()
            slices[name].append(load(service.url, settings.seconds / settings.slices))
            settle(service)  # work it still does for those requests is theirs, and must not hit the next target
            cpu[name] += service.cpu_seconds() - before
    results: dict[str, Any] = {}
    for name, parts in slices.items():
        requests = sum(part["requests"] for part in parts)
        found = {
            "requests": requests,
            "rps": requests / sum(part["duration_s"] for part in parts),
            "p50_ms": statistics.mean(part["p50_ms"] for part in parts),  # slices' percentiles cannot be merged
            "p99_ms": max(part["p99_ms"] for part in parts),
            "errors": sum(part["errors"] for part in parts),
            "non2xx": sum(part["non2xx"] for part in parts),
            "cpu_ms_per_request": cpu[name] * 1000 / max(requests, 1),
            "tool": "wrk" if wrk else "bench/loadgen.py",
            "slices": parts,
        }
        results[name] = found
        print(
            f"  {name:9} {found['rps']:9.0f} req/s  p50 {found['p50_ms']:.1f} ms  p99 {found['p99_ms']:.1f} ms  "
            f"CPU {found['cpu_ms_per_request']:.3f} ms/request  errors {found['errors']}  non-2xx {found['non2xx']}",
            flush=True,
        )
    return results


def streams_run(url: str, count: int) -> dict[str, Any]:
    body = json.dumps({**BODY, "stream": True, "max_tokens": STREAM_CHUNKS})
    argv = [PY, str(BENCH / "loadgen.py"), "streams", "--url", url + CHAT, "--body", body, "--count", str(count)]
    argv += ["--spread", "0.5", "--stall-ms", str(STALL_MS), "--timeout", "60"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        return {"streams": count, "ok": False, "errors": count, "first_errors": [done.stderr[-500:]]}
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def measure_streams(services: dict[str, Service]) -> dict[str, Any]:
    """Most concurrent streams each target holds without a stall, levels tried upward until one fails."""
    results: dict[str, Any] = {}
    for name, service in services.items():
        levels: dict[str, Any] = {}
        held = 0
        for count in STREAM_LEVELS:
            before = service.cpu_seconds()
            found = streams_run(service.url, count)
            settle(service)
            chunks = found.get("completed", 0) * found.get("events_per_stream", 0)
            found["cpu_us_per_chunk"] = (service.cpu_seconds() - before) * 1e6 / chunks if chunks else float("nan")
            levels[str(count)] = found
            worst = found.get("gap_max_ms", float("nan"))
            verdict = "ok" if found["ok"] else "STALL"
            print(
                f"  {name:9} {count:4} streams: {verdict}  worst gap {worst:.0f} ms  errors {found['errors']}",
                flush=True,
            )
            if not found["ok"]:
                break
            held = count
        first = levels[str(STREAM_LEVELS[0])]
        results[name] = {"held": held, "cpu_us_per_chunk": first["cpu_us_per_chunk"], "levels": levels}
    return results


def measure_local(settings: Settings, logs: Path) -> dict[str, Any]:
    """SmolLM2 through tiergate vs llama-cpp-python in this process, same model, same greedy decoding."""
    import llama_cpp

    from backends.model_files import package_dir

    policy = smol_policy()
    backend = policy["backends"]["smol"]
    model_path = package_dir(backend["model"]["package"]) / backend["model"]["file"]
    sampling = backend.get("sampling", {})
    knobs = {key: sampling[key] for key in ("top_p", "top_k", "min_p", "repeat_penalty") if key in sampling}
    body = {"model": "smol", "messages": LOCAL_PROMPT, "temperature": 0, "max_tokens": 128}
    service = start_tiergate(policy, logs, name="tiergate-local", ready_within=600)
    try:
        # the same threads and logits buffer as tiergate's backend, so only the gateway differs
        llama: Any = llama_cpp.Llama(
            model_path=str(model_path),
            n_ctx=backend.get("n_ctx", 2048),
            n_threads=backend.get("n_threads") or os.cpu_count(),
            logits_all=bool(backend.get("logprobs", False)),
            verbose=False,
        )
        port = int(service.url.rsplit(":", 1)[1])

        def direct() -> tuple[str, int, float]:
            began = time.perf_counter()
            answer: Any = llama.create_chat_completion(messages=LOCAL_PROMPT, temperature=0, max_tokens=128, **knobs)
            spent = time.perf_counter() - began
            return answer["choices"][0]["message"]["content"], answer["usage"]["completion_tokens"], spent

        def direct_ttft() -> float:
            began = time.perf_counter()
            chunks: Any = llama.create_chat_completion(
                messages=LOCAL_PROMPT, temperature=0, max_tokens=LOCAL_TTFT_TOKENS, stream=True, **knobs
            )
            first = float("nan")
            for chunk in chunks:
                if first != first and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - began
            return first

        def gateway() -> tuple[str, int, float]:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            began = time.perf_counter()
            connection.request("POST", CHAT, json.dumps(body), {"Content-Type": "application/json"})
            answer = json.loads(connection.getresponse().read())
            spent = time.perf_counter() - began
            connection.close()
            return answer["choices"][0]["message"]["content"], answer["usage"]["completion_tokens"], spent

        def gateway_ttft() -> float:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            began = time.perf_counter()
            connection.request(
                "POST",
                CHAT,
                json.dumps({**body, "stream": True, "max_tokens": LOCAL_TTFT_TOKENS}),
                {"Content-Type": "application/json"},
            )
            response = connection.getresponse()
            first = float("nan")
            for line in response:
                if first != first and line.startswith(b"data: {"):
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    if choices[0].get("delta", {}).get("content"):
                        first = time.perf_counter() - began
            connection.close()
            return first

        direct(), gateway()  # warm-up
        runs: dict[str, list[tuple[str, int, float]]] = {"direct": [], "tiergate": []}
        ttfts: dict[str, list[float]] = {"direct": [], "tiergate": []}
        stop_at = time.monotonic() + LOCAL_BUDGET_S
        while len(ttfts["tiergate"]) < settings.local_rounds and (
            len(ttfts["tiergate"]) < 2 or time.monotonic() < stop_at
        ):
            runs["direct"].append(direct())
            runs["tiergate"].append(gateway())
            ttfts["direct"].append(direct_ttft())
            ttfts["tiergate"].append(gateway_ttft())
        rounds = len(ttfts["tiergate"])
        result: dict[str, Any] = {"model": model_path.name, "prompt": LOCAL_PROMPT, "max_tokens": 128, "rounds": rounds}
        for name, done in runs.items():
            result[name] = {
                "tokens_per_s": statistics.median(count / spent for _, count, spent in done),
                "completion_tokens": statistics.median(count for _, count, _ in done),
                "ttft_p50_ms": statistics.median(ttfts[name]) * 1000,
            }
        result["same_text"] = runs["direct"][0][0] == runs["tiergate"][0][0]
        # Round by round (each pair ran back to back), so that load from elsewhere cancels as far as it can.
        pairs = zip(runs["tiergate"], runs["direct"], strict=True)
        result["round_ratios"] = [(mine[1] / mine[2]) / (base[1] / base[2]) for mine, base in pairs]
        result["ratio"] = statistics.median(result["round_ratios"])
        result["added_ttft_ms"] = statistics.median(
            (mine - base) * 1000 for mine, base in zip(ttfts["tiergate"], ttfts["direct"], strict=True)
        )
        return result
    finally:
        service.stop()


# --- the report ---


def ms(value: float | None, digits: int = 2) -> str:
    return "—" if value is None or value != value else f"{value:.{digits}f}"


def versus(kind: str, mine: float | None, other: float | None, litellm: bool) -> str:
    """tiergate against another column: rates as shares, ms rows as differences (LiteLLM's as ratios)."""
    if mine is None or other is None or mine != mine or other != other or not other:
        return "—"
    if kind == "rate":
        return f"{mine / other:.1f}x" if litellm else f"{100 * mine / other:.0f}%"
    if kind == "ms" and not litellm:
        return f"{mine - other:+.2f} ms"
    return f"{other / mine:.1f}x lower" if litellm and mine else f"{mine / other:.2f}x"


def verdict(met: bool | None) -> str:
    return "—" if met is None else "met" if met else "NOT MET"


def targets(results: dict[str, Any]) -> list[tuple[str, bool | None, bool | None]]:
    """Each target of the issue: met by tiergate, and (absolute ones) by the bare relay; None: not measured."""
    seq, ttft = results["sequential"]["latency"], results["sequential"]["ttft"]
    tier, relay = seq["tiergate"], seq["relay"]
    put, streams, local = results["throughput"], results["streams"], results.get("local")
    litellm_rps = put.get("litellm", {}).get("rps")
    return [
        ("added latency p50 ≤ 1.5 ms (sequential)", tier["added_p50_ms"] <= 1.5, relay["added_p50_ms"] <= 1.5),
        ("added latency p99 ≤ 4 ms (sequential)", tier["added_p99_ms"] <= 4.0, relay["added_p99_ms"] <= 4.0),
        (
            "added latency p50 within 0.5 ms of the bare relay",
            tier["added_p50_ms"] - relay["added_p50_ms"] <= 0.5,
            None,
        ),
        (
            "throughput c=32 ≥ 25x LiteLLM's",
            None if not litellm_rps else put["tiergate"]["rps"] >= 25 * litellm_rps,
            None if not litellm_rps else put["relay"]["rps"] >= 25 * litellm_rps,
        ),
        ("throughput c=32 ≥ 60% of the bare relay's", put["tiergate"]["rps"] >= 0.6 * put["relay"]["rps"], None),
        (
            "0 errors and 0 non-2xx at c=32",
            put["tiergate"]["errors"] + put["tiergate"]["non2xx"] == 0,
            put["relay"]["errors"] + put["relay"]["non2xx"] == 0,
        ),
        (
            "streaming added TTFT p50 ≤ 2 ms",
            ttft["tiergate"]["added_p50_ms"] <= 2.0,
            ttft["relay"]["added_p50_ms"] <= 2.0,
        ),
        (
            "≥ 200 concurrent streams without a stall",
            streams["tiergate"]["held"] >= 200,
            streams["relay"]["held"] >= 200,
        ),
        ("local path ≥ 95% of direct llama-cpp-python tokens/s", None if not local else local["ratio"] >= 0.95, None),
        (
            "x-tiergate-overhead-ms p50 within 0.5 ms of the measured added p50",
            abs(tier["overhead_header_p50_ms"] - tier["added_p50_ms"]) <= 0.5,
            None,
        ),
    ]


def table(results: dict[str, Any]) -> str:
    seq, ttft, gaps = (results["sequential"][key] for key in ("latency", "ttft", "gaps"))
    put, streams, local = results["throughput"], results["streams"], results.get("local")
    names = ("direct", "tiergate", "litellm", "relay")

    def row(metric: str, values: dict[str, Any], kind: str = "ms", digits: int = 2) -> str:
        """kind: "ms" (lower is better), "rate" (higher is better), "cost" (lower, compared as ratios), "count"."""
        cells = [ms(values.get(name), digits) for name in names]
        tier = values.get("tiergate")
        others = ("litellm", "relay", "direct")
        compared = [versus(kind, tier, values.get(name), name == "litellm") for name in others]
        if kind == "count":
            compared = ["—"] * 3
        return f"| {metric} | {' | '.join(cells)} | {' | '.join(compared)} |"

    def pick(source: dict[str, Any], key: str, direct: bool = True) -> dict[str, Any]:
        return {name: entry[key] for name, entry in source.items() if key in entry and (direct or name != "direct")}

    lines = [
        "| metric | direct | tiergate | LiteLLM | bare relay | tiergate vs LiteLLM | tiergate vs relay "
        "| tiergate vs direct |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        row("sequential latency p50 (ms)", pick(seq, "p50_ms")),
        row("added latency p50 (ms)", pick(seq, "added_p50_ms", direct=False)),
        row("added latency p99 (ms)", pick(seq, "added_p99_ms", direct=False)),
        row("x-tiergate-overhead-ms p50 (header)", {"tiergate": seq["tiergate"]["overhead_header_p50_ms"]}),
        row(f"throughput c={CONCURRENCY} (req/s)", pick(put, "rps"), kind="rate", digits=0),
        row(f"latency c={CONCURRENCY} p50 (ms)", pick(put, "p50_ms"), digits=1),
        row(f"latency c={CONCURRENCY} p99 (ms)", pick(put, "p99_ms"), digits=1),
        row(f"CPU per request c={CONCURRENCY} (ms)", pick(put, "cpu_ms_per_request"), kind="cost", digits=3),
        row(f"errors + non-2xx c={CONCURRENCY}", {k: v["errors"] + v["non2xx"] for k, v in put.items()}, "count", 0),
        row("stream TTFT p50 (ms)", pick(ttft, "p50_ms")),
        row("stream added TTFT p50 (ms)", pick(ttft, "added_p50_ms", direct=False)),
        row("stream added TTFT p99 (ms)", pick(ttft, "added_p99_ms", direct=False)),
        row(f"inter-chunk gap p50, upstream {STREAM_GAP_MS} ms (ms)", pick(gaps, "p50_ms")),
        row("inter-chunk gap p99 (ms)", pick(gaps, "p99_ms")),
        row(f"CPU per chunk, {STREAM_LEVELS[0]} streams (µs)", pick(streams, "cpu_us_per_chunk"), "cost", 1),
        row("concurrent streams held, no stall", pick(streams, "held"), kind="rate", digits=0),
    ]
    if local:
        lines.append(
            f"| local SmolLM2 tokens/s (greedy, 128) | {ms(local['direct']['tokens_per_s'], 1)} | "
            f"{ms(local['tiergate']['tokens_per_s'], 1)} | — | — | — | — | {100 * local['ratio']:.1f}% |"
        )
        direct_ttft, tiergate_ttft = local["direct"]["ttft_p50_ms"], local["tiergate"]["ttft_p50_ms"]
        lines.append(
            f"| local TTFT p50 (ms) | {ms(direct_ttft, 1)} | {ms(tiergate_ttft, 1)} | — | — | — | — | "
            f"{local['added_ttft_ms']:+.1f} ms |"
        )
    lines.append("")
    lines.append("| target (this machine, same run) | tiergate | the bare relay, same bar (the floor) |")
    lines.append("|---|---|---|")
    for name, met, floor in targets(results):
        lines.append(f"| {name} | {verdict(met)} | {verdict(floor)} |")
    return "\n".join(lines)


@contextmanager
def services_for(args: argparse.Namespace, logs: Path) -> Iterator[dict[str, Service]]:
    with ExitStack() as stack:
        litellm_cli = None if args.skip_litellm else ensure_litellm(logs)
        port = free_port()
        upstream_argv = [PY, str(BENCH / "zero_upstream.py"), "--port", str(port)]
        upstream_argv += ["--chunks", str(STREAM_CHUNKS), "--gap-ms", str(STREAM_GAP_MS)]
        upstream = start("upstream", upstream_argv, "/health", port, logs)
        stack.callback(upstream.stop)
        found = {"direct": upstream}
        found["tiergate"] = start_tiergate(zero_policy(upstream.url), logs)
        stack.callback(found["tiergate"].stop)
        if litellm_cli is not None:
            found["litellm"] = start_litellm(litellm_cli, upstream.url, logs)
            stack.callback(found["litellm"].stop)
        port = free_port()
        relay_argv = [PY, str(BENCH / "bare_relay.py"), "--port", str(port), "--upstream", f"{upstream.url}/v1"]
        found["relay"] = start("relay", relay_argv, "/health", port, logs)
        stack.callback(found["relay"].stop)
        yield found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test of the harness")
    parser.add_argument("--skip-litellm", action="store_true", help="leave LiteLLM's proxy out")
    parser.add_argument("--skip-local", action="store_true", help="leave the SmolLM2 local path out")
    parser.add_argument("--out", type=Path, default=BENCH / "results/overhead.json")
    args = parser.parse_args()
    settings = Settings.of(args.quick)
    logs = args.out.parent / "overhead-logs"
    logs.mkdir(parents=True, exist_ok=True)
    wrk = ensure_wrk()
    began, busy_before, own_before = time.monotonic(), busy_seconds(), own_seconds()
    load_before = os.getloadavg()
    results: dict[str, Any] = {"settings": settings.__dict__, "quick": args.quick}
    with services_for(args, logs) as services:
        print(f"sequential: {settings.rounds} interleaved rounds over {', '.join(services)}...", flush=True)
        urls = {name: service.url for name, service in services.items()}
        results["sequential"] = measure_sequential(urls, settings)
        print(
            f"throughput at c={CONCURRENCY}, {settings.seconds:g} s each ({'wrk' if wrk else 'loadgen'}):", flush=True
        )
        results["throughput"] = measure_throughput(services, wrk, settings)
        print(f"concurrent streams ({STREAM_CHUNKS} chunks, {STREAM_GAP_MS} ms apart):", flush=True)
        results["streams"] = measure_streams(services)
    if not args.skip_local:
        print("local path: SmolLM2 through tiergate vs llama-cpp-python in-process...", flush=True)
        results["local"] = measure_local(settings, logs)
    wall = time.monotonic() - began
    others = max(0.0, (busy_seconds() - busy_before) - (own_seconds() - own_before)) / wall
    results["machine"] = {
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "other_processes_cores": others,
        "wall_s": wall,
        "load_tool": "wrk" if wrk else "bench/loadgen.py",
        "litellm": None if args.skip_litellm else LITELLM_VERSION,
    }
    machine = results["machine"]
    print()
    print(
        f"Machine: {machine['cores']} cores, {machine['cpu']}, Python {machine['python']}; other processes used "
        f"{others:.2f} of {machine['cores']} cores on average during this {wall:.0f} s run "
        f"(load average {load_before[0]:.1f} before, {machine['loadavg_after'][0]:.1f} after)."
    )
    print()
    print(table(results))
    results["targets"] = {name: {"tiergate": met, "relay": floor} for name, met, floor in targets(results)}
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
