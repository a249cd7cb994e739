"""Pure translation between OpenAI requests/answers and the llama.cpp token loop; no I/O here."""

from __future__ import annotations

import time
import uuid
from typing import Any

from backends.errors import BadRequest, Unsupported
from backends.llamacpp_decode import DecodeParams, TokenLogprob
from backends.protocol import ChatRequest, CompletionRequest, Message

UNSUPPORTED_CHAT_FIELDS = {
    "functions": "legacy function calling (send 'tools' instead)",
    "audio": "audio output",
    "web_search_options": "web search",
    "reasoning_effort": "reasoning effort (not a reasoning model)",
    "verbosity": "verbosity control",
}


def check_chat(request: ChatRequest, backend: str, *, logprobs: bool) -> None:
    """Refuse, naming the parameter, whatever this local model cannot honour."""
    for name, what in UNSUPPORTED_CHAT_FIELDS.items():
        if getattr(request, name) is not None:
            raise Unsupported(f"backend '{backend}' does not support {what}", param=name)
    if request.function_call not in (None, "none"):
        raise Unsupported(f"backend '{backend}' does not support function calling", param="function_call")
    if request.modalities is not None and request.modalities != ["text"]:
        raise Unsupported(f"backend '{backend}' only produces text", param="modalities")
    if request.n != 1:
        raise Unsupported(f"backend '{backend}' generates one choice per request; n must be 1", param="n")
    if request.logprobs and not logprobs:
        raise Unsupported(
            f"backend '{backend}' does not return logprobs (set 'logprobs: true' on it in the policy)",
            param="logprobs",
        )
    for index, message in enumerate(request.messages):
        if message.role == "function" or message.function_call is not None:
            raise Unsupported(
                f"backend '{backend}' does not read legacy function messages (use tool_calls and 'tool' messages)",
                param=f"messages[{index}]",
            )
        if isinstance(message.content, list):
            for part_index, part in enumerate(message.content):
                if part.get("type") != "text":
                    raise Unsupported(
                        f"backend '{backend}' reads text only, not '{part.get('type')}' content",
                        param=f"messages[{index}].content[{part_index}]",
                    )


def check_completion(request: CompletionRequest, backend: str, *, logprobs: bool) -> None:
    if request.suffix is not None:
        raise Unsupported(f"backend '{backend}' does not support insertion (suffix)", param="suffix")
    if request.best_of not in (None, 1):
        raise Unsupported(f"backend '{backend}' does not support best_of > 1", param="best_of")
    if request.n != 1:
        raise Unsupported(f"backend '{backend}' generates one choice per prompt; n must be 1", param="n")
    if request.logprobs is not None and not logprobs:
        raise Unsupported(
            f"backend '{backend}' does not return logprobs (set 'logprobs: true' on it in the policy)",
            param="logprobs",
        )
    if request.echo and request.logprobs is not None:
        raise Unsupported(f"backend '{backend}' cannot return logprobs of echoed prompts", param="echo")
    if request.stream and len(prompts_of(request)) > 1:
        raise Unsupported("streaming takes one prompt; send a list of prompts without stream", param="prompt")


def check_token_ids(request: ChatRequest | CompletionRequest, n_vocab: int) -> None:
    """Refuse token ids this model does not have: llama.cpp would read past its vocabulary or its logits."""
    valid = f"outside this model's vocabulary (0 to {n_vocab - 1})"
    for key in request.logit_bias or {}:
        token = int(key)  # ASCII digits: the request schema refuses any other key
        if not 0 <= token < n_vocab:
            raise BadRequest(f"logit_bias: token id {key} is {valid}", param="logit_bias")
    if isinstance(request, ChatRequest) or isinstance(request.prompt, str) or not request.prompt:
        return
    nested = isinstance(request.prompt[0], list)
    for index, prompt in enumerate(prompts_of(request)):
        if isinstance(prompt, list):
            for position, token in enumerate(prompt):
                if not 0 <= token < n_vocab:
                    place = f"prompt[{index}][{position}]" if nested else f"prompt[{position}]"
                    raise BadRequest(f"{place}: token id {token} is {valid}", param="prompt")


def prompts_of(request: CompletionRequest) -> list[str | list[int]]:
    prompt = request.prompt
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(item, int) for item in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def template_messages(messages: list[Message]) -> list[dict[str, str]]:
    """Messages as chat templates expect them; `developer` is OpenAI's newer name for `system`."""
    return [
        {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
        for message in messages
    ]


def completion_prompt(messages: list[Message]) -> str:
    """For base (non-instruct) models: the texts joined by blank lines, to be continued."""
    return "\n\n".join(message.text() for message in messages)


def decode_params(
    request: ChatRequest | CompletionRequest,
    defaults: dict[str, Any],
    *,
    max_tokens: int | None,
    grammar: Any = None,
) -> DecodeParams:
    top_logprobs = 0
    wants_logprobs = False
    if isinstance(request, ChatRequest):
        wants_logprobs = bool(request.logprobs)
        top_logprobs = request.top_logprobs or 0
    elif request.logprobs is not None:
        wants_logprobs = True
        top_logprobs = request.logprobs
    temperature = request.temperature if request.temperature is not None else defaults["temperature"]
    return DecodeParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=request.top_p if request.top_p is not None else defaults["top_p"],
        top_k=(request.tiergate or {}).get("top_k", defaults["top_k"]),
        min_p=defaults["min_p"],
        repeat_penalty=defaults["repeat_penalty"],
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        seed=request.seed,
        stop=tuple(request.stop_list()),
        logit_bias=tuple((int(k), float(v)) for k, v in (request.logit_bias or {}).items()),
        logprobs=wants_logprobs,
        top_logprobs=top_logprobs,
        grammar=grammar,
        confidence=request.wants_confidence(),
    )


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": entry.token,
                "logprob": entry.logprob,
                "bytes": list(entry.token_bytes),
                "top_logprobs": [
                    {"token": token, "logprob": logprob, "bytes": list(raw)} for token, logprob, raw in entry.top
                ],
            }
            for entry in entries
        ],
        "refusal": None,
    }


def text_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets = []
    position = offset
    for entry in entries:
        offsets.append(position)
        position += len(entry.token)
    return {
        "tokens": [entry.token for entry in entries],
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": [{token: logprob for token, logprob, _ in entry.top} for entry in entries],
        "text_offset": offsets,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class StreamFrame:
    """The fields every chunk of one stream shares."""

    def __init__(self, request: ChatRequest | CompletionRequest, fingerprint: str, chat: bool) -> None:
        self.chat = chat
        self.with_usage = request.include_usage()
        self.base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": request.model,
            "system_fingerprint": fingerprint,
        }

    def chunk(
        self, delta: Any, finish_reason: str | None, logprobs: Any, stop_sequence: str | None = None
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": logprobs, "finish_reason": finish_reason}
        if stop_sequence is not None:
            choice["stop_reason"] = stop_sequence  # vLLM's field: which stop sequence ended the answer
        choice["delta" if self.chat else "text"] = delta
        payload: dict[str, Any] = {**self.base, "choices": [choice]}
        if self.with_usage:
            payload["usage"] = None
        return payload

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self.base, "choices": [], "usage": usage}
