"""CLIPDEX_EVENT_MAP: maps are checked at start; events the map does not fit say which field, which pointer
and what was there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from indexer.events import Event
from indexer.formats import event_format
from indexer.formats.mapping import EventMap, MapError, Mismatch, load_map, parse_pointer
from indexer.products import Product
from shared.config import load_settings
from shared.errors import ConfigError, InvalidEvent


def read(mapping: dict[str, object], document: object, envelope: object = None, op: str = "upsert") -> object:
    return EventMap.parse(mapping, "clipdex").event(op, document, envelope, "the event")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", ()),
        ("/sku", ("sku",)),
        ("/images/0/url", ("images", "0", "url")),
        ("/a~1b/c~0d", ("a/b", "c~d")),  # RFC 6901's escapes
        ("/", ("",)),
        ("/~01", ("~1",)),  # ~0 first, then the 1 is a plain character
    ],
)
def test_json_pointers_parse_as_rfc_6901_says(text: str, tokens: tuple[str, ...]) -> None:
    assert parse_pointer(text) == tokens


@pytest.mark.parametrize(
    ("mapping", "problem"),
    [
        ([], "a JSON object"),
        ({"uri": "/u"}, 'no "id"'),
        ({"id": "/sku"}, 'no "uri" and no "uris"'),
        ({"id": "sku", "uri": "/u"}, "not a JSON Pointer"),
        ({"id": "/sku", "uri": "/a~2b"}, "~0"),
        ({"id": "/sku", "uri": "/u", "title": "/t"}, "unknown key 'title'"),
        ({"id": "/sku", "uri": "/u", "delete_types": ["x"]}, "unknown key 'delete_types'"),  # CloudEvents only
        ({"id": "/sku", "uri": "/images/*/url"}, "wildcard"),
        ({"id": "/sku", "uris": "/a/*/b/*/c"}, "wildcard"),
        ({"id": {"pointer": "/sku", "default": "x"}, "uri": "/u"}, "no default"),
        ({"id": {"ptr": "/sku"}, "uri": "/u"}, '"pointer"'),
        ({"id": {"pointer": "/sku", "from": "row"}, "uri": "/u"}, '"from"'),
        ({"id": 7, "uri": "/u"}, "JSON Pointer"),
        ({"id": "/sku", "uris": "/images/*/url", "metadata": {"parent": "/p"}}, "parent"),
        ({"id": "/sku", "uris": {"pointer": "/images/*/url", "default": "x"}}, "a list"),
        ({"id": "/sku", "uri": "/u", "metadata": {" ": "/t"}}, "empty"),
    ],
)
def test_an_invalid_map_is_refused_saying_what_is_wrong(mapping: object, problem: str) -> None:
    with pytest.raises(MapError, match=problem):
        EventMap.parse(mapping, "clipdex")


def test_an_invalid_map_stops_the_start_naming_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"CLIPDEX_EVENT_MAP: .*not a JSON Pointer"):
        event_format("clipdex", '{"id": "sku", "uri": "/u"}')
    with pytest.raises(ConfigError, match="CLIPDEX_EVENT_MAP: not valid JSON"):
        event_format("clipdex", '{"id": "/sku",')
    with pytest.raises(ConfigError, match="CLIPDEX_EVENT_MAP: neither a JSON object nor a readable file"):
        event_format("clipdex", str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="CLIPDEX_EVENT_FORMAT=debezium needs CLIPDEX_EVENT_MAP"):
        event_format("debezium", None)
    with pytest.raises(ConfigError, match="unknown key 'op' for CLIPDEX_EVENT_FORMAT=debezium"):
        event_format("debezium", '{"id": "/id", "uri": "/u", "op": "/op"}')


def test_a_map_may_be_a_file(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"id": "/sku", "uri": "/img"}))
    assert load_map(str(path)) == {"id": "/sku", "uri": "/img"}
    assert load_map(f"  {json.dumps({'id': '/a'})}\n") == {"id": "/a"}
    settings = load_settings(event_format="debezium", event_map=str(path))
    assert event_format(settings.event_format, settings.event_map).mapping == EventMap.parse(
        {"id": "/sku", "uri": "/img"}, "debezium"
    )


def test_fields_map_to_an_event() -> None:
    mapping = {
        "id": "/sku",
        "uri": "/media/main",
        "metadata": {"title": "/title", "brand": {"pointer": "/brand", "default": "unbranded"}, "tags": "/tags"},
        "version": "/rev",
    }
    doc = {"sku": 42, "media": {"main": "https://cdn.shop.com/42.jpg"}, "title": "Mug", "brand": None, "tags": [1]}
    event = read(mapping, {**doc, "rev": 7})
    assert event == Event(
        op="upsert",
        id="42",  # a table's integer key is a string id
        uri="https://cdn.shop.com/42.jpg",
        metadata={"title": "Mug", "brand": "unbranded", "tags": [1]},
        version=7,
    )


def test_a_timestamp_version_counts_microseconds_and_needs_a_time_zone() -> None:
    mapping = {"id": "/id", "uri": "/u", "version": "/at"}
    doc = {"id": "a", "u": "a.jpg"}
    assert read(mapping, {**doc, "at": "1970-01-01T00:00:01.5Z"}).version == 1_500_000  # type: ignore[attr-defined]
    assert read(mapping, {**doc, "at": "2024-05-01T12:00:00+02:00"}).version == 1_714_557_600_000_000  # type: ignore[attr-defined]
    with pytest.raises(Mismatch, match=r"version \(/at\): .*without a time zone"):
        read(mapping, {**doc, "at": "2024-05-01T10:00:00"})
    with pytest.raises(Mismatch, match=r'version \(/at\): found a string \("yesterday"\), not an integer'):
        read(mapping, {**doc, "at": "yesterday"})
    with pytest.raises(InvalidEvent, match="version"):
        read(mapping, {**doc, "at": "1969-12-31T23:59:59Z"})  # before 1970: negative


def test_the_envelope_and_the_whole_document() -> None:
    mapping = {"id": {"pointer": "/subject", "from": "envelope"}, "uri": "/img", "metadata": ""}
    event = read(mapping, {"img": "a.jpg", "colour": "red"}, {"subject": "sku-9"})
    assert event == Event(op="upsert", id="sku-9", uri="a.jpg", metadata={"img": "a.jpg", "colour": "red"})


def test_a_delete_needs_only_the_id_and_takes_a_missing_version_as_none() -> None:
    mapping = {"id": "/sku", "uri": "/img", "version": "/rev", "metadata": {"t": "/title"}}
    assert read(mapping, {"sku": "a"}, op="delete") == Event(op="delete", id="a")
    assert read(mapping, {"sku": "a", "rev": None}, op="delete") == Event(op="delete", id="a")
    assert read(mapping, {"sku": "a", "rev": 3}, op="delete") == Event(op="delete", id="a", version=3)


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ({"uri": "a.jpg"}, r"the map's id \(/sku\): not found in the event"),
        ({"sku": None, "uri": "a.jpg"}, r"id \(/sku\): found null, not a string or an integer"),
        ({"sku": {"n": 1}, "uri": "a.jpg"}, r"id \(/sku\): found an object"),
        ({"sku": True, "uri": "a.jpg"}, r"id \(/sku\): found true \(a boolean\)"),
        ({"sku": "a", "uri": 5}, r"uri \(/uri\): found a number \(5\), not a string"),
        ({"sku": "a"}, r"uri \(/uri\): not found"),
        ({"sku": "a", "uri": "a.jpg", "meta": "flat"}, r"metadata.title \(/meta/title\): /meta is a string"),
        ({"sku": "a", "uri": "http://[::1/x.jpg"}, r"invalid event: uri: not a parseable URI"),
        ({"sku": "a\nb", "uri": "a.jpg"}, r"invalid event: id: control character"),
    ],
)
def test_an_event_the_map_does_not_fit_names_the_field_the_pointer_and_what_was_found(
    document: dict[str, object], reason: str
) -> None:
    mapping = {"id": "/sku", "uri": "/uri", "metadata": {"title": "/meta/title"}}
    document = {"meta": {"title": "t"}, **document}
    with pytest.raises(InvalidEvent, match=reason):
        read(mapping, document)


def test_image_lists_by_wildcard_by_plain_list_and_inside_a_json_string() -> None:
    wildcard = {"id": "/sku", "uris": "/images/*/url"}
    plain = {"id": "/sku", "uris": "/urls"}
    inner = read(wildcard, {"sku": "a", "images": json.dumps([{"url": "1.jpg"}, {"url": "2.jpg"}])})
    listed = read(plain, {"sku": "a", "urls": ["1.jpg", "2.jpg"]})
    direct = read(wildcard, {"sku": "a", "images": [{"url": "1.jpg"}, {"url": "2.jpg"}]})
    assert isinstance(inner, Product) and inner == listed == direct
    assert [e.uri for e in inner.images] == ["1.jpg", "2.jpg"]


def test_uri_and_uris_together_give_the_main_image_first() -> None:
    mapping = {"id": "/sku", "uri": "/main", "uris": "/gallery"}
    product = read(mapping, {"sku": "a", "main": "m.jpg", "gallery": ["g.jpg", "m.jpg"]})
    assert isinstance(product, Product) and [e.uri for e in product.images] == ["m.jpg", "g.jpg"]
    none = read(mapping, {"sku": "a", "main": None, "gallery": ["g.jpg"]})
    assert isinstance(none, Product) and [e.uri for e in none.images] == ["g.jpg"]


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ({"images": "not json"}, r'uris \(/images/\*/url\): /images is a string \("not json"\), not a list'),
        ({"images": {"url": "a"}}, r"/images is an object, not a list"),
        ({"images": None}, r"/images is null"),
        ({}, r"/images not found"),
        ({"images": [{"url": "a.jpg"}, {"href": "b.jpg"}]}, r"/images/1/url not found"),
        ({"images": [{"url": "a.jpg"}, "b.jpg"]}, r"/images/1 is a string .*not an object or a list"),
        ({"images": [{"url": 3}]}, r"image 0 is a number \(3\), not a string"),
        ({"images": [{"url": "a"}] * 251}, r"251 elements, over the limit of 250"),
    ],
)
def test_an_image_list_that_is_not_one_is_a_mismatch_naming_where(document: dict[str, object], reason: str) -> None:
    with pytest.raises(Mismatch, match=reason):
        read({"id": "/sku", "uris": "/images/*/url"}, {"sku": "a", **document})


def test_an_empty_image_list_is_a_product_without_images() -> None:
    product = read({"id": "/sku", "uris": {"pointer": "/images/*/url", "default": []}}, {"sku": "a"})
    assert product == Product("upsert", "a")


def test_the_clipdex_format_reads_the_op_from_the_mapped_field() -> None:
    mapping = EventMap.parse({"id": "/sku", "uri": "/img", "op": "/action"}, "clipdex")
    assert mapping.op_of({"action": "delete"}, "the event") == "delete"
    with pytest.raises(Mismatch, match=r'op \(/action\): found a string \("archive"\), not "upsert" or "delete"'):
        mapping.op_of({"action": "archive"}, "the event")
    assert EventMap.parse({"id": "/sku", "uri": "/img"}, "clipdex").op_of({}, "the event") == "upsert"
