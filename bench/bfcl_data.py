"""BFCL's non-live categories for bench/bfcl.py: installed from PyPI, turned into OpenAI tools, scored by its checker.

The data and the AST checker are the `bfcl-eval` package's own (bench/requirements-bfcl.lock, installed with
--no-deps into bench/.bfcl). The checker imports BFCL's table of model handlers only to ask whether a model's function
names had their dots replaced; a one-entry stand-in answers "yes" (OpenAI's name rule ^[a-zA-Z0-9_-]{1,64}$ has no
dots), which is what BFCL itself answers for OpenAI models.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TARGET = HERE / ".bfcl"
CATEGORIES = ("simple_python", "multiple", "parallel", "irrelevance")
# BFCL's Python-flavoured parameter types -> JSON Schema (bfcl_eval/constants/type_mappings.py has the same idea)
TYPES = {"dict": "object", "float": "number", "tuple": "array", "integer": "integer", "string": "string",
         "boolean": "boolean", "array": "array", "number": "number", "object": "object"}


@dataclass(frozen=True)
class Case:
    id: str
    category: str
    messages: list[dict[str, Any]]
    functions: list[dict[str, Any]]  # BFCL's own descriptions, for the checker
    tools: list[dict[str, Any]]  # the same as OpenAI tools
    answer: list[dict[str, Any]]  # possible answers ([] for irrelevance)


def ensure_installed() -> Path:
    if not (TARGET / "bfcl_eval" / "data").is_dir():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
             "--require-hashes", "--target", str(TARGET), "-r", str(HERE / "requirements-bfcl.lock")],
            check=True,
        )
    return TARGET / "bfcl_eval" / "data"


def tool_name(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_-]", "_", name)[:64]


def json_schema(bfcl: dict[str, Any]) -> dict[str, Any]:
    """A BFCL parameter description as JSON Schema: its types mapped, `any` left unconstrained, nesting kept."""
    out: dict[str, Any] = {}
    for key, value in bfcl.items():
        if key == "type":
            if value != "any":
                out["type"] = TYPES.get(value, "string")
        elif key == "properties":
            out["properties"] = {name: json_schema(sub) for name, sub in value.items()}
        elif key == "items":
            out["items"] = json_schema(value)
        elif key in ("required", "enum", "description", "default"):
            out[key] = value
    return out


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load(per_category: int, skip: int = 0) -> list[Case]:
    """The cases `skip` to `skip + per_category` of each category, in BFCL's order."""
    data = ensure_installed()
    cases = []
    for category in CATEGORIES:
        answers = {}
        answer_file = data / "possible_answer" / f"BFCL_v4_{category}.json"
        if answer_file.exists():
            answers = {row["id"]: row["ground_truth"] for row in _read(answer_file)}
        for row in _read(data / f"BFCL_v4_{category}.json")[skip : skip + per_category]:
            tools = [{"type": "function", "function": {"name": tool_name(f["name"]), "description": f["description"],
                                                       "parameters": json_schema(f["parameters"])}}
                     for f in row["function"]]
            answer = answers.get(row["id"], [])
            cases.append(Case(row["id"], category, row["question"][0], row["function"], tools, answer))
    return cases


def _checker() -> Any:
    sys.path.insert(0, str(TARGET))
    stand_in = types.ModuleType("bfcl_eval.constants.model_config")

    class _Dotless:
        underscore_to_dot = True

    class _Any(dict[str, Any]):
        def __missing__(self, key: str) -> _Dotless:
            return _Dotless()

    stand_in.MODEL_CONFIG_MAPPING = _Any()  # type: ignore[attr-defined]
    sys.modules["bfcl_eval.constants.model_config"] = stand_in
    from bfcl_eval.constants.enums import Language  # type: ignore[import-not-found]
    from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker  # type: ignore[import-not-found]

    def check(case: Case, calls: list[dict[str, Any]]) -> dict[str, Any]:
        return dict(ast_checker(case.functions, calls, case.answer, Language.PYTHON, case.category, "tiergate"))

    return check


def score(case: Case, calls: list[dict[str, Any]], checker: Any) -> bool:
    """BFCL's verdict. Irrelevance passes when no call is made (bfcl_eval/eval_checker/eval_runner.py, the
    relevance/irrelevance helper); the others go through its AST checker."""
    if case.category == "irrelevance":
        return not calls
    if not calls:
        return False
    return bool(checker(case, calls)["valid"])


def checker() -> Any:
    ensure_installed()
    return _checker()
