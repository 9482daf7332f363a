"""CLIPDEX_EVENT_MAP: which fields of a catalog's own events are the item's id, image(s), metadata, version.

    {"id": "/sku", "uri": "/image_url", "uris": "/images/*/url",
     "metadata": {"title": "/title", "brand": {"pointer": "/brand", "default": null}},
     "version": "/updated_at_ms"}

Each field is a JSON Pointer (RFC 6901) into the document the format hands over (a Debezium row, a
CloudEvent's `data`, the event itself), or `{"pointer": ..., "from": "envelope", "default": ...}`: `from`
reads the envelope instead (a CloudEvent's attributes, Debezium's change event around the row), and
`default` stands in when the pointer finds nothing or null. `*` in `uris` stands for every element of a
list. A pointer that meets a string holding JSON (Debezium sends `jsonb` columns so) reads on inside it.

A map is checked once, at start (`EventMap.parse` raises MapError); an event it does not fit is one
dead letter whose reason names the field, the pointer and what was there (`Mismatch`, an InvalidEvent).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from indexer.events import MAX_ENVELOPE_DEPTH, Event, load_json, printable, validated
from indexer.products import MAX_IMAGES, PARENT_KEY, Product, product
from shared.errors import InvalidEvent

Op = Literal["upsert", "delete"]
_NOTHING = object()  # what a pointer found where there is no such member

COMMON_FIELDS = ("id", "uri", "uris", "metadata", "version")
FIELDS_OF_FORMAT = {
    "clipdex": (*COMMON_FIELDS, "op"),
    "debezium": COMMON_FIELDS,
    "cloudevents": (*COMMON_FIELDS, "delete_types", "upsert_types"),
}
_SPEC_KEYS = {"pointer", "from", "default"}
MAX_MAP_BYTES = 1024 * 1024


class MapError(ValueError):
    """The map itself is wrong; raised at start, before any event is read."""


class Mismatch(InvalidEvent):
    """An event that the map does not fit."""


def describe(value: Any) -> str:
    """What a pointer found, in a few words for a reason: a type and a short, escaped glimpse."""
    if value is _NOTHING:
        return "nothing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int | float):
        return f"a number ({printable(repr(value), 24)})"
    if isinstance(value, str):
        return f'a string ("{printable(value, 40)}")'
    if isinstance(value, list):
        return f"a list of {len(value):,}"
    return "an object"


# -- pointers ---------------------------------------------------------------------------------------------------


def parse_pointer(text: str) -> tuple[str, ...]:
    """RFC 6901: "" is the whole document, "/a/b" reads member b of member a; ~1 is "/", ~0 is "~"."""
    if text == "":
        return ()
    if not text.startswith("/"):
        raise MapError(f"{text!r} is not a JSON Pointer: it starts with '/' (or is empty, for the whole document)")
    tokens = []
    for raw in text[1:].split("/"):
        if "~" in raw.replace("~0", "").replace("~1", ""):
            raise MapError(f"{text!r}: '~' is written ~0 in a JSON Pointer, and '/' inside a name ~1")
        tokens.append(raw.replace("~1", "/").replace("~0", "~"))
    return tuple(tokens)


_WHOLE = '""'  # the pointer to the whole document, as reasons show it


def _show(tokens: Sequence[str]) -> str:
    return "".join("/" + t.replace("~", "~0").replace("/", "~1") for t in tokens) or _WHOLE


def _json_inside(value: Any) -> Any:
    """A string that holds a JSON object or list, parsed (within the event bounds); anything else as is."""
    if isinstance(value, str) and value.lstrip()[:1] in ("{", "["):
        try:
            return load_json(value, MAX_ENVELOPE_DEPTH)
        except InvalidEvent:
            return value
    return value


def _step(value: Any, token: str) -> Any:
    """One token further into `value`: a member of an object, an element of a list; _NOTHING if none."""
    value = _json_inside(value)
    if isinstance(value, dict):
        return value.get(token, _NOTHING)
    if isinstance(value, list):
        if token.isdigit() and (token == "0" or not token.startswith("0")) and int(token) < len(value):
            return value[int(token)]
        return _NOTHING
    raise TypeError  # the caller says where


@dataclass(frozen=True)
class Field:
    """One mapped field: where it reads, and what stands in when nothing is there."""

    name: str  # as reasons name it: "id", "metadata.title"
    pointer: str  # as written in the map
    tokens: tuple[str, ...]
    envelope: bool = False  # read the envelope, not the document
    default: Any = _NOTHING

    @classmethod
    def parse(cls, name: str, spec: Any, *, wildcard: bool = False, default_allowed: bool = True) -> Field:
        if isinstance(spec, str):
            spec = {"pointer": spec}
        if not isinstance(spec, dict):
            raise MapError(f'{name}: a JSON Pointer ("/sku") or {{"pointer": ..., "from": ..., "default": ...}}')
        unknown = set(spec) - _SPEC_KEYS
        if unknown or "pointer" not in spec or not isinstance(spec["pointer"], str):
            raise MapError(f'{name}: an object with a string "pointer", and optionally "from" and "default"')
        if spec.get("from", "document") not in ("document", "envelope"):
            raise MapError(f'{name}: "from" is "envelope" or "document" (the default), not {spec["from"]!r}')
        if "default" in spec and not default_allowed:
            raise MapError(f"{name}: no default: every event must carry its own")
        if "default" in spec and wildcard and not isinstance(spec["default"], list):
            raise MapError(f"{name}: the default of a list of images is a list, e.g. []")
        tokens = parse_pointer(spec["pointer"])
        stars = tokens.count("*")
        if stars > (1 if wildcard else 0):
            where = "once, in uris" if not wildcard else "once"
            raise MapError(f"{name}: {spec['pointer']!r}: the wildcard * may appear {where}")
        return cls(name, spec["pointer"], tokens, spec.get("from") == "envelope", spec.get("default", _NOTHING))

    def read(self, document: Any, envelope: Any, where: str) -> Any:
        """The value the pointer finds, or the default; Mismatch when there is neither."""
        root, where = (envelope, "the envelope") if self.envelope else (document, where)
        value = self._walk(root, self.tokens, where)
        if value is _NOTHING or value is None:
            if self.default is not _NOTHING:
                return self.default
            if value is _NOTHING:
                raise self.mismatch(f"not found in {where}")
        return value

    def read_list(self, document: Any, envelope: Any, where: str) -> list[Any]:
        """A list: the elements a wildcard pointer finds, or the list a plain pointer finds."""
        if "*" not in self.tokens:
            found = _json_inside(self.read(document, envelope, where))
            if not isinstance(found, list):
                raise self.mismatch(f"found {describe(found)}, not a list")
            if len(found) > MAX_IMAGES:
                raise self.mismatch(f"a list of {len(found):,}, over the limit of {MAX_IMAGES} images per product")
            return found
        star = self.tokens.index("*")
        head, tail = self.tokens[:star], self.tokens[star + 1 :]
        root, where = (envelope, "the envelope") if self.envelope else (document, where)
        found = _json_inside(self._walk(root, head, where))
        if found is _NOTHING or found is None:
            if isinstance(self.default, list):
                return list(self.default)
            raise self.mismatch(f"{_show(head)} {'not found' if found is _NOTHING else 'is null'}")
        if not isinstance(found, list):
            raise self.mismatch(f"{_show(head)} is {describe(found)}, not a list")
        if len(found) > MAX_IMAGES:
            raise self.mismatch(f"{_show(head)} holds {len(found):,} elements, over the limit of {MAX_IMAGES} images")
        out = []
        for i, element in enumerate(found):
            value = self._walk(element, tail, where, prefix=(*head, str(i)))
            if value is _NOTHING:
                raise self.mismatch(f"{_show((*head, str(i), *tail))} not found")
            out.append(value)
        return out

    def _walk(self, value: Any, tokens: Sequence[str], where: str, prefix: Sequence[str] = ()) -> Any:
        for i, token in enumerate(tokens):
            try:
                value = _step(value, token)
            except TypeError:
                at = _show((*prefix, *tokens[:i]))
                what = f"{where if at == _WHOLE else at} is {describe(value)}, not an object or a list"
                raise self.mismatch(what) from None
            if value is _NOTHING:
                return _NOTHING
        return value

    def mismatch(self, what: str) -> Mismatch:
        return Mismatch(f"the map's {self.name} ({self.pointer or _WHOLE}): {what}")


# -- the map -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventMap:
    id: Field
    uri: Field | None = None
    uris: Field | None = None
    metadata: dict[str, Field] | Field | None = None
    version: Field | None = None
    op: Field | None = None  # the clipdex format only: a field holding "upsert" or "delete"
    delete_types: frozenset[str] = frozenset()  # CloudEvents only: types that delete
    upsert_types: frozenset[str] | None = None  # CloudEvents only: types that upsert (None: every other type)

    @classmethod
    def parse(cls, value: Any, format_name: str) -> EventMap:
        """A map from its JSON; MapError says what is wrong with it."""
        if not isinstance(value, dict):
            raise MapError(f"a JSON object, not {describe(value)}")
        allowed = FIELDS_OF_FORMAT[format_name]
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise MapError(
                f"unknown key {unknown[0]!r} for CLIPDEX_EVENT_FORMAT={format_name} (known: {', '.join(allowed)})"
            )
        if "id" not in value:
            raise MapError('no "id": which field is the item id, e.g. {"id": "/sku", ...}')
        if "uri" not in value and "uris" not in value:
            raise MapError('no "uri" and no "uris": which field is the image, e.g. {"uri": "/image_url"}')
        uris = Field.parse("uris", value["uris"], wildcard=True) if "uris" in value else None
        metadata: dict[str, Field] | Field | None = None
        if "metadata" in value:
            spec = value["metadata"]
            if isinstance(spec, dict) and "pointer" not in spec:
                if uris is not None and PARENT_KEY in spec:
                    raise MapError(
                        f'metadata: "{PARENT_KEY}" is set by clipdex to the product id when "uris" is mapped'
                    )
                bad = [k for k in spec if not k.strip()]
                if bad:
                    raise MapError("metadata: a key is empty")
                metadata = {k: Field.parse(f"metadata.{k}", v) for k, v in spec.items()}
            else:
                metadata = Field.parse("metadata", spec)
        return cls(
            id=Field.parse("id", value["id"], default_allowed=False),
            uri=Field.parse("uri", value["uri"]) if "uri" in value else None,
            uris=uris,
            metadata=metadata,
            version=Field.parse("version", value["version"]) if "version" in value else None,
            op=Field.parse("op", value["op"]) if "op" in value else None,
            delete_types=frozenset(_types(value, "delete_types") or ()),
            upsert_types=_types(value, "upsert_types"),
        ).checked()

    def checked(self) -> EventMap:
        if self.upsert_types is not None and self.upsert_types & self.delete_types:
            both = sorted(self.upsert_types & self.delete_types)[0]
            raise MapError(f"type {both!r} is in both upsert_types and delete_types")
        return self

    # -- reading one event ---------------------------------------------------------------------------------------

    def event(
        self, op: Op, document: Any, envelope: Any, where: str, *, default_version: int | None = None
    ) -> Event | Product:
        """The event that `document` (with its `envelope`) maps to; Mismatch or InvalidEvent otherwise."""
        item_id = self._id(document, envelope, where)
        if op == "delete":
            version = self._version(document, envelope, where, default_version, lenient=True)
            if self.uris is not None:
                return product("delete", item_id, version=version)
            return validated({"op": "delete", "id": item_id, "version": version})
        version = self._version(document, envelope, where, default_version)
        if self.uris is None:
            assert self.uri is not None, "a map has uri or uris (parse checks it)"
            uri = self._string(self.uri, document, envelope, where)
            metadata = self._metadata(document, envelope, where)
            return validated({"op": "upsert", "id": item_id, "uri": uri, "metadata": metadata, "version": version})
        uris = [] if self.uri is None else [self._string(self.uri, document, envelope, where, optional=True)]
        for i, uri in enumerate(self.uris.read_list(document, envelope, where)):
            if not isinstance(uri, str):
                raise self.uris.mismatch(f"image {i} is {describe(uri)}, not a string")
            uris.append(uri)
        metadata = self._metadata(document, envelope, where)
        return product("upsert", item_id, [u for u in uris if u is not None], metadata, version)

    def op_of(self, document: Any, where: str) -> Op:
        """The clipdex format's op: the mapped field's value, or upsert when the map has no "op"."""
        if self.op is None:
            return "upsert"
        value = self.op.read(document, document, where)
        if value == "upsert":
            return "upsert"
        if value == "delete":
            return "delete"
        raise self.op.mismatch(f'found {describe(value)}, not "upsert" or "delete"')

    def op_of_type(self, event_type: str) -> Op:
        """A CloudEvent's op, from its type."""
        if event_type in self.delete_types:
            return "delete"
        if self.upsert_types is None or event_type in self.upsert_types:
            return "upsert"
        raise Mismatch(
            f'type "{printable(event_type, 80)}" is in neither upsert_types nor delete_types of CLIPDEX_EVENT_MAP'
        )

    def _id(self, document: Any, envelope: Any, where: str) -> str:
        value = self.id.read(document, envelope, where)
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # a table's integer key
        raise self.id.mismatch(f"found {describe(value)}, not a string or an integer")

    def _string(self, spec: Field, document: Any, envelope: Any, where: str, *, optional: bool = False) -> Any:
        value = spec.read(document, envelope, where)
        if isinstance(value, str) or (optional and value is None):
            return value
        raise spec.mismatch(f"found {describe(value)}, not a string")

    def _metadata(self, document: Any, envelope: Any, where: str) -> dict[str, Any]:
        if self.metadata is None:
            return {}
        if isinstance(self.metadata, Field):
            value = _json_inside(self.metadata.read(document, envelope, where))
            if not isinstance(value, dict):
                raise self.metadata.mismatch(f"found {describe(value)}, not an object")
            return value
        return {name: spec.read(document, envelope, where) for name, spec in self.metadata.items()}

    def _version(
        self, document: Any, envelope: Any, where: str, default: int | None, *, lenient: bool = False
    ) -> int | None:
        """The mapped version (an integer, or an RFC 3339 timestamp in microseconds), else `default`.
        `lenient` (a delete): a version that is not there is None, and the delete always applies."""
        if self.version is None:
            return default
        try:
            value = self.version.read(document, envelope, where)
        except Mismatch:
            if lenient:
                return None
            raise
        if value is None and lenient:
            return None
        return self._version_value(value)

    def _version_value(self, value: Any) -> int | None:
        assert self.version is not None
        if isinstance(value, int) and not isinstance(value, bool):
            return value  # the schema checks its range
        if isinstance(value, str):
            try:
                when = datetime.fromisoformat(value)
            except ValueError:
                pass
            else:
                if when.tzinfo is None:
                    raise self.version.mismatch(f"found {describe(value)}, a timestamp without a time zone")
                delta = when - datetime(1970, 1, 1, tzinfo=UTC)
                return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
        raise self.version.mismatch(f"found {describe(value)}, not an integer or an RFC 3339 timestamp")


def _types(value: dict[str, Any], key: str) -> frozenset[str] | None:
    if key not in value:
        return None
    types = value[key]
    if not isinstance(types, list) or not all(isinstance(t, str) and t for t in types):
        raise MapError(f'{key}: a list of CloudEvents types, e.g. ["com.shop.product.deleted"]')
    return frozenset(types)


def load_map(text: str) -> Any:
    """CLIPDEX_EVENT_MAP's value as JSON: the text itself when it starts with "{", else a file it names."""
    source = text.strip()
    if not source.startswith("{"):
        try:
            with open(source, "rb") as handle:
                data = handle.read(MAX_MAP_BYTES + 1)
        except OSError as exc:
            raise MapError(f"neither a JSON object nor a readable file: {exc.strerror or exc} ({source!r})") from None
        if len(data) > MAX_MAP_BYTES:
            raise MapError(f"{source}: over {MAX_MAP_BYTES:,} bytes")
        try:
            source = data.decode("utf-8")
        except UnicodeDecodeError:
            raise MapError(f"{text.strip()}: not UTF-8 text") from None
    try:
        return json.loads(source)
    except ValueError as exc:
        raise MapError(f"not valid JSON: {exc}") from None
