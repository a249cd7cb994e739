"""The HTTP edge of a real server: safe response headers, logged mid-stream failures, bounded request headers."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import unquote

import httpx
import openai
import pytest
from openai import OpenAI

from gateway.http import header_value
from tests.conftest import Server, serving
from tests.upstream import Behaviour, UpstreamServer

SECRET_PROMPT = "my-secret-prompt-words"
ASK = [{"role": "user", "content": SECRET_PROMPT}]
CITY = '{"city": "東京"}'

POLICY = """
reliability:
  retries: {{max_retries: 0}}
backends:
  city:  {{type: openai, base_url: "{url}", model: city}}
  plain: {{type: openai, base_url: "{url}", model: plain}}
models:
  city:
    backend: city
    validators: [{{type: json_schema, schema: {{type: object, properties: {{city: {{type: integer}}}}}}}}]
  plain: {{backend: plain}}
"""


@pytest.fixture(scope="module")
def gateway(upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(POLICY.format(url=upstream.base_url), tmp_path_factory.mktemp("edge")) as server:
        yield server


@pytest.fixture()
def client(gateway: Server, upstream: UpstreamServer) -> OpenAI:
    upstream.app.reset()
    upstream.plan("city", default=Behaviour(text=CITY))
    return gateway.client()


# --- item 6: any text becomes a safe header value ---


def test_header_value_keeps_plain_ascii_as_it_is() -> None:
    assert header_value("regex: the answer does not fully match 'x+'") == "regex: the answer does not fully match 'x+'"


def test_header_value_percent_encodes_what_latin1_headers_cannot_carry() -> None:
    text = "at city: '東京' is not of type 'integer' (100%)"
    shown = header_value(text)
    assert shown.isascii()
    assert unquote(shown) == text  # readable again with one standard call
    assert header_value(shown) == shown  # the edge may apply it again to a header made with it


def test_header_value_removes_control_characters_against_header_injection() -> None:
    shown = header_value("ok\r\nset-cookie: stolen=1\x00\x7f")
    assert shown == "ok  set-cookie: stolen=1  "
    assert "\r" not in shown and "\n" not in shown


def test_header_value_is_clipped_without_splitting_an_escape() -> None:
    shown = header_value("東" * 100, limit=20)
    assert len(shown) <= 20
    assert shown.endswith("...")
    assert unquote(shown.removesuffix("...")) == "東" * 1


def test_a_non_latin1_validation_reason_still_answers_200(client: OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="city", messages=ASK)  # type: ignore[arg-type]
    assert raw.http_response.status_code == 200
    assert raw.parse().choices[0].message.content == CITY
    assert unquote(raw.headers["x-tiergate-validation"]).endswith("'東京' is not of type 'integer'")


def test_a_non_latin1_validation_reason_still_streams(client: OpenAI) -> None:
    with client.chat.completions.with_streaming_response.create(
        model="city",
        messages=ASK,  # type: ignore[arg-type]
        stream=True,
    ) as response:
        assert response.http_response.status_code == 200
        chunks = list(response.parse())
        validation = response.headers["x-tiergate-validation"]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == CITY
    assert unquote(validation).endswith("'東京' is not of type 'integer'")


# --- item 15: a stream that breaks is logged ---


def test_a_stream_that_breaks_midway_is_logged_without_the_prompt(
    client: OpenAI, upstream: UpstreamServer, gateway: Server
) -> None:
    upstream.plan("plain", Behaviour(reset="mid_stream", after_chunks=2))
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model="plain", messages=ASK, stream=True):  # type: ignore[arg-type]
            pass
    line = gateway.log_lines("stream failed mid-way")[0]
    assert "/v1/chat/completions" in line and "backend plain" in line
    assert "UpstreamStreamBroken: " in line  # the error type and its message
    assert SECRET_PROMPT not in gateway.log.read_text()  # nowhere in the log


# --- item 17: oversized request headers are refused early ---


def test_a_one_megabyte_header_is_refused(gateway: Server) -> None:
    response = httpx.get(f"{gateway.base_url}/models", headers={"x-padding": "a" * 1_000_000}, timeout=10)
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "request_header_too_large"


def test_a_huge_authorization_header_is_refused_before_authentication(gateway: Server) -> None:
    response = httpx.get(f"{gateway.base_url}/models", headers={"authorization": "Bearer " + "k" * 20_000}, timeout=10)
    assert response.status_code == 431


def test_headers_under_the_limit_are_served(gateway: Server) -> None:
    response = httpx.get(f"{gateway.base_url}/models", headers={"x-padding": "a" * 8_000}, timeout=10)
    assert response.status_code == 200
