"""Tools and tool messages rendered into a local model's prompt: the generic tagged format (README: Tool calling)."""

from __future__ import annotations

import json
from typing import Any

from backends.protocol import ChatRequest, Message

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"


def tools_active(request: ChatRequest) -> bool:
    """Whether tools are rendered at all (any tools given, whatever tool_choice says)."""
    return bool(request.tools)


def call_text(name: str, arguments: str) -> str:
    """One call as the model writes it; `arguments` is the JSON text of the arguments object."""
    return f'{CALL_OPEN}{{"name": {json.dumps(name)}, "arguments": {arguments}}}{CALL_CLOSE}'


def system_block(request: ChatRequest) -> str:
    """The functions with their schemas, and how to call one (or that none may be called now)."""
    lines = ["You have access to these functions:"]
    for tool in request.tools or []:
        function = tool.function
        described = {
            "name": function.name,
            "description": function.description or "",
            "parameters": function.parameters or {},
        }
        lines.append(json.dumps(described, ensure_ascii=False))
    if request.tool_choice == "none":
        lines.append("Do not call any function now; answer in plain text.")
    else:
        lines.append(
            f'To call a function, answer with {CALL_OPEN}{{"name": <function name>, "arguments": <arguments object>}}'
            f"{CALL_CLOSE}; otherwise answer in plain text."
        )
    return "\n".join(lines)


def _message_text(message: Message) -> str:
    if message.role == "tool":
        return f"<tool_response>{message.text()}</tool_response>"
    text = message.text()
    calls = [
        call_text(str(call.get("function", {}).get("name", "")), str(call.get("function", {}).get("arguments", "{}")))
        for call in message.tool_calls or []
    ]
    return "\n".join(part for part in (text, *calls) if part)


def chat_messages(request: ChatRequest) -> list[dict[str, str]]:
    """Messages for a chat template without tool support: the block joins the system message, tool turns are text."""
    block = system_block(request)
    rendered: list[dict[str, str]] = []
    for message in request.messages:
        role = "system" if message.role == "developer" else message.role
        role = "user" if role == "tool" else role
        rendered.append({"role": role, "content": _message_text(message)})
    if rendered and rendered[0]["role"] == "system":
        rendered[0] = {"role": "system", "content": rendered[0]["content"] + "\n\n" + block}
    else:
        rendered.insert(0, {"role": "system", "content": block})
    return rendered


def template_messages(request: ChatRequest) -> list[dict[str, Any]]:
    """Messages for a chat template that renders tools itself: OpenAI's shapes, passed through."""
    return [
        {key: value for key, value in message.model_dump(exclude_none=True).items() if key != "content"}
        | {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
        for message in request.messages
    ]


def completion_text(request: ChatRequest) -> str:
    """For base models: the block, then the turns as plain text to be continued."""
    return "\n\n".join([system_block(request), *(_message_text(message) for message in request.messages)])
