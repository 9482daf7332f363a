"""Event formats: what a catalog publishes, read into clipdex's events (CLIPDEX_EVENT_FORMAT, CLIPDEX_EVENT_MAP).

    Kafka message (value, key, headers) ─▶ EventFormat.parse ─▶ (Event, ...)   one item each
                                                            ├▶ (Product, ...) one item per image (`uris` mapped)
                                                            ├▶ ()             nothing to do (Debezium's tombstone)
                                                            └▶ InvalidEvent   a dead letter with the reason

A message is usually one event; a Debezium update that changes the mapped id is two (the old id's
delete, then the new id's upsert).

    clipdex      clipdex's own {op, id, uri, metadata, version}; with a map, any JSON object   (clipdex.py)
    debezium     Debezium change events, with or without the JSON converter's schema          (debezium.py)
    cloudevents  CloudEvents 1.0 in Kafka, structured or binary mode                          (cloudevents.py)

Every format reads the message through `indexer.events.load_json` (size, UTF-8, nesting, numbers) and
builds events through the schema, so issue 9's bounds hold for all of them; `parse` turns whatever else
goes wrong into InvalidEvent too. `raw` is the text a dead letter keeps: what `dlq retry` parses again.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from indexer.events import Event, raw_text
from indexer.formats.mapping import EventMap, MapError, load_map
from indexer.products import Product
from shared.errors import ConfigError, InvalidEvent

if TYPE_CHECKING:
    from shared.config import Settings

logger = logging.getLogger(__name__)

FormatName = Literal["clipdex", "debezium", "cloudevents"]
Headers = tuple[tuple[str, bytes | None], ...]
Parsed = tuple[Event | Product, ...]


@dataclass(frozen=True)
class Incoming:
    """One message as a format sees it: no topic, no offset (a dead letter retried has neither)."""

    value: bytes | None
    key: bytes | None = None
    headers: Headers = ()


class EventFormat(ABC):
    name: ClassVar[FormatName]

    def __init__(self, mapping: EventMap | None = None) -> None:
        self.mapping = mapping

    def parse(self, message: Incoming) -> Parsed:
        """The events a message carries, in order (none: a message to skip). Raises InvalidEvent and nothing
        else."""
        try:
            return self.read(message)
        except InvalidEvent:
            raise
        except Exception as exc:  # a case the checks missed is still one bad event, not a stopped batch
            logger.warning("a %s event failed to parse in an unexpected way", self.name, exc_info=True)
            raise InvalidEvent(f"cannot parse the event ({type(exc).__name__})") from exc

    @abstractmethod
    def read(self, message: Incoming) -> Parsed: ...

    def raw(self, message: Incoming) -> str:
        """The message as a dead letter keeps it, and as `parse` reads it again (`dlq retry`)."""
        return raw_text(message.value)


def event_format(name: FormatName, map_text: str | None = None) -> EventFormat:
    """The format of that name with its map (CLIPDEX_EVENT_MAP: JSON, or a file); ConfigError naming the
    variable when the map is wrong or missing where the format needs one."""
    from indexer.formats.clipdex import ClipdexFormat
    from indexer.formats.cloudevents import CloudEventsFormat
    from indexer.formats.debezium import DebeziumFormat

    formats: dict[str, type[EventFormat]] = {f.name: f for f in (ClipdexFormat, DebeziumFormat, CloudEventsFormat)}
    mapping = None
    if map_text is not None and map_text.strip():
        try:
            mapping = EventMap.parse(load_map(map_text), name)
        except MapError as exc:
            raise ConfigError(f"invalid CLIPDEX_EVENT_MAP: {exc}") from None
    elif name == "debezium":
        raise ConfigError(
            "CLIPDEX_EVENT_FORMAT=debezium needs CLIPDEX_EVENT_MAP: which column is the id and which the image, "
            'e.g. {"id": "/sku", "uri": "/image_url"}'
        )
    return formats[name](mapping)


def format_from_settings(settings: Settings) -> EventFormat:
    return event_format(settings.event_format, settings.event_map)


__all__ = ["EventFormat", "Incoming", "Parsed", "event_format", "format_from_settings"]
