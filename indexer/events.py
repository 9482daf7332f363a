"""Catalog change events: the schema, and parsing that turns any bad message into a reason, not a crash.

    {"op": "upsert" | "delete", "id": "<catalog id>", "uri": "<path or URL>", "metadata": {...},
     "version": <int, optional>}

The message key is the id when `id` is missing. An upsert needs a uri.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.errors import InvalidEvent

MAX_ID_LENGTH = 1024


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["upsert", "delete"]
    id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    uri: str | None = Field(None, min_length=1, max_length=8192)
    metadata: dict[str, Any] = Field(default_factory=dict)
    version: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _upsert_has_uri(self) -> Event:
        if self.op == "upsert" and not self.uri:
            raise ValueError("an upsert needs a uri")
        return self


def parse_event(value: bytes | str | None, key: bytes | str | None = None) -> Event:
    """Parse one message. Raises InvalidEvent with a reason a person can act on."""
    if value is None:
        raise InvalidEvent("empty message (a tombstone record?): send {'op': 'delete', 'id': ...} instead")
    try:
        data = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidEvent(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidEvent(f"an event is a JSON object, got {type(data).__name__}")
    if "id" not in data and key is not None:
        data["id"] = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
    try:
        return Event.model_validate(data)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'event'}: {e['msg']}" for e in exc.errors())
        raise InvalidEvent(f"invalid event: {reasons}") from exc
