"""Fields that cost money or keep data upstream reach `openai` / `litellm` upstreams only where the policy allows."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from pydantic import ValidationError

from backends.base import Backend, GenerationRequest
from backends.errors import Unsupported
from backends.litellm_backend import LitellmSettings
from backends.openai_compat import OpenAICompatSettings
from backends.protocol import ChatRequest, CompletionRequest
from tests.conftest import Server, serving
from tests.upstream import UpstreamServer

# litellm's own warning filters are reset by pytest for every test; see tests/test_litellm_backend.py.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*`ReadOnly` qualifier:UserWarning"),
    pytest.mark.filterwarnings("ignore:Accessing the .* attribute on the instance is deprecated:DeprecationWarning"),
]
HELLO = [{"role": "user", "content": "hi there"}]


def chat(**fields: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": "public", "messages": HELLO, **fields})


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "public", "prompt": "Once upon", **fields})


# (param, request using it, the value the upstream must receive when allowed)
GATED: list[tuple[str, GenerationRequest, Any]] = [
    ("n", chat(n=2), 2),
    ("best_of", completion(best_of=3), 3),
    ("service_tier", chat(service_tier="priority"), "priority"),
    ("web_search_options", chat(web_search_options={"search_context_size": "high"}), {"search_context_size": "high"}),
    ("prediction", chat(prediction={"type": "content", "content": "x"}), {"type": "content", "content": "x"}),
    ("modalities", chat(modalities=["text", "audio"]), ["text", "audio"]),
    ("audio", chat(audio={"voice": "alloy", "format": "wav"}), {"voice": "alloy", "format": "wav"}),
    ("store", chat(store=True), True),
    ("metadata", chat(metadata={"team": "search"}), {"team": "search"}),
    ("user", chat(user="customer-42"), "customer-42"),
    ("safety_identifier", chat(safety_identifier="hash-42"), "hash-42"),
]


def openai_backend(upstream: UpstreamServer, **overrides: Any) -> Backend:
    settings = {"type": "openai", "base_url": upstream.base_url, "model": "up-model", **overrides}
    return OpenAICompatSettings.model_validate(settings).create("remote")


def litellm_backend(upstream: UpstreamServer, **overrides: Any) -> Backend:
    settings = {"type": "litellm", "model": "openai/up-model", "api_base": upstream.base_url, "api_key": "k"}
    return LitellmSettings.model_validate({**settings, **overrides}).create("api")


def generate(backend: Backend, request: GenerationRequest) -> None:
    async def work() -> None:
        await backend.start()
        try:
            await backend.generate(request)
        finally:
            await backend.aclose()

    asyncio.run(work())


@pytest.fixture(autouse=True)
def fresh(upstream: UpstreamServer) -> None:
    upstream.wait_idle()
    upstream.reset()


@pytest.mark.parametrize(("param", "request_", "value"), GATED, ids=[item[0] for item in GATED])
def test_openai_backend_refuses_each_gated_field_by_default(
    upstream: UpstreamServer, param: str, request_: GenerationRequest, value: Any
) -> None:
    with pytest.raises(Unsupported) as caught:
        openai_backend(upstream).check(request_)
    assert caught.value.status == 400
    assert caught.value.to_body()["error"] == {
        "message": f"backend 'remote' may not forward '{param}': it costs money or keeps data upstream, "
        "and the policy does not allow it there",
        "type": "invalid_request_error",
        "param": param,
        "code": "unsupported_parameter",
    }


@pytest.mark.parametrize(("param", "request_", "value"), GATED, ids=[item[0] for item in GATED])
def test_openai_backend_forwards_what_the_policy_allows(
    upstream: UpstreamServer, param: str, request_: GenerationRequest, value: Any
) -> None:
    backend = openai_backend(upstream, forward=[param])
    backend.check(request_)
    generate(backend, request_)
    assert upstream.last_request().body[param] == value


def test_a_gated_field_never_reaches_the_upstream_even_unchecked(upstream: UpstreamServer) -> None:
    """The router always calls check(); the body is built without disallowed fields all the same."""
    generate(openai_backend(upstream, forward=["metadata"]), chat(store=True, metadata={"k": "v"}, user="u"))
    body = upstream.last_request().body
    assert "store" not in body and "user" not in body
    assert body["metadata"] == {"k": "v"}


def test_values_that_ask_for_nothing_pass_and_are_not_sent(upstream: UpstreamServer) -> None:
    request = chat(n=1, store=False, modalities=["text"])
    backend = openai_backend(upstream)
    backend.check(request)
    backend.check(completion(best_of=1))
    generate(backend, request)
    body = upstream.last_request().body
    assert not {"n", "store", "modalities"} & set(body)


def test_the_forward_list_is_strict() -> None:
    with pytest.raises(ValidationError) as caught:
        OpenAICompatSettings.model_validate(
            {"type": "openai", "base_url": "http://h/v1", "model": "m", "forward": ["stor"]}
        )
    assert "forward.0" in str(caught.value)
    assert (
        OpenAICompatSettings.model_validate({"type": "openai", "base_url": "http://h/v1", "model": "m"}).forward == []
    )


@pytest.mark.parametrize(("param", "request_", "value"), [item for item in GATED if item[0] in ("n", "store")])
def test_litellm_backend_refuses_or_forwards_as_the_policy_says(
    upstream: UpstreamServer, param: str, request_: GenerationRequest, value: Any
) -> None:
    with pytest.raises(Unsupported) as caught:
        litellm_backend(upstream).check(request_)
    assert caught.value.param == param
    with pytest.raises(Unsupported):
        generate(litellm_backend(upstream), request_)  # litellm's path checks before calling
    assert upstream.attempts() == 0
    generate(litellm_backend(upstream, forward=[param]), request_)
    assert upstream.last_request().body[param] == value


# --- through the gateway: the 400 a client sees, and a cascade moving on to the tier that allows the field ---

POLICY = """
backends:
  plain:   {{type: openai, base_url: "{url}", model: plain}}
  storing: {{type: openai, base_url: "{url}", model: storing, forward: [store, metadata]}}
models:
  strict: {{backend: plain}}
  lenient: {{cascade: [plain, storing]}}
"""


@pytest.fixture(scope="module")
def gateway(upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(POLICY.format(url=upstream.base_url), tmp_path_factory.mktemp("forwarding")) as server:
        yield server


def test_the_client_gets_a_400_naming_the_field(gateway: Server, upstream: UpstreamServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client().chat.completions.create(model="strict", messages=HELLO, store=True)  # type: ignore[arg-type]
    assert caught.value.status_code == 400
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == "store" and error["code"] == "unsupported_parameter"
    assert "'store'" in error["message"]
    assert upstream.attempts() == 0


def test_a_tier_that_allows_the_field_takes_the_request(gateway: Server, upstream: UpstreamServer) -> None:
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="lenient",
        messages=HELLO,  # type: ignore[arg-type]
        store=True,
        metadata={"team": "search"},
    )
    assert raw.headers["x-tiergate-backend"] == "storing"
    assert upstream.attempts("plain") == 0
    body = upstream.last_request().body
    assert body["model"] == "storing" and body["store"] is True and body["metadata"] == {"team": "search"}
