"""The three collections of a clipdex store in Milvus, and how they are named and found.

    <name>                 one row per stored version of an item (usually one): ids, uri, metadata (JSON),
                           tags (hashes for filters), status, version, the vector (cosine)
    <name>_meta            small rows: the model the vectors come from, each writer's counters, the
                           registered folders
    <name>_dead_letters    what could not be indexed, and why, and when an indexer tries it again

`<name>` is CLIPDEX_MILVUS_COLLECTION, or derived from the model (`clipdex_vit_b_32_1a2b3c4d5e6f`): one
collection per model identity, so two models never share one, and a second model (a re-embedding) gets
a collection of its own beside the first. Commands that load no model (`status`, `dlq`) find the store's
collection by its companions, or are told it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from shared.config import Settings
from shared.errors import ConfigError
from shared.milvus.client import Milvus, require_pymilvus
from shared.types import ModelIdentity

MAX_TAGS = 4096  # Milvus's largest array; a row needs 1 + 2 per metadata key
MAX_TEXT = 65_535  # bytes in a VARCHAR
PLACEHOLDER_DIM = 2  # Milvus wants a vector in every collection; meta and dead letters carry a dummy one
_META, _DEAD = "_meta", "_dead_letters"


@dataclass(frozen=True)
class Names:
    items: str
    meta: str
    dead_letters: str

    @classmethod
    def of(cls, base: str) -> Names:
        return cls(base, base + _META, base + _DEAD)


def derived_name(identity: ModelIdentity) -> str:
    """`clipdex_<architecture>_<12 digits of the weights' checksum>`, as Milvus allows names."""
    slug = re.sub(r"[^a-z0-9]+", "_", identity.name.lower()).strip("_")[:32] or "model"
    checksum = identity.checksum.lower()
    if not re.fullmatch(r"[0-9a-f]{12,}", checksum):  # always a sha256 from the embedder; be safe anyway
        checksum = hashlib.sha256(identity.checksum.encode()).hexdigest()
    return f"clipdex_{slug}_{checksum[:12]}"


def name_for(settings: Settings, identity: ModelIdentity) -> str:
    return settings.milvus_collection or derived_name(identity)


def find(milvus: Milvus, settings: Settings) -> str | None:
    """The store's collection for a command that loads no model: the one named, else the only clipdex
    collection in the database; None when there is none yet."""
    existing = set(milvus.collections())
    if settings.milvus_collection is not None:
        return settings.milvus_collection if settings.milvus_collection in existing else None
    stores = sorted(n for n in existing if Names.of(n).meta in existing and Names.of(n).dead_letters in existing)
    if len(stores) > 1:
        raise ConfigError(
            f"{milvus.where} holds several clipdex collections ({', '.join(stores)}): set "
            "CLIPDEX_MILVUS_COLLECTION to the one you mean"
        )
    return stores[0] if stores else None


def ensure(milvus: Milvus, names: Names, dim: int) -> None:
    """Create what is missing (any process, any order), load all three, and check the vector size."""
    pymilvus = require_pymilvus()
    milvus.ensure(names.items, _items_schema(pymilvus, dim), _ITEM_INDEXES)
    milvus.ensure(names.meta, _meta_schema(pymilvus), _PLACEHOLDER_INDEX)
    milvus.ensure(names.dead_letters, _dead_letters_schema(pymilvus), _PLACEHOLDER_INDEX)
    check_layout(milvus, names)
    have = vector_dim(milvus, names.items)
    if have != dim:
        raise ConfigError(
            f"{milvus.where}: collection {names.items} holds {have}-d vectors, the model makes {dim}-d ones: "
            "set CLIPDEX_MILVUS_COLLECTION to another collection (or leave it unset: one per model)"
        )


def check_layout(milvus: Milvus, names: Names) -> None:
    """Refuse collections made before dead letters were retried by themselves (issue 9): they lack the
    fields (and the dead letters' own ids) that this clipdex writes, and Milvus adds no field to a
    collection in place everywhere (milvus-lite cannot)."""
    for name, field in ((names.items, "retriable"), (names.dead_letters, "retry_at")):
        fields = {f["name"] for f in milvus.describe(name)["fields"]}
        if field not in fields:
            raise ConfigError(
                f"{milvus.where}: collection {name} was made by an earlier development version of clipdex "
                f"(it has no {field!r} field). Copy the store out with that version (`clipdex migrate --to "
                "sqlite`), drop its three collections, and copy it back with this one (`clipdex migrate --to "
                "milvus`)"
            )


def vector_dim(milvus: Milvus, name: str) -> int:
    for field in milvus.describe(name)["fields"]:
        if field["name"] == "vector":
            return int(field["params"]["dim"])
    raise ConfigError(f"{milvus.where}: collection {name} has no vector field: it is not a clipdex collection")


_ITEM_INDEXES: list[tuple[str, dict[str, Any]]] = [
    # AUTOINDEX: Milvus picks the index for the deployment (HNSW on standalone); cosine like the SQLite store
    ("vector", {"index_type": "AUTOINDEX", "metric_type": "COSINE"}),
    ("key", {"index_type": "INVERTED"}),
    ("content", {"index_type": "INVERTED"}),
    ("status", {"index_type": "INVERTED"}),
    ("tags", {"index_type": "INVERTED"}),
]
_PLACEHOLDER_INDEX: list[tuple[str, dict[str, Any]]] = [("vector", {"index_type": "FLAT", "metric_type": "L2"})]


def _items_schema(pymilvus: Any, dim: int) -> Any:
    t = pymilvus.DataType
    schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("pk", t.VARCHAR, is_primary=True, max_length=64)  # <key>:<version>
    schema.add_field("key", t.VARCHAR, max_length=32)  # the item id's hash
    schema.add_field("item_id", t.VARCHAR, max_length=MAX_TEXT)
    schema.add_field("source", t.VARCHAR, max_length=64)
    schema.add_field("uri", t.VARCHAR, max_length=MAX_TEXT)
    schema.add_field("sha256", t.VARCHAR, max_length=512)
    schema.add_field("content", t.VARCHAR, max_length=32)  # the content hash's hash
    schema.add_field("metadata", t.JSON)
    schema.add_field("tags", t.ARRAY, element_type=t.INT64, max_capacity=MAX_TAGS)
    schema.add_field("status", t.VARCHAR, max_length=16)  # indexed | failed
    schema.add_field("reason", t.VARCHAR, max_length=MAX_TEXT)
    schema.add_field("version", t.INT64)  # -1: none given
    schema.add_field("retriable", t.BOOL)  # the item's last failure was transient
    schema.add_field("created_at", t.DOUBLE)
    schema.add_field("updated_at", t.DOUBLE)
    schema.add_field("vector", t.FLOAT_VECTOR, dim=dim)
    return schema


def _meta_schema(pymilvus: Any) -> Any:
    t = pymilvus.DataType
    schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("name", t.VARCHAR, is_primary=True, max_length=128)
    schema.add_field("value", t.VARCHAR, max_length=MAX_TEXT)  # JSON text
    schema.add_field("vector", t.FLOAT_VECTOR, dim=PLACEHOLDER_DIM)
    return schema


def _dead_letters_schema(pymilvus: Any) -> Any:
    t = pymilvus.DataType
    # Ids are written by clipdex (time and a counter, `MilvusStore._letter_ids`), not by Milvus: a letter
    # keeps its id when its retry time is written again (an upsert by primary key).
    schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", t.INT64, is_primary=True)
    schema.add_field("source", t.VARCHAR, max_length=64)
    schema.add_field("item_id", t.VARCHAR, max_length=MAX_TEXT)  # "": none (an event that did not parse)
    schema.add_field("key", t.VARCHAR, max_length=32)  # the item id's hash ("": none), for lookups by item
    schema.add_field("payload", t.VARCHAR, max_length=MAX_TEXT)
    schema.add_field("reason", t.VARCHAR, max_length=MAX_TEXT)
    schema.add_field("tries", t.INT64)
    schema.add_field("retriable", t.BOOL)  # the failure was transient
    schema.add_field("attempts", t.INT64)  # deliveries to the pipeline so far
    schema.add_field("retry_at", t.INT64)  # when an indexer tries it again, in ms since the epoch; -1: never
    schema.add_field("created_at", t.DOUBLE)
    schema.add_field("vector", t.FLOAT_VECTOR, dim=PLACEHOLDER_DIM)
    return schema
