"""Bad input gets a clear OpenAI-shaped 4xx naming the parameter; the SDK maps it to its exception classes."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import Server

HELLO = [{"role": "user", "content": "hello"}]


def post(gateway: Server, path: str, body: Any, **options: Any) -> httpx.Response:
    return httpx.post(f"{gateway.base_url}{path}", json=body, timeout=30, **options)


def assert_error_shape(response: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    return error


def test_unknown_model_is_not_found(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9", messages=HELLO)  # type: ignore[arg-type]
    assert "gpt-9" in str(caught.value)
    assert "smol" in str(caught.value)  # the known names are listed


def test_malformed_body_is_a_bad_request(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smol", messages=[{"role": "robot", "content": "hi"}])  # type: ignore[list-item]
    assert caught.value.body["param"] == "messages[0].role"  # type: ignore[index]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": HELLO}, "model"),
        ({"model": "smol"}, "messages"),
        ({"model": "smol", "messages": []}, "messages"),
        ({"model": "smol", "messages": "hello"}, "messages"),
        ({"model": "smol", "messages": HELLO, "temperature": "hot"}, "temperature"),
        ({"model": "smol", "messages": HELLO, "temperature": 2.5}, "temperature"),
        ({"model": "smol", "messages": HELLO, "top_p": -0.1}, "top_p"),
        ({"model": "smol", "messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"model": "smol", "messages": HELLO, "max_tokens": "10"}, "max_tokens"),
        ({"model": "smol", "messages": HELLO, "max_completion_tokens": -5}, "max_completion_tokens"),
        ({"model": "smol", "messages": HELLO, "n": 0}, "n"),
        ({"model": "smol", "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "smol", "messages": HELLO, "stop": 7}, "stop"),
        ({"model": "smol", "messages": HELLO, "seed": 1.5}, "seed"),
        ({"model": "smol", "messages": HELLO, "presence_penalty": 3}, "presence_penalty"),
        ({"model": "smol", "messages": HELLO, "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"model": "smol", "messages": HELLO, "logit_bias": {"5": 500}}, "logit_bias.5"),
        ({"model": "smol", "messages": HELLO, "top_logprobs": 2}, None),
        ({"model": "smol", "messages": HELLO, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"model": "smol", "messages": HELLO, "stream": "yes"}, "stream"),
        ({"model": "smol", "messages": HELLO, "stream_options": {"include_usage": True}}, None),
        ({"model": "smol", "messages": HELLO, "response_format": {"type": "xml"}}, "response_format.type"),
        ({"model": "smol", "messages": HELLO, "frobnicate": True}, "frobnicate"),
        ({"model": "smol", "messages": [{"role": "user"}]}, "messages[0]"),
        ({"model": "smol", "messages": [{"role": "user", "content": "x", "colour": "red"}]}, "messages[0].colour"),
        ({"model": "smol", "messages": HELLO, "max_tokens": 5, "max_completion_tokens": 6}, None),
    ],
)
def test_invalid_chat_parameters_are_refused_by_name(gateway: Server, body: dict[str, Any], param: str | None) -> None:
    error = assert_error_shape(post(gateway, "/chat/completions", body), 400, param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "smol", "messages": HELLO, "n": 2}, "n"),
        ({"model": "smol", "messages": HELLO, "functions": [{"name": "f"}]}, "functions"),  # legacy: send tools
        ({"model": "smol", "messages": HELLO, "tool_choice": "required"}, "tool_choice"),
        ({"model": "smol", "messages": HELLO, "modalities": ["text", "audio"]}, "modalities"),
        ({"model": "smol", "messages": HELLO, "reasoning_effort": "high"}, "reasoning_effort"),
        ({"model": "gemma", "messages": HELLO, "logprobs": True}, "logprobs"),
        (
            {"model": "smol", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0]",
        ),
        ({"model": "all-MiniLM-L6-v2", "messages": HELLO}, "model"),
    ],
)
def test_parameters_a_local_model_cannot_honour_are_refused(gateway: Server, body: dict[str, Any], param: str) -> None:
    assert_error_shape(post(gateway, "/chat/completions", body), 400, param)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/completions", {"model": "gemma"}, "prompt"),
        ("/completions", {"model": "gemma", "prompt": "x", "suffix": "y"}, "suffix"),
        ("/completions", {"model": "gemma", "prompt": "x", "best_of": 3}, "best_of"),
        ("/completions", {"model": "gemma", "prompt": "x", "logprobs": 9}, "logprobs"),
        ("/completions", {"model": "gemma", "prompt": ["a", "b"], "stream": True}, "prompt"),
        ("/embeddings", {"model": "all-MiniLM-L6-v2", "input": ""}, "input"),
        ("/embeddings", {"model": "all-MiniLM-L6-v2", "input": [1, 2, 3]}, "input"),
        ("/embeddings", {"model": "all-MiniLM-L6-v2", "input": "x", "dimensions": 64}, "dimensions"),
        ("/embeddings", {"model": "all-MiniLM-L6-v2", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ("/embeddings", {"model": "smol", "input": "x"}, "model"),
    ],
)
def test_completions_and_embeddings_validate_too(gateway: Server, path: str, body: dict[str, Any], param: str) -> None:
    assert_error_shape(post(gateway, path, body), 400, param)


def test_invalid_json_and_non_object_bodies(gateway: Server) -> None:
    for content in (b"{not json", b"[1, 2]", b""):
        response = httpx.post(
            f"{gateway.base_url}/chat/completions", content=content, headers={"content-type": "application/json"}
        )
        assert_error_shape(response, 400, None)


def test_context_overflow_names_the_limit(gateway: Server) -> None:
    long = [{"role": "user", "content": "word " * 5000}]
    error = assert_error_shape(post(gateway, "/chat/completions", {"model": "smol", "messages": long}), 400, "messages")
    assert error["code"] == "context_length_exceeded"
    assert "2048" in error["message"]


def test_two_megabyte_body_is_refused_before_parsing(client: OpenAI, gateway: Server) -> None:
    huge = [{"role": "user", "content": "x" * 2_000_000}]
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="smol", messages=huge)  # type: ignore[arg-type]
    assert caught.value.status_code == 413
    # without a Content-Length (chunked upload) the limit still holds
    response = httpx.post(
        f"{gateway.base_url}/chat/completions",
        content=iter([b"x" * 600_000] * 4),
        headers={"content-type": "application/json"},
    )
    assert_error_shape(response, 413, None)


def test_unknown_endpoint_is_an_openai_shaped_404(gateway: Server) -> None:
    assert_error_shape(httpx.get(f"{gateway.base_url}/assistants"), 404, None)
    assert_error_shape(httpx.get(f"{gateway.base_url}/models/nope"), 404, "model")
