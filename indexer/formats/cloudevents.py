"""CloudEvents 1.0 on Kafka (CLIPDEX_EVENT_FORMAT=cloudevents), in either mode of the Kafka binding.

    structured  value: {"specversion": "1.0", "id": "...", "source": "...", "type": "...", "data": {...}}
                (content-type application/cloudevents+json)
    binary      headers ce_specversion, ce_id, ce_source, ce_type, ... (content-type: data's type);
                value: the data itself

With a map, its pointers read `data` (`"from": "envelope"` reads the attributes: `subject`, `time`, an
extension), and the type says the op: a type in `delete_types` deletes, any other upserts (or, when the
map lists `upsert_types`, one of those; another type is a dead letter naming it). The event's own `id`
and `time` are not the item id or version unless the map says so. Without a map, `data` is a clipdex
event: {"op", "id", "uri", "metadata", "version"}.

A binary-mode event becomes a dead letter in structured mode (the attributes with the data): a retry
needs no headers.
"""

from __future__ import annotations

import json
from typing import Any

from indexer.events import MAX_ENVELOPE_DEPTH, load_json, printable, raw_text, validated
from indexer.formats import EventFormat, Headers, Incoming, Parsed
from indexer.formats.mapping import describe
from shared.errors import InvalidEvent

SPEC_VERSION = "1.0"
REQUIRED = ("id", "source", "type")
HEADER_PREFIX = "ce_"
MAX_HEADER_BYTES = 64 * 1024  # every header's name and value together
MAX_HEADERS = 100
_JSON_TYPES = ("application/json", "text/json")


class CloudEventsFormat(EventFormat):
    name = "cloudevents"

    def read(self, message: Incoming) -> Parsed:
        attributes, data = split(message)
        _check_attributes(attributes)
        if self.mapping is None:
            if not isinstance(data, dict):
                raise InvalidEvent(
                    f"the CloudEvent's data is {describe(data)}, not a clipdex event (or set CLIPDEX_EVENT_MAP)"
                )
            return (validated(data),)
        op = self.mapping.op_of_type(attributes["type"])
        return (self.mapping.event(op, data, attributes, "data"),)

    def raw(self, message: Incoming) -> str:
        if not _is_binary(message.headers):
            return raw_text(message.value)
        try:
            attributes, data = split(message)
        except InvalidEvent:
            return raw_text(message.value)
        return json.dumps({**attributes, "data": data}, ensure_ascii=False)


def split(message: Incoming) -> tuple[dict[str, Any], Any]:
    """(attributes, data) of either mode; data is None when the event has none."""
    if _is_binary(message.headers):
        attributes, content_type = _from_headers(message.headers)
        if message.value is None:
            return attributes, None
        if content_type is not None and not _is_json(content_type):
            raise InvalidEvent(f'the CloudEvent\'s data is "{printable(content_type, 60)}", not JSON')
        return attributes, load_json(message.value, MAX_ENVELOPE_DEPTH)
    if message.value is None:
        raise InvalidEvent("empty message: a CloudEvent needs a JSON value (structured mode) or ce_* headers (binary)")
    document = load_json(message.value, MAX_ENVELOPE_DEPTH)
    if not isinstance(document, dict):
        raise InvalidEvent(
            f"not a CloudEvent: a JSON object with specversion, id, source and type, got {describe(document)}"
        )
    if "data_base64" in document:
        raise InvalidEvent("the CloudEvent carries data_base64 (binary data); clipdex reads JSON data")
    attributes = {k: v for k, v in document.items() if k != "data"}
    return attributes, document.get("data")


def _is_binary(headers: Headers) -> bool:
    return any(name.lower() == "ce_specversion" for name, _ in headers[:MAX_HEADERS])


def _from_headers(headers: Headers) -> tuple[dict[str, Any], str | None]:
    """The attributes from the ce_* headers, and the data's content type."""
    if len(headers) > MAX_HEADERS:
        raise InvalidEvent(f"{len(headers):,} headers, over the limit of {MAX_HEADERS}")
    size = sum(len(name) + len(value or b"") for name, value in headers)
    if size > MAX_HEADER_BYTES:
        raise InvalidEvent(f"the headers hold {size:,} bytes, over the limit of {MAX_HEADER_BYTES:,}")
    attributes: dict[str, Any] = {}
    content_type = None
    for name, value in headers:
        lower = name.lower()
        if lower != "content-type" and not lower.startswith(HEADER_PREFIX):
            continue
        try:
            text = (value or b"").decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidEvent(f'header "{printable(name, 60)}" is not UTF-8 text') from None
        if lower == "content-type":
            content_type = text
        else:
            attributes[lower.removeprefix(HEADER_PREFIX)] = text
    if content_type is not None:
        attributes["datacontenttype"] = content_type
    return attributes, content_type


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media in _JSON_TYPES or media.endswith("+json")


def _check_attributes(attributes: dict[str, Any]) -> None:
    version = attributes.get("specversion")
    if version != SPEC_VERSION:
        found = describe(version) if "specversion" in attributes else "missing"
        raise InvalidEvent(f'not a CloudEvent {SPEC_VERSION}: specversion is {found}, not "{SPEC_VERSION}"')
    for name in REQUIRED:
        value = attributes.get(name)
        if not isinstance(value, str) or not value:
            found = describe(value) if name in attributes else "missing"
            raise InvalidEvent(f"not a valid CloudEvent: {name} is {found}, not a non-empty string")
