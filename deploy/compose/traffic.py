"""The client side of deploy/check.sh: SDK requests through both replicas and the balancer, a reload, a drain."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "The capital of France is"}]


@dataclass(frozen=True)
class Deployment:
    balancer: str
    replicas: list[str]
    admin_key: str

    @property
    def admin(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.admin_key}"}

    def new_key(self, replica: str) -> str:
        made = httpx.post(f"{replica}/admin/keys", json={"name": "deploy-check", "team": "ops"}, headers=self.admin)
        if made.status_code != 201:
            raise SystemExit(f"POST {replica}/admin/keys: {made.status_code} {made.text}")
        return str(made.json()["key"])

    def versions(self) -> list[str]:
        return [str(httpx.get(f"{replica}/readyz", timeout=5).json().get("policy")) for replica in self.replicas]


def client(url: str, key: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def requests(deployment: Deployment) -> None:
    """A key made on the first replica answers on every one (Redis); both tiers answer, whole and streamed."""
    key = deployment.new_key(deployment.replicas[0])
    for url in [*deployment.replicas, deployment.balancer]:
        for model, backend in (("smol", "smol"), ("large", "large"), ("auto", None)):
            raw = client(url, key).chat.completions.with_raw_response.create(
                model=model,
                messages=ASK,
                max_tokens=8,
            )
            answer = raw.parse()
            served_by = raw.headers.get("x-tiergate-backend")
            if backend is not None and served_by != backend:
                raise SystemExit(f"{url} model {model}: served by {served_by}, expected {backend}")
            text = answer.choices[0].message.content or ""
            print(f"  {url:24} {model:6} -> {served_by:6} {raw.headers.get('x-tiergate-policy')}  {text[:40]!r}")
        stream = client(url, key).chat.completions.create(
            model="large",
            messages=ASK,
            max_tokens=8,
            stream=True,
        )
        chunks = list(stream)
        if not any(chunk.choices and chunk.choices[0].finish_reason for chunk in chunks):
            raise SystemExit(f"{url}: a stream ended without a finish_reason")
        print(f"  {url:24} large  stream: {len(chunks)} chunks, finished")


def wait_for_version(deployment: Deployment, differs_from: str, within_s: float = 30) -> tuple[str, float]:
    start = time.monotonic()
    while True:
        versions = deployment.versions()
        if len(set(versions)) == 1 and versions[0] != differs_from:
            return versions[0], time.monotonic() - start
        if time.monotonic() - start > within_s:
            raise SystemExit(f"the replicas did not agree on a new version within {within_s} s: {versions}")
        time.sleep(0.1)


def reload(deployment: Deployment, policy_file: Path) -> None:
    """PUT a policy on one replica, then edit the mounted file: both replicas report each new version."""
    before = deployment.versions()
    print(f"  running: {before}")
    text = policy_file.read_text() + "  alias:\n    backend: smol\n    description: added by PUT /admin/policy\n"
    answer = httpx.put(f"{deployment.replicas[0]}/admin/policy", content=text, headers=deployment.admin, timeout=60)
    if answer.status_code != 200:
        raise SystemExit(f"PUT /admin/policy: {answer.status_code} {answer.text}")
    version, seconds = wait_for_version(deployment, before[0])
    print(f"  PUT on replica 1 -> {answer.json()['version']}; both replicas report {version} after {seconds:.2f} s")
    key = deployment.new_key(deployment.replicas[1])
    raw = client(deployment.replicas[1], key).chat.completions.with_raw_response.create(
        model="alias",
        messages=ASK,
        max_tokens=2,
    )
    print(f"  model 'alias' on replica 2: {raw.status_code}, policy {raw.headers.get('x-tiergate-policy')}")
    edited = policy_file.read_text() + "  edited:\n    backend: smol\n    description: added by editing the file\n"
    staged = policy_file.with_name(".policy.yaml.new")
    staged.write_text(edited)
    staged.replace(policy_file)  # as an editor (or a ConfigMap update) does: a rename over the watched file
    version_after_edit, seconds = wait_for_version(deployment, version)
    print(f"  file edited -> both replicas report {version_after_edit} after {seconds:.2f} s")


@dataclass
class Tally:
    served: int = 0
    streamed: int = 0
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def load_loop(url: str, key: str, until: threading.Event, deadline: float, tally: Tally, streaming: bool) -> None:
    sdk = client(url, key)
    while not until.is_set() and time.monotonic() < deadline:
        try:
            if streaming:
                chunks = list(sdk.chat.completions.create(model="smol", messages=ASK, max_tokens=16, stream=True))
                if not any(chunk.choices and chunk.choices[0].finish_reason for chunk in chunks):
                    raise RuntimeError("stream ended without a finish_reason")
                with tally.lock:
                    tally.streamed += 1
            else:
                sdk.chat.completions.create(model="smol", messages=ASK, max_tokens=16)
                with tally.lock:
                    tally.served += 1
        except Exception as error:  # every failure is counted and printed: the check wants none
            with tally.lock:
                tally.failures.append(f"{type(error).__name__}: {error}")


def drain(deployment: Deployment, stop_command: list[str], after_s: float, cap_s: float) -> None:
    """Bounded load through the balancer while one replica is stopped with SIGTERM: zero failed requests."""
    key = deployment.new_key(deployment.replicas[1])
    tally, done = Tally(), threading.Event()
    deadline = time.monotonic() + cap_s
    threads = [
        threading.Thread(target=load_loop, args=(deployment.balancer, key, done, deadline, tally, streaming))
        for streaming in (False, True, False, True)
    ]
    for thread in threads:
        thread.start()
    time.sleep(3)  # the load is running on both replicas
    started = time.monotonic()
    stopped = subprocess.run(stop_command, capture_output=True, text=True, check=False)
    stop_s = time.monotonic() - started
    time.sleep(after_s)  # and keeps running on the one that is left
    done.set()
    for thread in threads:
        thread.join()
    print(f"  {' '.join(stop_command)}: returned {stopped.returncode} after {stop_s:.1f} s")
    failed = len(tally.failures)
    print(f"  through the balancer: {tally.served} whole answers, {tally.streamed} streams, {failed} failed")
    for failure in tally.failures[:10]:
        print(f"    {failure}")
    if tally.failures or stopped.returncode != 0 or tally.served + tally.streamed == 0:
        raise SystemExit("drain: requests failed (or none ran)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("step", choices=["requests", "reload", "drain"])
    parser.add_argument("--balancer", required=True)
    parser.add_argument("--replica", action="append", required=True)
    parser.add_argument("--admin-key", required=True)
    parser.add_argument("--policy-file", type=Path)
    parser.add_argument("--stop", help="the command that stops one replica (drain), as one string")
    parser.add_argument("--after-s", type=float, default=8.0)
    parser.add_argument("--cap-s", type=float, default=120.0)
    args = parser.parse_args()
    deployment = Deployment(args.balancer, args.replica, args.admin_key)
    if args.step == "requests":
        requests(deployment)
    elif args.step == "reload":
        reload(deployment, args.policy_file)
    else:
        drain(deployment, shlex.split(args.stop), args.after_s, args.cap_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
