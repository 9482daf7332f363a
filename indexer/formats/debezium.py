"""Debezium change events of a catalog table (CLIPDEX_EVENT_FORMAT=debezium; the map is required).

    {"before": null, "after": {"id": 1001, "sku": "A-1", "title": "...", "image_url": "..."},
     "source": {"connector": "postgresql", "table": "products", "lsn": 24023128, ...}, "op": "c", "ts_ms": ...}

or the same wrapped as `{"schema": {...}, "payload": {...}}` (the JSON converter with schemas on).

- `c` (insert), `u` (update) and `r` (a snapshot read) upsert the row in `after`; `d` deletes the row in
  `before` (its id; where `before` is null, from the message key, which holds the primary key).
- An update whose `before` maps to another id (the map's id is a column that changed, a SKU renamed)
  deletes the old id too. `before` holds the old row where the table logs it (PostgreSQL with REPLICA
  IDENTITY FULL, MySQL); otherwise map the id to the primary key, which Debezium turns into a delete and
  an insert when it changes.
- The tombstone that follows a delete (a message with a null value, for log compaction) is skipped.
- The version is the map's `version` when it has one, else the source position: `source.lsn`
  (PostgreSQL's log position), else `source.ts_ms`, else `ts_ms`, so a replay or a reordered event
  resolves by the database's own order.
- `t` (truncate) deletes nothing: it would empty the index on one event; it is a dead letter saying so.
"""

from __future__ import annotations

from typing import Any

from indexer.events import MAX_ENVELOPE_DEPTH, Event, load_json
from indexer.formats import EventFormat, Incoming, Parsed
from indexer.formats.mapping import Mismatch, describe
from indexer.products import Product
from shared.errors import InvalidEvent

_UPSERTS = {"c": "an insert", "u": "an update", "r": "a snapshot read"}


class DebeziumFormat(EventFormat):
    name = "debezium"

    def read(self, message: Incoming) -> Parsed:
        assert self.mapping is not None, "the debezium format needs a map (event_format checks it)"
        if message.value is None:
            return ()  # the tombstone after a delete: Kafka's compaction marker, nothing to index
        change = _unwrap(load_json(message.value, MAX_ENVELOPE_DEPTH))
        if change is None:
            return ()  # a tombstone written by a converter as {"schema": ..., "payload": null}
        if not isinstance(change, dict):
            raise InvalidEvent(
                f"not a Debezium change event: a JSON object with op, before and after, got {describe(change)}"
            )
        op = change.get("op")
        if op is None and "after" not in change:
            raise InvalidEvent(
                "not a Debezium change event: no op (rows flattened by ExtractNewRecordState are read with "
                "CLIPDEX_EVENT_FORMAT=clipdex and a map)"
            )
        version = position(change)
        if isinstance(op, str) and op in _UPSERTS:
            row = change.get("after")
            if not isinstance(row, dict):
                raise InvalidEvent(f"a Debezium {_UPSERTS[op]} (op {op}) whose after is {describe(row)}, not a row")
            upsert = self.mapping.event("upsert", row, change, "after", default_version=version)
            return (*self._renamed(change, upsert.id, version), upsert)
        if op == "d":
            return (self._delete(change, message, version),)
        if op == "t":
            raise InvalidEvent("a Debezium truncate (op t) is not applied: delete the products' rows, or their items")
        raise InvalidEvent(f"not a Debezium change event: op is {describe(op)}, not c, u, r or d")

    def _renamed(self, change: dict[str, Any], new_id: str, version: int | None) -> tuple[Event | Product, ...]:
        """The delete of the id that `before` maps to, when it is not the id `after` maps to."""
        assert self.mapping is not None
        before = change.get("before")
        if change.get("op") != "u" or not isinstance(before, dict):
            return ()
        try:
            old = self.mapping.event("delete", before, change, "before", default_version=version)
        except InvalidEvent:
            return ()  # an old row without the id column (REPLICA IDENTITY DEFAULT logs the key only)
        return (old,) if old.id != new_id else ()

    def _delete(self, change: dict[str, Any], message: Incoming, version: int | None) -> Event | Product:
        assert self.mapping is not None
        row = change.get("before")
        if isinstance(row, dict):
            return self.mapping.event("delete", row, change, "before", default_version=version)
        if message.key is None:
            raise InvalidEvent(f"a Debezium delete (op d) whose before is {describe(row)} and with no message key")
        key = _unwrap(load_json(message.key, MAX_ENVELOPE_DEPTH))
        try:
            return self.mapping.event("delete", key, change, "the message key", default_version=version)
        except Mismatch as exc:
            raise Mismatch(f"a Debezium delete (op d) whose before is {describe(row)}: {exc}") from None


def _unwrap(document: Any) -> Any:
    """The change event inside the JSON converter's {"schema": ..., "payload": ...} envelope."""
    if isinstance(document, dict) and "payload" in document and set(document) <= {"schema", "payload"}:
        return document["payload"]
    return document


def position(change: dict[str, Any]) -> int | None:
    """Where the change sits in the database's log: source.lsn, else source.ts_ms, else ts_ms."""
    source = change.get("source")
    candidates = [source.get("lsn"), source.get("ts_ms")] if isinstance(source, dict) else []
    for value in [*candidates, change.get("ts_ms")]:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


__all__ = ["DebeziumFormat", "position"]
