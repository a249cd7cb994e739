"""Function calling on BFCL's non-live categories: each local tier unconstrained and constrained, and the cascade.

Usage: .venv/bin/python bench/bfcl.py [--per-category N] [--out bench/results/bfcl.json]

"Unconstrained" sends no `tools`: the functions are described in a system message and the calls parsed from the text
(the best a client gets from a server without tool support). The tiergate rows send them as OpenAI `tools` with
`tool_choice` `auto` (the model may answer in text) or `required` (a call is forced and constrained), so the local
tier renders them and constrains the call; `required` is wrong by construction on the irrelevance category.
Scored by BFCL's own checker (bench/bfcl_data.py). Greedy decoding, one request at a time, same prompts for every row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
from openai import OpenAI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bfcl_data import CATEGORIES, Case, checker, load, score  # noqa: E402
from tests.conftest import start_server, stop_server  # noqa: E402

MAX_TOKENS = 160
ROWS = (  # name shown, public model, tool_choice sent with `tools` (None: tools only described in the prompt)
    ("SmolLM2, unconstrained (prompt only)", "smol", None),
    ("Gemma 270M, unconstrained (prompt only)", "gemma", None),
    ("SmolLM2, tiergate, tool_choice auto", "smol", "auto"),
    ("Gemma 270M, tiergate, tool_choice auto", "gemma", "auto"),
    ("cascade smol -> gemma, tool_choice auto", "auto", "auto"),
    ("SmolLM2, tiergate, tool_choice auto, tool_call_threshold", "smol_decides", "auto"),
    ("SmolLM2, tiergate, tool_choice required", "smol", "required"),
    ("Gemma 270M, tiergate, tool_choice required", "gemma", "required"),
    ("cascade smol -> gemma, tool_choice required", "auto", "required"),
)
PROMPT = (
    "You can call these functions:\n{functions}\n\nIf the request needs one or more of them, answer only with one "
    'line per call, each a JSON object {{"name": FUNCTION, "arguments": {{...}}}}. If none applies, answer in plain '
    "text."
)


@dataclass
class Row:
    name: str
    correct: Counter[str] = field(default_factory=Counter)
    total: Counter[str] = field(default_factory=Counter)
    calls: int = 0
    valid_calls: int = 0
    second_tier: int = 0
    errors: int = 0
    seconds: list[float] = field(default_factory=list)

    def table_row(self) -> dict[str, Any]:
        per = {c: self.correct[c] / self.total[c] if self.total[c] else 0.0 for c in CATEGORIES}
        return {
            "config": self.name,
            **{c: round(v, 3) for c, v in per.items()},
            "overall": round(sum(self.correct.values()) / max(1, sum(self.total.values())), 3),
            "valid_call_rate": round(self.valid_calls / self.calls, 3) if self.calls else None,
            "calls": self.calls,
            "p50_s": round(statistics.median(self.seconds), 2) if self.seconds else None,
            "mean_s": round(statistics.fmean(self.seconds), 2) if self.seconds else None,
            "second_tier": self.second_tier,
            "errors": self.errors,
        }


def calls_from_text(text: str) -> list[dict[str, Any]]:
    """Every JSON object with a string `name` and object `arguments` in the text, in order."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while (at := text.find("{", at)) != -1:
        try:
            value, end = decoder.raw_decode(text, at)
        except ValueError:
            at += 1
            continue
        if isinstance(value, dict) and isinstance(value.get("name"), str) and isinstance(value.get("arguments"), dict):
            found.append({"name": value["name"], "arguments": value["arguments"]})
        at = end
    return found


def well_formed(case: Case, call: dict[str, Any]) -> bool:
    for tool in case.tools:
        if tool["function"]["name"] == call["name"]:
            try:
                jsonschema.validate(call["arguments"], tool["function"]["parameters"])
            except jsonschema.ValidationError:
                return False
            return True
    return False


def ask(client: OpenAI, model: str, case: Case, choice: str | None) -> tuple[list[dict[str, Any]], str]:
    messages = list(case.messages)
    extra: dict[str, Any] = {}
    with_tools = choice is not None
    if with_tools:
        extra = {"tools": case.tools, "tool_choice": choice}
    else:
        listing = json.dumps([tool["function"] for tool in case.tools], indent=1)
        messages = [{"role": "system", "content": PROMPT.format(functions=listing)}, *messages]
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, **extra
    )
    answer = raw.parse()
    message = answer.choices[0].message
    if with_tools:
        calls = []
        for call in message.tool_calls or []:
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError:
                arguments = None
            calls.append({"name": call.function.name, "arguments": arguments})
    else:
        calls = calls_from_text(message.content or "")
    return calls, raw.headers.get("x-tiergate-backend", "")


def run_row(client: OpenAI, name: str, model: str, choice: str | None, cases: list[Case], check: Any) -> Row:
    row = Row(name)
    for case in cases:
        row.total[case.category] += 1
        began = time.perf_counter()
        try:
            calls, backend = ask(client, model, case, choice)
        except Exception as error:  # an error is a wrong answer, counted and shown
            print(f"{name} {case.id}: {error}", file=sys.stderr)
            row.errors += 1
            continue
        row.seconds.append(time.perf_counter() - began)
        row.second_tier += model == "auto" and backend == "gemma"
        good = [call for call in calls if isinstance(call["arguments"], dict) and well_formed(case, call)]
        row.calls += len(calls)
        row.valid_calls += len(good)
        verdict_calls = [{call["name"]: call["arguments"]} for call in calls if isinstance(call["arguments"], dict)]
        row.correct[case.category] += score_safely(case, verdict_calls, check)
    return row


def score_safely(case: Case, calls: list[dict[str, Any]], check: Any) -> bool:
    try:
        return score(case, calls, check)
    except Exception:  # BFCL's checker raises on some malformed calls; BFCL counts those as wrong too
        return False


def markdown(rows: list[dict[str, Any]], per_category: int) -> str:
    head = ["config", *CATEGORIES, "overall", "valid calls", "p50 s", "mean s", "to 2nd tier", "errors"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["config"], *(f"{row[c]:.0%}" for c in CATEGORIES), f"{row['overall']:.0%}",
                 "-" if row["valid_call_rate"] is None else f"{row['valid_call_rate']:.0%} of {row['calls']}",
                 str(row["p50_s"]), str(row["mean_s"]),
                 f"{row['second_tier']} of {per_category * len(CATEGORIES)}" if "cascade" in row["config"] else "-",
                 str(row["errors"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-category", type=int, default=20, help="first N cases of each category")
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N cases of each category")
    parser.add_argument("--only", default="", help="run only the rows whose name contains this text")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "bfcl.json"))
    args = parser.parse_args()
    cases, check = load(args.per_category, args.skip), checker()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    server = start_server(ROOT / "bench" / "bfcl.yaml", out.parent / "bfcl-gateway.log")
    try:
        client = server.client(timeout=300)
        rows = []
        for name, model, choice in [row for row in ROWS if args.only in row[0]]:
            began = time.perf_counter()
            rows.append(run_row(client, name, model, choice, cases, check).table_row())
            print(f"{name}: {time.perf_counter() - began:.0f} s", file=sys.stderr)
    finally:
        stop_server(server)
    last = args.skip + args.per_category
    chosen = f"cases {args.skip + 1}-{last}" if args.skip else f"first {args.per_category} cases"
    print(f"BFCL v4 (bfcl-eval 2026.3.23), {chosen} of each category, greedy, 2-core CPU\n")
    print(markdown(rows, args.per_category))
    out.write_text(json.dumps({"per_category": args.per_category, "rows": rows}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
