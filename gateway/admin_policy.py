"""The admin policy API: GET /admin/policy (the running policy, redacted, and the reload history), PUT /admin/policy
(a new policy as YAML), POST /admin/policy/reload (read the file again). Guarded like the other admin routes."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import yaml
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from backends.errors import BadRequest, ReloadFailed
from gateway.admin import admin_endpoint
from gateway.http import json_response, read_body
from gateway.openai_routes import gateway_of
from gateway.reload import Reload, Reloader
from router.policy_version import literal_secrets, redacted
from router.store.base import Store

PUT_SOURCE = "<PUT /admin/policy>"  # what error lines name for a policy sent in the body


def reloader_of(request: Request) -> Reloader:
    found: Reloader = request.app.state.reloader
    return found


def view(entry: Reload) -> dict[str, Any]:
    return {key: value for key, value in asdict(entry).items() if value != "" or key == "summary"}


def outcome(entry: Reload) -> Response:
    """200 with the record when it applied; 400 for a policy that does not check, 422 for one that did not load."""
    if entry.result == "invalid":
        raise BadRequest(f"the policy was not applied:\n{entry.error}", code="invalid_policy")
    if entry.result == "failed":
        raise ReloadFailed(f"the policy was not applied:\n{entry.error}")
    return json_response({"object": "policy.reload", **view(entry)})


async def show_policy(request: Request, store: Store) -> Response:
    reloader = reloader_of(request)
    running = reloader.running
    body: dict[str, Any] = {
        "object": "policy",
        "version": str(running.version),
        "counter": running.version.counter,
        "digest": running.version.digest,
        "source": running.loaded.source if running.loaded is not None else None,
        "file": str(reloader.policy_file) if reloader.policy_file is not None else None,
        "policy": redacted(running.loaded.policy) if running.loaded is not None else None,
        "text": None,
        "history": [view(entry) for entry in reversed(reloader.history)],
    }
    if running.text:
        written = literal_secrets(yaml.safe_load(running.text))
        if written:
            body["text_withheld"] = "credentials written in the text (use ${ENV} references): " + ", ".join(written)
        else:
            body["text"] = running.text
    return json_response(body)


async def put_policy(request: Request, store: Store) -> Response:
    body = await read_body(request, gateway_of(request).table.server.max_body_bytes)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRequest("The policy must be UTF-8 YAML text", code="invalid_policy") from error
    return outcome(await reloader_of(request).apply(text, PUT_SOURCE, "put"))


async def reload_policy(request: Request, store: Store) -> Response:
    return outcome(await reloader_of(request).reload_file("api"))


def policy_routes() -> list[Route]:
    return [
        Route("/admin/policy", admin_endpoint("/admin/policy", show_policy), methods=["GET"]),
        Route("/admin/policy", admin_endpoint("/admin/policy", put_policy), methods=["PUT"]),
        Route("/admin/policy/reload", admin_endpoint("/admin/policy/reload", reload_policy), methods=["POST"]),
    ]
