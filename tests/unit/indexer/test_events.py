"""The event schema: good events parse; every bad one becomes InvalidEvent with a reason a person can act on."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from indexer.events import MAX_EVENT_BYTES, MAX_METADATA_DEPTH, Event, nesting_depth, parse_event
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


# -- hostile events: every one is refused with a reason, none raises anything else --------------------------

GOOD = {"op": "upsert", "id": "sku-1", "uri": "a.jpg"}


def with_(**fields: object) -> bytes:
    return json.dumps({**GOOD, **fields}).encode()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def deep_dict(depth: int) -> dict[str, object]:
    """A dict `depth` levels deep: {"k": {"k": ... {}}}."""
    top: dict[str, object] = {}
    inner = top
    for _ in range(depth - 1):
        inner["k"] = inner = {}
    return top


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        # the findings of issue 9, each of which raised out of `to_record` or later out of the batch
        (nested(100_000).encode(), "nested deeper than"),
        (f'{{"op": "upsert", "id": "a", "uri": "a.jpg", "metadata": {{"x": {nested(100_000)}}}}}'.encode(), "nested"),
        (with_(uri="http://[::1/x.jpg"), "uri"),
        (with_(uri="/images/a\x00b.jpg"), "uri: control character"),
        (with_(version=10**30), "64-bit"),
        (b'{"op": "upsert", "id": "a", "uri": "a.jpg", "metadata": {"n": ' + b"9" * 5000 + b"}}", "5,000 digits"),
        (b'{"op": "upsert", "id": "a", "uri": "a.jpg", "version": ' + b"1" * 5000 + b"}", "5,000 digits"),
        # and their neighbours
        (with_(version=2**63), "64-bit"),
        (with_(metadata={"n": 2**64}), "64-bit"),
        (b'{"op": "upsert", "id": "a", "uri": "a.jpg", "metadata": {"n": NaN}}', "NaN"),
        (b'{"op": "upsert", "id": "a", "uri": "a.jpg", "metadata": {"n": 1e999}}', "finite"),
        (b'{"op": "upsert", "id": "a", "uri": "a.jpg", "metadata": {"s": "\\ud800"}}', "surrogate"),
        (b'{"op": "upsert", "id": "a", "uri": "a.jpg", "metadata": {"\\udfff": 1}}', "surrogate"),
        (with_(id="a\nb"), "id: control character"),
        (with_(id="a\x00"), "id: control character"),
        (with_(id="\x85"), "id: control character"),
        (with_(id="€" * 400), "1,024 bytes"),  # 400 characters, 1,200 bytes
        (with_(uri="ftp://example.com/a.jpg"), "file, http or https"),
        (with_(uri="javascript:alert(1)"), "file, http or https"),
        (with_(uri="http://"), "no host"),
        (with_(uri="http://example.com:99999/a.jpg"), "Port out of range"),
        (with_(uri="https://exa mple.com/a.jpg"), "invalid host name"),
        (with_(uri="http://999.1.1.1/a.jpg"), "IPv4"),
        (with_(uri="http://a..b/a.jpg"), "invalid host name"),
        (with_(uri="/a/" + "b" * 9000 + ".jpg"), "8,192 bytes"),
        (with_(metadata={"text": "x" * 70_000}), "65,536 bytes"),
        (with_(metadata=deep_dict(20)), "nested deeper than 17 levels"),
        (b"[" * 5000, "nested deeper than"),
        (b"x" * (MAX_EVENT_BYTES + 1), "over the limit of 262,144 bytes"),
        (b'{"op": "delete", "id": "a", "x": "' + b" " * MAX_EVENT_BYTES + b'"}', "over the limit"),
        ("ü".encode("latin-1") + b'{"op": "delete", "id": "a"}', "not JSON"),
    ],
)
def test_hostile_events_are_refused_with_a_reason(message: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        parse_event(message)


def test_a_key_with_control_characters_is_not_an_id() -> None:
    with pytest.raises(InvalidEvent, match="id: control character"):
        parse_event(b'{"op": "delete"}', key=b"sku\x1b[31m")


@pytest.mark.parametrize(
    "uri",
    [
        "a.jpg",
        "/images/catalog/sku-1.jpg",
        "file:///images/a%20b.jpg",
        "https://cdn.example.com/img/a.jpg?sig=abc",
        "http://[::1]:8080/x.jpg",
        "C:/images/a.jpg",  # a Windows drive is a path, not a scheme
        "/images/ünïcödé €.jpg",
    ],
)
def test_paths_and_file_http_https_uris_are_accepted(uri: str) -> None:
    assert parse_event(with_(uri=uri)).uri == uri


def test_limits_at_their_edge_are_accepted() -> None:
    assert parse_event(with_(version=2**63 - 1)).version == 2**63 - 1
    assert parse_event(with_(metadata={"n": -(2**63), "f": 1.5e300, "ok": "é"})).metadata["n"] == -(2**63)
    assert parse_event(with_(id="€" * 341)).id == "€" * 341  # 1,023 bytes
    deep = deep_dict(MAX_METADATA_DEPTH)
    assert parse_event(with_(metadata=deep)).metadata == deep


def test_the_model_enforces_the_same_limits_for_every_source() -> None:
    """The folder source and `dlq retry` build events without parse_event: the schema holds the limits."""
    bad_fields: list[dict[str, object]] = [
        {"id": "a\tb"},
        {"uri": "/a\x00"},
        {"uri": "http://[::1/x.jpg"},
        {"version": 2**63},
        {"metadata": {"s": "\udcff"}},
        {"metadata": {"n": 2**64}},
        {"metadata": {"n": float("nan")}},
        {"metadata": deep_dict(MAX_METADATA_DEPTH + 1)},
        {"metadata": {"s": object()}},
    ]
    for bad in bad_fields:
        with pytest.raises(ValueError):
            Event.model_validate({**GOOD, **bad})


# -- property-based: random bytes and random JSON never raise anything but InvalidEvent -------------------------

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(codec=None, exclude_categories=())),  # lone surrogates and controls too
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
ANY_TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40)
URIS = st.sampled_from(["a.jpg", "http://[::1/x.jpg", "file:///a\x00", "http://h:0/x", "http://h:1x/", "ftp://x/"])
EVENTS = st.fixed_dictionaries(  # mostly well-formed, with hostile values inside
    {"op": st.sampled_from(["upsert", "delete"]), "id": ANY_TEXT, "uri": URIS | ANY_TEXT},
    optional={
        "metadata": st.dictionaries(ANY_TEXT, JSON_VALUES, max_size=4),
        "version": st.integers(min_value=-(2**80), max_value=2**80),
    },
)
MALFORMED = st.fixed_dictionaries(  # any JSON in any field
    {},
    optional={name: JSON_VALUES for name in ("op", "id", "uri", "metadata", "version", "extra")},
)
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def parses_or_refuses(value: bytes | str | None, key: bytes | None = None) -> None:
    try:
        event = parse_event(value, key)
    except InvalidEvent as exc:
        assert str(exc)  # a reason a person can read
        return
    assert_storable(event)


def assert_storable(event: Event) -> None:
    """What parses is something every store and every client can hold: UTF-8 text, 64-bit integers,
    finite numbers, bounded sizes; and the model itself agrees."""
    assert len(event.id.encode("utf-8")) <= 1024
    if event.uri is not None:
        event.uri.encode("utf-8")
    assert event.version is None or 0 <= event.version < 2**63
    text = json.dumps(event.metadata, ensure_ascii=False, allow_nan=False)
    assert len(text.encode("utf-8")) <= 65_536
    stack: list[object] = [event.metadata]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack += list(value.values())
        elif isinstance(value, list):
            stack += value
        elif isinstance(value, int) and not isinstance(value, bool):
            assert -(2**63) <= value < 2**63
    Event.model_validate(event.model_dump())


@FUZZ
@given(st.binary(max_size=4096), st.none() | st.binary(max_size=64))
def test_random_bytes_never_raise(value: bytes, key: bytes | None) -> None:
    parses_or_refuses(value, key)


@FUZZ
@given(JSON_VALUES | EVENTS | MALFORMED)
def test_random_json_never_raises(value: object) -> None:
    parses_or_refuses(json.dumps(value).encode())


@FUZZ
@given(EVENTS, st.integers(min_value=0, max_value=3000), st.sampled_from(["[", '{"a": ']))
def test_random_events_wrapped_in_deep_nesting_never_raise(value: object, depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    parses_or_refuses(opener * depth + json.dumps(value) + closer * depth)


def depth_of(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    return 0


BRACKETY_TEXT = st.text(alphabet=st.sampled_from(list('[]{}"\\\\/ab\\n')), max_size=12)
BRACKETY_JSON = st.recursive(
    st.none() | st.integers() | BRACKETY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(BRACKETY_TEXT, inner, max_size=3),
    max_leaves=15,
)


@FUZZ
@given(BRACKETY_JSON, st.booleans())
def test_the_nesting_count_is_exact_for_valid_json_whatever_its_strings_hold(value: object, ascii_only: bool) -> None:
    """Brackets, quotes and backslashes inside strings (and keys) never count."""
    text = json.dumps(value, ensure_ascii=ascii_only)
    assert nesting_depth(text, 0) == depth_of(value)
