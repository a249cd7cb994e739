"""The `responses:` section of the policy: how long stored Responses live, how large a conversation may grow, and
whom a stored response belongs to."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from backends.settings import StrictSettings

MAX_TTL_S = 30 * 86_400  # OpenAI keeps stored responses 30 days


class ResponsesSettings(StrictSettings):
    """Stored responses of POST /v1/responses (`store`, OpenAI's default true) and `previous_response_id`."""

    store_ttl_s: float = Field(
        86_400.0, gt=0, le=MAX_TTL_S, description="How long a stored response can be fetched or continued, in seconds."
    )
    max_conversation_bytes: int = Field(
        1_048_576,
        ge=1024,
        le=64 * 1_048_576,
        description="Largest conversation (the stored items before a request plus its own input, as JSON) that "
        "`previous_response_id` continues; a longer one is refused with 400 instead of growing without end.",
    )
    scope: Literal["key", "team"] = Field(
        "key",
        description="Who may read, continue and delete a stored response: the API key that created it, or every "
        "key of its team (a key without a team: that key). Another caller gets 404.",
    )
