"""`tiergate serve | check | doctor`."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import math
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

from gateway.keys_cli import add_keys_commands
from gateway.logs import PLAIN, WITH_PID, log_off_the_hot_path
from router.loader import DEFAULT_POLICY, PolicyError, load_policy
from router.table import RoutingTable, compile_policy, workers_need_state

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # as gateway/metrics.py reads it (not imported: no prometheus here)
APP_FACTORY = "gateway.app:app_from_env"  # what `uvicorn --factory` starts; each worker builds its own app
WORKER_FACTORY = "gateway.workers:worker_app"  # with --workers N > 1: local models are the engine's clients


def load_table(path: str) -> RoutingTable:
    return compile_policy(load_policy(path))


def banner(table: RoutingTable, host: str, port: int) -> str:
    url = f"http://{host}:{port}"
    chat = next(iter(table.generation_models()), "smol")
    key = "$TIERGATE_API_KEY" if table.server.api_keys else "none"
    auth = ' -H "Authorization: Bearer $TIERGATE_API_KEY"' if table.server.api_keys else ""
    return f"""tiergate listening on {url}  (policy: {table.source})
models: {", ".join(table.routes)}

  curl {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' \\
    -d '{{"model": "{chat}", "messages": [{{"role": "user", "content": "Say hello"}}]}}'

  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="{key}")
  print(client.chat.completions.create(model="{chat}",
        messages=[{{"role": "user", "content": "Say hello"}}]).choices[0].message.content)
"""


def serve(args: argparse.Namespace) -> int:
    table = load_table(args.policy)  # policy errors are reported here, before the server starts
    workers = args.workers if args.workers is not None else table.server.workers
    if workers > 1 and table.state is None:
        raise PolicyError([f"--workers {workers}: {workers_need_state(workers)}"])
    os.environ["TIERGATE_POLICY"] = args.policy  # the factory (in this or a worker process) reads it
    host = args.host or table.server.host
    port = args.port if args.port is not None else table.server.port
    listener = log_off_the_hot_path(os.environ.get("TIERGATE_LOG_LEVEL", "INFO"), WITH_PID if workers > 1 else PLAIN)
    print(banner(table, host, port), flush=True)
    try:
        with contextlib.ExitStack() as stack:
            if workers > 1:
                metrics_folder = tempfile.mkdtemp(prefix="tiergate-metrics-")  # fresh: no stale worker files
                stack.callback(shutil.rmtree, metrics_folder, ignore_errors=True)
                os.environ[MULTIPROC_ENV] = metrics_folder  # gateway/metrics.py: every worker's values, one scrape
                from gateway.engine_process import engine_backend_names
                from gateway.workers import ENGINE_SOCKET_ENV, EngineProcess

                local = engine_backend_names(table)
                if local:  # loaded once, in one process the workers share; stopped when serve stops
                    engine = EngineProcess(args.policy)
                    stack.callback(engine.stop)
                    engine.start()
                    os.environ[ENGINE_SOCKET_ENV] = str(engine.socket)
                print(f"{workers} worker processes; local models in one engine process: {', '.join(local) or 'none'}")
            run_server(host, port, table.server.max_header_bytes, workers, table.server.drain_s)
    finally:
        listener.stop()
    return 0


def _stopped(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def run_server(host: str, port: int, max_header_bytes: int, workers: int = 1, drain_s: float = 30.0) -> None:
    import uvicorn

    # uvicorn puts back the handler it found and raises the signal again once it has shut down gracefully: with
    # this one, a drained SIGTERM ends `serve` with exit code 0 instead of death by the signal (143).
    signal.signal(signal.SIGTERM, _stopped)
    uvicorn.run(
        WORKER_FACTORY if workers > 1 else APP_FACTORY,
        factory=True,
        workers=workers,
        host=host,
        port=port,
        access_log=False,
        log_level="warning",
        loop="uvloop",
        # httptools (faster than h11) has no header size limit of its own; the app's HeaderLimit refuses
        # oversized heads with 431 under any server. h11 would stop them while reading, if chosen.
        http="httptools",
        h11_max_incomplete_event_size=max_header_bytes,
        timeout_graceful_shutdown=math.ceil(drain_s),  # requests in flight after SIGTERM (gateway/drain.py)
        log_config=None,  # keep the root logger's queue handler
    )


def check(args: argparse.Namespace) -> int:
    table = load_table(args.policy)
    print(f"{table.source}: OK\n")
    print(table.render())
    return 0


def doctor(args: argparse.Namespace) -> int:
    """Say what works here: packages, llama.cpp build (GPU offload?), model files of the policy."""
    from backends.model_files import ModelFileError, check_gguf, resolve
    from backends.registry import BackendSettings, EmbedderSettings
    from backends.settings import ModelSourceSettings

    rows: list[tuple[str, str]] = [("python", sys.version.split()[0])]
    for package in ("llama-cpp-python", "sentence-transformers", "torch", "fastapi", "uvicorn", "openai"):
        try:
            rows.append((package, importlib.metadata.version(package)))
        except importlib.metadata.PackageNotFoundError:
            rows.append((package, "not installed"))
    try:
        import llama_cpp

        rows.append(("llama.cpp GPU offload", "yes" if llama_cpp.llama_supports_gpu_offload() else "no (CPU build)"))
    except ImportError as error:
        rows.append(("llama.cpp", f"cannot import: {error}"))
    healthy = True
    table = load_table(args.policy)
    every: dict[str, BackendSettings | EmbedderSettings] = {**table.backends, **table.embedders}
    for name, settings in every.items():
        if not isinstance(settings.model, ModelSourceSettings):
            continue  # a remote model: nothing on disk to check
        source = settings.model.source()
        try:
            path = resolve(source)
            if settings.type == "llamacpp":
                check_gguf(path)
            size = sum(file.stat().st_size for file in Path(path).rglob("*")) if path.is_dir() else path.stat().st_size
            rows.append((f"model {name}", f"{path} ({size / 1e6:.0f} MB)"))
        except ModelFileError as error:
            healthy = False
            rows.append((f"model {name}", f"MISSING: {error}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0 if healthy else 1


def worker_count(text: str) -> int:
    count = int(text)
    if not 1 <= count <= 64:
        raise argparse.ArgumentTypeError(f"{count}: between 1 and 64")
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tiergate", description="OpenAI-compatible gateway, cheapest model first.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="start the gateway")
    serve_cmd.add_argument("--policy", default=os.environ.get("TIERGATE_POLICY", DEFAULT_POLICY))
    serve_cmd.add_argument("--host", default=os.environ.get("TIERGATE_HOST"))
    port = os.environ.get("TIERGATE_PORT")
    serve_cmd.add_argument("--port", type=int, default=int(port) if port else None)
    workers = os.environ.get("TIERGATE_WORKERS")
    serve_cmd.add_argument(
        "--workers",
        type=worker_count,
        default=worker_count(workers) if workers else None,
        help="worker processes on the one port (default: the policy's server.workers); more than 1 needs Redis",
    )
    serve_cmd.set_defaults(run=serve)
    check_cmd = commands.add_parser("check", help="validate a policy and print its routing table")
    check_cmd.add_argument("policy")
    check_cmd.set_defaults(run=check)
    doctor_cmd = commands.add_parser("doctor", help="check packages, llama.cpp build and model files")
    doctor_cmd.add_argument("--policy", default=os.environ.get("TIERGATE_POLICY", DEFAULT_POLICY))
    doctor_cmd.set_defaults(run=doctor)
    add_keys_commands(commands)
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except PolicyError as error:
        print("policy error:\n  " + "\n  ".join(error.problems), file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
