"""clipdex's own events, or with CLIPDEX_EVENT_MAP a catalog's own product JSON.

Without a map: `{"op", "id", "uri", "metadata", "version"}` and nothing else (`indexer.events`); the
message key is the id when the event has none.

With a map, the pointers read the event itself, and `"op"` (optional) names a field holding "upsert" or
"delete" (without it every event is an upsert):

    {"sku": "A-1", "title": "Trail shoe", "images": [{"url": "https://cdn.shop.com/a1-front.jpg"}, ...]}
    CLIPDEX_EVENT_MAP={"id": "/sku", "uris": "/images/*/url", "metadata": {"title": "/title"}}
"""

from __future__ import annotations

from indexer.events import MAX_ENVELOPE_DEPTH, load_json, parse_event
from indexer.formats import EventFormat, Incoming, Parsed
from indexer.formats.mapping import describe
from shared.errors import InvalidEvent

_WHERE = "the event"


class ClipdexFormat(EventFormat):
    name = "clipdex"

    def read(self, message: Incoming) -> Parsed:
        if self.mapping is None:
            return (parse_event(message.value, message.key),)
        if message.value is None:
            raise InvalidEvent("empty message (a tombstone record?): a catalog event is a JSON object")
        document = load_json(message.value, MAX_ENVELOPE_DEPTH)
        if not isinstance(document, dict):
            raise InvalidEvent(f"an event is a JSON object, got {describe(document)}")
        op = self.mapping.op_of(document, _WHERE)
        return (self.mapping.event(op, document, document, _WHERE),)
