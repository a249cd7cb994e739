"""deploy/kubernetes: every kustomize target rendered, validated offline, and checked against how tiergate runs."""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from backends.llamacpp import LlamaCppSettings
from backends.memory_estimate import estimate
from backends.openai_compat import OpenAICompatSettings
from router.loader import ENV_REFERENCE, parse_policy
from router.policy_version import literal_secrets
from router.table import RoutingTable, compile_policy
from tests.conftest import ROOT, start_server, stop_server
from tests.upstream import UpstreamServer

KUBERNETES = ROOT / "deploy" / "kubernetes"
TARGETS = {"base": KUBERNETES / "base", "cpu": KUBERNETES / "overlays" / "cpu", "gpu": KUBERNETES / "overlays" / "gpu"}
# The schemas the manifests must satisfy: the oldest Kubernetes minor still in the providers' standard
# support, so that nothing newer (a field, an API version) slips in unnoticed.
KUBERNETES_VERSION = "1.32.0"
# Kinds from CRDs, which kubernetes-validate has no schema for: checked by the ServiceMonitor test below.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
GATEWAY_CONTAINER = "gateway"
# Resident memory of a loaded gateway less its llama.cpp models: Python, torch and MiniLM (measured with
# policies/default.yaml on 2 cores: VmRSS 1199 MB once ready, of which the two models' load was 517 MB).
GATEWAY_BASE_BYTES = 700 * 10**6
SECRET_EXAMPLE = KUBERNETES / "secrets.env.example"
# Shapes of real credentials: OpenAI and tiergate keys, Hugging Face and AWS tokens, long random strings.
REAL_LOOKING = re.compile(
    r"\b(sk-[A-Za-z0-9_-]{16,}|tg-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,}|AKIA[A-Z0-9]{16}|[A-Za-z0-9+/_-]{40,})"
)


@dataclass(frozen=True)
class Rendered:
    """One target's `kubectl kustomize` output."""

    target: str
    docs: tuple[dict[str, Any], ...]

    def find(self, kind: str, name: str | None = None) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        found = self.find(kind, name)
        assert len(found) == 1, f"{self.target}: expected one {kind} {name!r}, found {len(found)}"
        return found[0]

    def workloads(self) -> Iterator[dict[str, Any]]:
        for doc in self.docs:
            if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
                yield doc

    def pods_selected(self, selector: dict[str, str]) -> list[dict[str, Any]]:
        return [w for w in self.workloads() if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]

    def gateway(self) -> dict[str, Any]:
        return self.one("Deployment", "tiergate")

    def gateway_container(self) -> dict[str, Any]:
        return container(self.gateway(), GATEWAY_CONTAINER)

    def policy_text(self) -> str:
        path = policy_path(self.gateway_container())
        volume = mounted_volume(self.gateway(), self.gateway_container(), posixpath.dirname(path))
        config_map = self.one("ConfigMap", volume["configMap"]["name"])
        text = config_map["data"].get(posixpath.basename(path))
        assert isinstance(text, str), f"{self.target}: ConfigMap {config_map['metadata']['name']} has no {path}"
        return text


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']}: no container {name!r}"
    return found[0]


def policy_path(gateway: dict[str, Any]) -> str:
    args = gateway.get("args", [])
    assert "--policy" in args, f"the gateway's args name no --policy: {args}"
    return str(args[args.index("--policy") + 1])


def mounted_volume(workload: dict[str, Any], box: dict[str, Any], mount_path: str) -> dict[str, Any]:
    mounts = [m for m in box.get("volumeMounts", []) if m["mountPath"] == mount_path]
    assert len(mounts) == 1, f"nothing is mounted at {mount_path}"
    # A subPath mount is a copy Kubernetes never updates: the policy would not reload on a ConfigMap edit.
    assert "subPath" not in mounts[0] and "subPathExpr" not in mounts[0], f"{mount_path} is mounted with a subPath"
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    return volumes[mounts[0]["name"]]


