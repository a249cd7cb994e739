"""The local tier's tagged output read back as tool calls: whole answers and streamed fragments agree."""

from __future__ import annotations

from backends.tool_output import ToolStream, message_of, parse_calls

TWO_CALLS = (
    '<tool_call>{"name": "get_time", "arguments": {"city": "Rome}"}}</tool_call>\n'
    '<tool_call>{"name": "get_weather", "arguments": {"place": {"city": "Paris"}, "unit": "celsius"}}</tool_call>'
)


def _streamed(text: str, step: int) -> tuple[list[tuple[str, str]], str, int]:
    stream = ToolStream()
    deltas = [delta for start in range(0, len(text), step) for delta in stream.feed(text[start : start + step])]
    deltas += stream.flush()
    calls: dict[int, list[str]] = {}
    content = ""
    for delta in deltas:
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            entry = calls.setdefault(call["index"], ["", ""])
            entry[0] += call["function"].get("name", "")
            entry[1] += call["function"].get("arguments", "")
    fragments = sum(1 for delta in deltas if "tool_calls" in delta)
    return [(name, arguments) for name, arguments in calls.values()], content, fragments


def test_fragments_at_any_split_assemble_to_the_whole_answer() -> None:
    whole = parse_calls(TWO_CALLS)
    assert whole == [
        ("get_time", '{"city": "Rome}"}'),
        ("get_weather", '{"place": {"city": "Paris"}, "unit": "celsius"}'),
    ]
    for step in (1, 2, 3, 7, 50, len(TWO_CALLS)):
        calls, content, fragments = _streamed(TWO_CALLS, step)
        assert calls == whole and content == ""
        assert fragments >= 2


def test_plain_text_is_content_and_not_calls() -> None:
    message, finish = message_of("Hello <b>there</b>", "stop")
    assert message["content"] == "Hello <b>there</b>" and "tool_calls" not in message and finish == "stop"
    assert _streamed("Hello <b>there</b>", 1)[1] == "Hello <b>there</b>"
    message, finish = message_of(TWO_CALLS, "stop")
    assert message["content"] is None and finish == "tool_calls" and len(message["tool_calls"]) == 2


def test_an_unfinished_call_is_not_a_call() -> None:
    cut = TWO_CALLS[:40]
    assert parse_calls(cut) is None
    assert message_of(cut, "length") == ({"role": "assistant", "content": cut, "refusal": None}, "length")
