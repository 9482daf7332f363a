"""The event schema: good events parse; every bad one becomes InvalidEvent with a reason a person can act on."""

from __future__ import annotations

import json

import pytest

from indexer.events import Event, parse_event
from shared.errors import InvalidEvent


def test_an_upsert_parses_with_metadata_and_version() -> None:
    event = parse_event(json.dumps({"op": "upsert", "id": "sku-1", "uri": "a.jpg", "metadata": {"k": 1}, "version": 3}))
    assert event == Event(op="upsert", id="sku-1", uri="a.jpg", metadata={"k": 1}, version=3)


def test_a_delete_needs_no_uri() -> None:
    assert parse_event(b'{"op": "delete", "id": "sku-1"}').uri is None


def test_the_message_key_is_the_id_when_the_event_has_none() -> None:
    assert parse_event(b'{"op": "delete"}', key=b"sku-9").id == "sku-9"
    assert parse_event(b'{"op": "delete", "id": "in-body"}', key=b"key").id == "in-body"


@pytest.mark.parametrize(
    ("message", "key", "reason"),
    [
        (b"{not json", None, "not JSON"),
        (b"\xff\xfe\x00", None, "not JSON"),
        (b"[1, 2]", None, "JSON object"),
        (None, None, "empty message"),
        (b'{"op": "upsert", "uri": "a.jpg"}', None, "id"),
        (b'{"op": "upsert", "id": "a"}', None, "needs a uri"),
        (b'{"op": "move", "id": "a", "uri": "a.jpg"}', None, "op"),
        (b'{"op": "upsert", "id": "", "uri": "a.jpg"}', None, "id"),
        (b'{"op": "upsert", "id": "a", "uri": "a.jpg", "version": -1}', None, "version"),
        (b'{"op": "upsert", "id": "a", "uri": "a.jpg", "colour": "red"}', None, "colour"),
        (b'{"op": "upsert", "id": "a", "uri": "a.jpg", "metadata": [1]}', None, "metadata"),
    ],
)
def test_bad_events_are_refused_with_a_reason(message: bytes | None, key: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        parse_event(message, key)


def test_an_overlong_id_is_refused() -> None:
    with pytest.raises(InvalidEvent, match="id"):
        parse_event(json.dumps({"op": "delete", "id": "x" * 5000}))


def test_events_are_immutable() -> None:
    event = parse_event(b'{"op": "delete", "id": "a"}')
    with pytest.raises(ValueError, match="frozen"):
        event.id = "b"  # type: ignore[misc]