def env_values(box: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the pod gets it; a Secret's value stands in as a placeholder."""
    found: dict[str, str] = {}
    for item in box.get("env", []):
        secret = item.get("valueFrom", {}).get("secretKeyRef")
        found[item["name"]] = f"from-secret-{secret['key']}" if secret else str(item.get("value", ""))
    return found


def named_port(box: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return int(next(p["containerPort"] for p in box["ports"] if p["name"] == port))


def quantity(text: str | int) -> float:
    """A Kubernetes quantity as a number: cores for CPU, bytes for memory."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match, f"not a quantity: {text}"
    return float(match.group(1)) * units.get(match.group(2), 1)


@pytest.fixture(scope="module", params=sorted(TARGETS))
def rendered(request: pytest.FixtureRequest) -> Rendered:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render deploy/kubernetes (its kustomize is built in); put it on PATH"
    target = str(request.param)
    done = subprocess.run(
        [kubectl, "kustomize", str(TARGETS[target])], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"kubectl kustomize {target}: {done.stderr}"
    return Rendered(target, tuple(d for d in yaml.safe_load_all(done.stdout) if d))


@pytest.fixture(scope="module")
def table(rendered: Rendered) -> Iterator[RoutingTable]:
    """The target's policy compiled as `tiergate check` would, in the gateway container's environment."""
    text = rendered.policy_text()
    pod_env = env_values(rendered.gateway_container())
    needed = {m.group(1) for m in ENV_REFERENCE.finditer(text) if m.group(2) is None}
    assert needed <= pod_env.keys(), (
        f"{rendered.target}: the policy needs {sorted(needed - pod_env.keys())} unset in the pod"
    )
    with pytest.MonkeyPatch.context() as patch:
        for name in {m.group(1) for m in ENV_REFERENCE.finditer(text)}:
            patch.delenv(name, raising=False)
        for name, value in pod_env.items():
            patch.setenv(name, value)
        yield compile_policy(parse_policy(text, f"{rendered.target}:policy.yaml"))


def test_every_manifest_validates_strictly(rendered: Rendered) -> None:
    for doc in rendered.docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # unknown fields fail too


def test_service_monitor_scrapes_the_gateway_service_with_the_metrics_token(
    rendered: Rendered, table: RoutingTable
) -> None:
    (monitor,) = rendered.find("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    services = [
        s
        for s in rendered.find("Service")
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in services] == ["tiergate"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout", "authorization"}
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in services[0]["spec"]["ports"]}
    # The token Prometheus sends is the one the policy's server.metrics_token reads.
    token = endpoint["authorization"]["credentials"]
    assert endpoint["authorization"]["type"] == "Bearer"
    assert "${TIERGATE_METRICS_TOKEN}" in rendered.policy_text() and table.server.metrics_token is not None
    (variable,) = [e for e in rendered.gateway_container()["env"] if e["name"] == "TIERGATE_METRICS_TOKEN"]
    assert variable["valueFrom"]["secretKeyRef"] == token


def test_probes_ask_readyz_and_healthz_on_the_port_the_gateway_listens_on(
    rendered: Rendered, table: RoutingTable
) -> None:
    box = rendered.gateway_container()
    listen = int(env_values(box).get("TIERGATE_PORT", table.server.port))
    assert env_values(box).get("TIERGATE_HOST", table.server.host) == "0.0.0.0"  # loopback is unreachable
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert box[probe]["httpGet"]["path"] == path, probe
        assert named_port(box, box[probe]["httpGet"]["port"]) == listen, probe
    service = rendered.one("Service", "tiergate")
    (port,) = service["spec"]["ports"]
    assert named_port(box, port["targetPort"]) == listen
    # A Service named tiergate would otherwise inject TIERGATE_PORT=tcp://... into every pod it shares a
    # namespace with; the explicit value wins, but other TIERGATE_* link variables would still appear.
    assert rendered.gateway()["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_grace_period_covers_the_drain_and_the_pre_stop_sleep(rendered: Rendered, table: RoutingTable) -> None:
    pod = rendered.gateway()["spec"]["template"]["spec"]
    command = rendered.gateway_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    pre_stop_s = float(command[1])
    drain_s = table.server.drain_s
    assert pod["terminationGracePeriodSeconds"] > drain_s + pre_stop_s


def test_the_policy_config_map_is_mounted_as_a_folder_at_the_path_serve_reads(rendered: Rendered) -> None:
    gateway, box = rendered.gateway(), rendered.gateway_container()
    path = policy_path(box)
    volume = mounted_volume(gateway, box, posixpath.dirname(path))
    assert "items" not in volume["configMap"]  # every key as a file, as the ConfigMap holds it
    # A fixed name: an edit changes this ConfigMap in place (a live reload), not a new one (a rollout).
    assert volume["configMap"]["name"] == "tiergate-policy"
    assert posixpath.basename(path) in rendered.one("ConfigMap", "tiergate-policy")["data"]


def test_the_policy_compiles_and_its_upstreams_are_services_of_this_target(
    rendered: Rendered, table: RoutingTable
) -> None:
    assert table.state is not None, "replicas need the shared store"
    redis = urlsplit(table.state.redis_url)
    assert redis.port in {p["port"] for p in rendered.one("Service", str(redis.hostname))["spec"]["ports"]}
    assert literal_secrets(yaml.safe_load(rendered.policy_text())) == []
    remote = {name: s for name, s in table.backends.items() if isinstance(s, OpenAICompatSettings)}
    assert bool(remote) == (rendered.target == "gpu")
    for name, settings in remote.items():
        url = urlsplit(settings.base_url)
        service = rendered.one("Service", str(url.hostname))
        (port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
        (server,) = rendered.pods_selected(service["spec"]["selector"])
        box = server["spec"]["template"]["spec"]["containers"][0]
        assert named_port(box, port["targetPort"]) == named_port(box, "http"), name
        args = box["args"]
        flag = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
        assert flag["--model"] == settings.model, "vLLM must serve the model the policy asks for (else 404)"
        assert int(flag["--max-model-len"]) == settings.capabilities.max_context
        gpus = box["resources"]["limits"]["nvidia.com/gpu"]
        assert int(flag["--tensor-parallel-size"]) == int(gpus), "one tensor-parallel rank per GPU"
        assert box["readinessProbe"]["httpGet"]["path"] == "/health"
        pod = server["spec"]["template"]["spec"]
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]) and pod["nodeSelector"]
        # The key the gateway sends is the key vLLM requires: both from the same Secret entry.
        keys = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in box["env"] if "valueFrom" in e}
        reference = ENV_REFERENCE.fullmatch(yaml.safe_load(rendered.policy_text())["backends"][name]["api_key"])
        assert reference, f"backends.{name}.api_key is not an ${{ENV}} reference"
        gateway_keys = {
            e["name"]: e["valueFrom"]["secretKeyRef"] for e in rendered.gateway_container()["env"] if "valueFrom" in e
        }
        assert keys["VLLM_API_KEY"] == gateway_keys[reference.group(1)]


def test_memory_fits_the_models_and_a_swap_of_the_largest(rendered: Rendered, table: RoutingTable) -> None:
    resources = rendered.gateway_container()["resources"]
    local = [estimate(s, name) for name, s in table.backends.items() if isinstance(s, LlamaCppSettings)]
    steady = GATEWAY_BASE_BYTES + sum(e.total_bytes for e in local)
    # A reload that swaps a model loads the new one beside the old (README "What a model swap needs").
    assert quantity(resources["requests"]["memory"]) >= steady
    assert quantity(resources["limits"]["memory"]) >= steady + max(e.total_bytes for e in local)
    cores = quantity(resources["requests"]["cpu"])
    assert all(
        s.n_threads is not None and s.n_threads <= cores
        for s in table.backends.values()
        if isinstance(s, LlamaCppSettings)
    ), "n_threads unset counts the node's cores, not the pod's"


def test_autoscaler_and_disruption_budget_fit_the_gateway(rendered: Rendered) -> None:
    gateway = rendered.gateway()
    (hpa,) = rendered.find("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert rendered.one(target["kind"], target["name"]) is gateway
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert "cpu" in rendered.gateway_container()["resources"]["requests"]  # utilization is of the request
    (pdb,) = rendered.find("PodDisruptionBudget")
    assert rendered.pods_selected(pdb["spec"]["selector"]["matchLabels"]) == [gateway]
    # A budget of all replicas would block every node drain.
    assert pdb["spec"]["minAvailable"] < min(hpa["spec"]["minReplicas"], gateway["spec"]["replicas"])
    assert gateway["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_every_service_selects_pods_that_have_its_target_port(rendered: Rendered) -> None:
    for service in rendered.find("Service"):
        (workload,) = rendered.pods_selected(service["spec"]["selector"])
        names = {p["name"] for c in workload["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names, f"{service['metadata']['name']}: {port['targetPort']}"


def test_gateway_runs_unprivileged_on_a_read_only_root(rendered: Rendered) -> None:
    pod = rendered.gateway()["spec"]["template"]["spec"]
    box = rendered.gateway_container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert box["securityContext"]["readOnlyRootFilesystem"] is True
    assert box["securityContext"]["allowPrivilegeEscalation"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {m["mountPath"] for m in box["volumeMounts"] if "emptyDir" in volumes[m["name"]]}
    assert "/tmp" in writable  # the image's caches (XDG_CACHE_HOME, NUMBA_CACHE_DIR) and temporary files


def test_redis_persists_and_is_reachable_only_from_the_gateway(rendered: Rendered) -> None:
    redis = rendered.one("StatefulSet", "tiergate-redis")
    args = container(redis, "redis")["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"  # evicting spend would lose it
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] in {
        m["name"] for m in container(redis, "redis")["volumeMounts"]
    }
    policy = rendered.one("NetworkPolicy", "tiergate-redis")
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    assert rendered.pods_selected(source["podSelector"]["matchLabels"]) == [rendered.gateway()]


def test_no_secret_is_committed(rendered: Rendered) -> None:
    assert rendered.find("Secret") == [], "Secrets are created by hand (README), never rendered from the repo"
    text = yaml.safe_dump_all(rendered.docs)
    assert REAL_LOOKING.findall(text) == []
    example = dict(
        line.split("=", 1) for line in SECRET_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")
    )
    assert all(value == "" for value in example.values()), "the example holds names only"
    # Every Secret entry a pod or the ServiceMonitor needs is in the example people create the Secret from.
    wanted = {
        ref["key"]
        for workload in rendered.workloads()
        for box in workload["spec"]["template"]["spec"]["containers"]
        for item in box.get("env", [])
        if (ref := item.get("valueFrom", {}).get("secretKeyRef")) and ref["name"] == "tiergate-secrets"
    }
    assert wanted <= example.keys()


def test_every_yaml_file_lints_clean() -> None:
    config = YamlLintConfig(file=str(ROOT / "deploy" / ".yamllint"))
    files = sorted([*KUBERNETES.rglob("*.yaml"), *KUBERNETES.rglob("*.yml")])
    assert len(files) >= 12
    problems = [
        f"{path.relative_to(ROOT)}:{problem.line}: {problem.desc} ({problem.rule})"
        for path in files
        for problem in linter.run(path.read_text(encoding="utf-8"), config, str(path))
    ]
    assert problems == []


def test_readme_commands_name_real_targets() -> None:
    readme = (KUBERNETES / "README.md").read_text(encoding="utf-8")
    applied = re.findall(r"kubectl (?:apply -k|kustomize) (deploy/kubernetes/[\w/.-]+)", readme)
    assert applied, "the README shows how to apply"
    for path in applied:
        assert (ROOT / path / "kustomization.yaml").is_file(), path


class ConfigMapVolume:
    """A folder laid out and updated as the kubelet's atomic writer does for a ConfigMap volume: each version
    in a `..<timestamp>` folder, `..data` a symlink to the current one, each key a symlink through `..data`;
    an update writes a new folder, renames a new `..data_tmp` symlink over `..data`, then removes the old."""

    def __init__(self, folder: Path, files: dict[str, str]) -> None:
        self.folder = folder
        self.generation = 0
        self.current = self._write(files)
        (folder / "..data").symlink_to(self.current.name)
        for name in files:
            (folder / name).symlink_to(f"..data/{name}")

    def _write(self, files: dict[str, str]) -> Path:
        self.generation += 1
        version = self.folder / f"..2026_12_02_06_00_00.{self.generation:09d}"
        version.mkdir(parents=True)
        for name, text in files.items():
            (version / name).write_text(text, encoding="utf-8")
        return version

    def update(self, files: dict[str, str]) -> None:
        previous, self.current = self.current, self._write(files)
        (self.folder / "..data_tmp").symlink_to(self.current.name)
        os.replace(self.folder / "..data_tmp", self.folder / "..data")
        shutil.rmtree(previous)


# A policy routing to a loopback upstream: starts in a second, no model to load.
UPSTREAM_POLICY = """\
server: {{port: 8080}}
backends:
  up: {{type: openai, base_url: "{url}", model: m}}
models:
{models}"""


def test_a_config_map_update_is_reloaded_without_a_restart(tmp_path: Path) -> None:
    """What the fixed-name ConfigMap relies on: the kubelet's update of the mounted folder reaches the gateway."""
    with UpstreamServer() as upstream:
        first = UPSTREAM_POLICY.format(url=upstream.base_url, models="  alpha: {backend: up}\n")
        volume = ConfigMapVolume(tmp_path / "tiergate", {"policy.yaml": first})
        server = start_server(volume.folder / "policy.yaml", tmp_path / "gateway.log", ready_within=60)
        try:
            client = server.client()
            assert [m.id for m in client.models.list()] == ["alpha"]
            models = "  alpha: {backend: up}\n  beta: {backend: up}\n"
            volume.update({"policy.yaml": UPSTREAM_POLICY.format(url=upstream.base_url, models=models)})
            deadline = time.monotonic() + 20
            while "beta" not in [m.id for m in client.models.list()] and time.monotonic() < deadline:
                time.sleep(0.1)
            answer = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}])
            assert answer.model == "beta" and answer.choices[0].message.content
            assert server.process.poll() is None  # reloaded in place: the process never stopped
            assert server.log_lines("policy reload (file) ok", "models +beta")
        finally:
            stop_server(server)
