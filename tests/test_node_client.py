"""A second real client: the official `openai` npm package streams from tiergate."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest

from tests.conftest import ROOT, Server


def run_node(script: str, gateway: Server, *extra: str) -> Any:
    """Run one of tests/node's scripts against the gateway's smol model (`extra`: more arguments, such as an API
    key); it prints one JSON object."""
    done = subprocess.run(
        ["node", str(ROOT / "tests" / "node" / script), gateway.base_url, "smol", *extra],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout)


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_node_sdk_streams_a_chat_answer(gateway: Server) -> None:
    result = run_node("stream.mjs", gateway)
    assert result["text"].strip()
    assert result["finish"] in ("stop", "length")
    usage = result["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= 16


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_node_sdk_assembles_a_streamed_tool_call(gateway: Server) -> None:
    result = run_node("tool_stream.mjs", gateway)
    assert result["finish"] == "tool_calls"
    (call,) = result["calls"]
    assert call["id"].startswith("call_") and call["function"]["name"] == "get_time"
    assert isinstance(json.loads(call["function"]["arguments"])["city"], str)
    # validated before it is sent (like response_format), so the router replays the checked call
    assert result["argumentDeltas"] >= 1
