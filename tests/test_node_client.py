"""A second real client: the official `openai` npm package streams from tiergate."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.conftest import ROOT, Server


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_node_sdk_streams_a_chat_answer(gateway: Server) -> None:
    script = ROOT / "tests" / "node" / "stream.mjs"
    done = subprocess.run(
        ["node", str(script), gateway.base_url, "smol"], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(done.stdout)
    assert result["text"].strip()
    assert result["finish"] in ("stop", "length")
    usage = result["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= 16


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_node_sdk_assembles_a_streamed_tool_call(gateway: Server) -> None:
    script = ROOT / "tests" / "node" / "tool_stream.mjs"
    done = subprocess.run(
        ["node", str(script), gateway.base_url, "smol"], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(done.stdout)
    assert result["finish"] == "tool_calls"
    (call,) = result["calls"]
    assert call["id"].startswith("call_") and call["function"]["name"] == "get_time"
    assert isinstance(json.loads(call["function"]["arguments"])["city"], str)
    # validated before it is sent (like response_format), so the router replays the checked call
    assert result["argumentDeltas"] >= 1
