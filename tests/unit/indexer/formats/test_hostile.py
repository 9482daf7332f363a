"""Issue 9's guarantees for every format: whatever a producer sends (bytes, JSON, envelopes with hostile
values, deep nesting, odd headers), `parse` returns an event every store can hold, None, or raises
InvalidEvent with a reason; `raw` always gives the dead letter's text."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from indexer.events import MAX_EVENT_BYTES, Event
from indexer.formats import EventFormat, Incoming, event_format
from indexer.products import MAX_IMAGES, MAX_PRODUCT_ID_BYTES, Product, parent_of
from shared.errors import InvalidEvent
from tests.catalog_events import GALLERY_MAP, PRODUCTS_MAP
from tests.unit.indexer.test_events import ANY_TEXT, JSON_VALUES, URIS, assert_storable, nested

FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

MAPPED = {"id": "/sku", "uri": "/image_url", "metadata": {"title": "/title"}, "version": "/rev"}
FORMATS: list[EventFormat] = [
    event_format("clipdex"),
    event_format("clipdex", json.dumps(MAPPED)),
    event_format("clipdex", json.dumps({**GALLERY_MAP, "op": "/op", "version": "/rev"})),
    event_format("debezium", json.dumps(PRODUCTS_MAP)),
    event_format("debezium", json.dumps(GALLERY_MAP)),
    event_format("cloudevents"),
    event_format("cloudevents", json.dumps({**MAPPED, "delete_types": ["d"], "upsert_types": ["u"]})),
    event_format("cloudevents", json.dumps({**GALLERY_MAP, "version": {"pointer": "/time", "from": "envelope"}})),
]
IDS = [f"{f.name}{'+map' if f.mapping else ''}{i}" for i, f in enumerate(FORMATS)]
ANY_FORMAT = st.sampled_from(FORMATS)


def assert_parsed_or_refused(fmt: EventFormat, message: Incoming) -> Any:
    raw = fmt.raw(message)
    assert isinstance(raw, str) and len(raw) <= 2 * MAX_EVENT_BYTES + 70_000
    try:
        parsed = fmt.parse(message)
    except InvalidEvent as exc:
        assert str(exc)  # a reason a person can read
        assert exc.__cause__ is None or isinstance(exc.__cause__, InvalidEvent | ValueError), (
            "only the catch-all saw this: a case the format's own checks missed"
        )
        return exc
    assert isinstance(parsed, tuple) and len(parsed) <= 2
    for event in parsed:
        if isinstance(event, Event):
            assert_storable(event)
            continue
        assert isinstance(event, Product)
        assert len(event.id.encode("utf-8")) <= MAX_PRODUCT_ID_BYTES
        assert len(event.images) + len(event.refused) <= MAX_IMAGES
        for image in event.images:
            assert_storable(image)
            assert parent_of(image.id) == event.id and image.metadata["parent"] == event.id
        for refused in event.refused:
            assert parent_of(refused.id) == event.id and refused.reason
    return parsed


def hostile_documents() -> st.SearchStrategy[dict[str, Any]]:
    """Rows and data objects shaped as the maps expect, mostly valid, with hostile values in any field and
    any field possibly missing: so that parsing gets past the envelope into the map and the schema."""
    sku = st.sampled_from(["A-1", "sku 2", "ü-3"]) | st.integers(0, 2**31)
    image = st.fixed_dictionaries({"url": URIS | URIS | ANY_TEXT}, optional={"alt": JSON_VALUES})
    images = st.lists(image, max_size=5)
    rev = st.integers(0, 2**40) | st.sampled_from(["2024-05-01T10:00:00Z", "2024-05-01T10:00:00", "soon"])
    fields = {
        "sku": sku | sku | ANY_TEXT | st.integers(-(2**70), 2**70) | JSON_VALUES,
        "image_url": URIS | URIS | ANY_TEXT | JSON_VALUES,
        "images": images | images | images.map(json.dumps) | JSON_VALUES,
        "title": st.text(max_size=20) | JSON_VALUES,
        "brand": JSON_VALUES,
        "price_cents": JSON_VALUES,
        "rev": rev | rev | st.integers(-(2**70), 2**70) | JSON_VALUES,
        "op": st.sampled_from(["upsert", "delete"]) | JSON_VALUES,
    }
    dropped = st.sets(st.sampled_from(sorted(fields)), max_size=2)
    return st.tuples(st.fixed_dictionaries(fields), dropped).map(
        lambda pair: {k: v for k, v in pair[0].items() if k not in pair[1]}
    )


HEADERS = st.lists(
    st.tuples(
        st.sampled_from(["ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time", "content-type", "x"]) | ANY_TEXT,
        st.none() | st.binary(max_size=40) | st.sampled_from([b"1.0", b"u", b"d", b"application/json", b"text/plain"]),
    ),
    max_size=8,
)


@FUZZ
@given(
    fmt=ANY_FORMAT, value=st.none() | st.binary(max_size=2048), key=st.none() | st.binary(max_size=64), headers=HEADERS
)
def test_random_bytes_and_headers_never_raise(
    fmt: EventFormat, value: bytes | None, key: bytes | None, headers: list[tuple[str, bytes | None]]
) -> None:
    assert_parsed_or_refused(fmt, Incoming(value, key, tuple(headers)))


@FUZZ
@given(
    fmt=ANY_FORMAT,
    document=hostile_documents() | JSON_VALUES,
    attributes=st.dictionaries(ANY_TEXT, JSON_VALUES, max_size=3),
)
def test_random_documents_in_every_envelope_never_raise(
    fmt: EventFormat, document: Any, attributes: dict[str, Any]
) -> None:
    ce = {"specversion": "1.0", "id": "e", "source": "/s", "type": "u", "time": "2024-05-01T10:00:00Z", **attributes}
    values = [
        document,
        {"op": "c", "after": document, "source": {"lsn": 1}},
        {"schema": None, "payload": {"op": "d", "before": document}},
        {**ce, "data": document},
    ]
    for value in values:
        assert_parsed_or_refused(fmt, Incoming(json.dumps(value).encode(), b"k"))
    binary = tuple((f"ce_{k}", str(v).encode("utf-8", "surrogatepass")) for k, v in ce.items())
    assert_parsed_or_refused(fmt, Incoming(json.dumps(document).encode(), None, binary))


@FUZZ
@given(
    fmt=ANY_FORMAT,
    document=hostile_documents(),
    depth=st.integers(min_value=0, max_value=3000),
    opener=st.sampled_from(["[", '{"a": ']),
)
def test_deep_wrappers_never_raise(fmt: EventFormat, document: dict[str, Any], depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    text = opener * depth + json.dumps({"op": "c", "after": document}) + closer * depth
    assert_parsed_or_refused(fmt, Incoming(text.encode()))


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_the_poison_events_of_issue_9_are_refused_in_every_format(fmt: EventFormat) -> None:
    poisons = [
        nested(100_000).encode(),
        b'{"op": "c", "after": {"sku": ' + b"9" * 5000 + b"}}",
        b'{"op": "c", "after": {"sku": "a", "image_url": "a.jpg", "title": 1e999}}',
        b"x" * (MAX_EVENT_BYTES + 1),
        b'{"specversion": "1.0", "id": "e", "source": "s", "type": "u", "data": ' + nested(5000).encode() + b"}",
    ]
    for poison in poisons:
        assert isinstance(assert_parsed_or_refused(fmt, Incoming(poison)), InvalidEvent)
    # A jsonb column holding a deep or huge document is refused inside as well.
    row = {"sku": "a", "image_url": "a.jpg", "images": nested(5000), "title": "t", "rev": 1}
    assert_parsed_or_refused(fmt, Incoming(json.dumps({"op": "c", "after": row}).encode()))


def test_headers_are_bounded() -> None:
    fmt = event_format("cloudevents")
    base = (("ce_specversion", b"1.0"), ("ce_id", b"e"), ("ce_source", b"s"), ("ce_type", b"t"))
    data = json.dumps({"op": "delete", "id": "a"}).encode()
    assert fmt.parse(Incoming(data, None, base)) == (Event(op="delete", id="a"),)
    with pytest.raises(InvalidEvent, match="over the limit of 100"):
        fmt.parse(Incoming(data, None, base + tuple((f"x{i}", b"") for i in range(100))))
    with pytest.raises(InvalidEvent, match="headers hold 70,"):
        fmt.parse(Incoming(data, None, (*base, ("ce_big", b"x" * 70_000))))
    with pytest.raises(InvalidEvent, match='header "ce_id" is not UTF-8'):
        fmt.parse(Incoming(data, None, (*base, ("ce_id", b"\xff"))))
