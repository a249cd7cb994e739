"""What the Messages translation costs a request, without a network: validating and translating requests of
growing size into the chat request, a whole answer back, and a stream's events per chunk.

    python bench/messages_translate.py [--repeat N] [--json FILE]

Prints one table (median of N runs, milliseconds); the chat request's own validation is a column of its own,
since chat requests pay it too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.protocol import ChatRequest
from gateway import messages_translate as translate
from gateway.http import parse
from gateway.messages_schema import MessagesRequest
from gateway.messages_stream import MessagesStream

TOOL = {
    "name": "get_time",
    "description": "The local time in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def conversation(pairs: int) -> dict[str, Any]:
    """A coding-agent-like conversation: text, tool calls and their results, `pairs` exchanges long."""
    turns: list[dict[str, Any]] = []
    for index in range(pairs):
        turns.append({"role": "user", "content": [{"type": "text", "text": f"step {index}: look at file {index}"}]})
        call = {"type": "tool_use", "id": f"toolu_{index}", "name": "get_time", "input": {"city": f"c{index}"}}
        turns.append({"role": "assistant", "content": [{"type": "text", "text": "Looking."}, call]})
        result = {"type": "tool_result", "tool_use_id": f"toolu_{index}", "content": "x" * 40}
        turns.append({"role": "user", "content": [result]})
        turns.append({"role": "assistant", "content": "Done."})
    turns.append({"role": "user", "content": "Summarise."})
    return {"model": "m", "max_tokens": 64, "system": "You are a coding agent.", "tools": [TOOL], "messages": turns}


def median_ms(work: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        work()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def stream_ms_per_chunk(chunks: int, repeat: int) -> float:
    pieces = [
        {"id": "chatcmpl-x", "choices": [{"index": 0, "delta": {"content": "word "}, "finish_reason": None}]}
        for _ in range(chunks)
    ]

    def run() -> None:
        state = MessagesStream("msg_x", "m")
        state.opening()
        for piece in pieces:
            state.feed(piece)
        state.closing()

    return median_ms(run, repeat) / chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for pairs in (1, 10, 100, 1000, 2500):
        body = conversation(pairs)
        asked = parse(MessagesRequest, body)
        fields = translate.generation_fields(asked)
        rows.append(
            {
                "turns": len(body["messages"]),
                "body_kib": round(len(orjson.dumps(body)) / 1024, 1),
                "messages_parse_ms": round(median_ms(lambda b=body: parse(MessagesRequest, b), args.repeat), 3),
                "translate_ms": round(median_ms(lambda a=asked: translate.generation_fields(a), args.repeat), 3),
                "chat_parse_ms": round(median_ms(lambda f=fields: parse(ChatRequest, f), args.repeat), 3),
            }
        )
    answer = {
        "id": "chatcmpl-x",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
    }
    answer_us = round(median_ms(lambda: translate.message(answer, "m"), args.repeat) * 1000, 2)
    per_chunk_us = round(stream_ms_per_chunk(1000, args.repeat) * 1000, 2)
    print("| turns | body KiB | Messages validation ms | translation ms | chat validation ms |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['turns']} | {row['body_kib']} | {row['messages_parse_ms']} | {row['translate_ms']} | "
            f"{row['chat_parse_ms']} |"
        )
    print(f"\nan answer back: {answer_us} us; a stream: {per_chunk_us} us per text chunk (median of {args.repeat})")
    if args.json is not None:
        figures = {"requests": rows, "answer_us": answer_us, "stream_us_per_chunk": per_chunk_us}
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
