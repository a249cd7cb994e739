"""Answer validators by name: built from the policy or implied by the request, and judged off the loop when slow.

What a request implies comes from `backends.constraint.constraint_from_request`, the one reader of the request's
constraint fields, so the router judges an answer exactly as the llama.cpp backend enforces it; both check with
`backends.schema_check`, which fetches no remote schema and matches every regex under a time bound. The validators
live in router/validator_kinds.py, their policy settings in router/validator_settings.py, and what the policy compile
checks in router/validator_compile.py; the names the rest of the code uses are importable from here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from backends.constraint import Constraint, Kind, constraint_from_request
from backends.protocol import ChatRequest, CompletionRequest
from router import validator_kinds as kinds
from router.tool_validator import tool_validator
from router.validator_kinds import PASS, Context, Validator, Verdict
from router.validator_settings import ValidatorSettings

# Imported from here by the rest of the code (the validators themselves are in router.validator_kinds).
__all__ = [
    "PASS",
    "Context",
    "Validator",
    "ValidatorSettings",
    "Verdict",
    "build",
    "check",
    "implied_by",
    "judge",
    "prompt_text",
    "validators_for",
]

# The registry of validator kinds: a policy's `type` names one.
_FACTORIES: dict[str, Callable[[Any], Validator]] = {
    "json_schema": lambda s: kinds.JsonSchemaValidator(s.json_schema),
    "json_object": lambda s: kinds.JsonObjectValidator(),
    "regex": lambda s: kinds.RegexValidator(s.pattern),
    "non_empty": lambda s: kinds.NonEmptyValidator(),
    "max_length": lambda s: kinds.MaxLengthValidator(s.chars),
    "refusal": lambda s: kinds.RefusalValidator(),
    "choices": lambda s: kinds.ChoicesValidator(tuple(s.values), s.case_sensitive),
    "grounded": lambda s: kinds.GroundedValidator(s.numbers),
}


def build(settings: ValidatorSettings) -> Validator:
    """A validator from its policy settings."""
    return _FACTORIES[settings.type](settings)


# What each kind of request constraint is checked with: the semantics OpenAI and vLLM clients expect, and the ones
# the llama.cpp backend enforces (a plain fullmatch, an exact choice, the schema's declared draft).
_FOR_CONSTRAINT: dict[Kind, Callable[[Constraint], Validator]] = {
    "json_schema": lambda constraint: kinds.JsonSchemaValidator(constraint.spec),
    "json_object": lambda constraint: kinds.JsonObjectValidator(),
    "regex": lambda constraint: kinds.RegexValidator(constraint.spec),
    "choice": lambda constraint: kinds.ChoicesValidator(tuple(constraint.spec), case_sensitive=True, trim=False),
}


def validators_for(constraint: Constraint | None) -> list[Validator]:
    """The validators a request's constraint implies (read it once with `constraint_from_request`)."""
    return [] if constraint is None else [_FOR_CONSTRAINT[constraint.kind](constraint)]


def implied_by(request: ChatRequest | CompletionRequest) -> list[Validator]:
    """What the request itself asks for; raises BadRequest for an unsafe or ambiguous constraint."""
    implied = validators_for(constraint_from_request(request))
    tools = tool_validator(request) if isinstance(request, ChatRequest) else None
    return implied if tools is None else [tools, *implied]


def check(validators: Sequence[Validator], answer: str, context: Context) -> Verdict:
    """The first failure, or PASS; runs on the calling thread."""
    for validator in validators:
        verdict = validator(answer, context)
        if not verdict.ok:
            return verdict
    return PASS


async def judge(validators: Sequence[Validator], answer: str, context: Context) -> Verdict:
    """`check`, in a worker thread when any validator may block, inline otherwise (a thread hop costs ~50 us).

    Cancelling the caller does not stop a check already running in its thread; each regex in it gives up after
    MATCH_TIMEOUT_S, so the thread is freed soon after.
    """
    if any(validator.may_block(answer, context) for validator in validators):
        return await asyncio.to_thread(check, validators, answer, context)
    return check(validators, answer, context)


def prompt_text(request: ChatRequest | CompletionRequest) -> str:
    if isinstance(request, ChatRequest):
        return "\n".join(message.text() for message in request.messages)
    prompt = request.prompt
    if isinstance(prompt, str):
        return prompt
    return "\n".join(item for item in prompt if isinstance(item, str))
