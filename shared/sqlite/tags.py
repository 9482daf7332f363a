"""Filter tags: what lets a filtered search find its candidates in an index instead of scanning.

Each searchable item's vector has a row in `item_tags` per fact a filter can ask about, keyed by a 63-bit
hash of the fact:

    source "kafka"                   ─▶ tag(["source", "kafka"])
    metadata {"year": 2021}          ─▶ tag(["meta", "year", ["n", 2021.0]])
    metadata {"title": "a"}          ─▶ tag(["meta", "title", ["s", "a"]])

A filter's conditions become the same tags, so `SELECT vector_id FROM item_tags WHERE tag = ?` lists the
candidates of one condition from the primary key, at any collection size. The tags only narrow the
candidates: every candidate is still checked exactly (`Filters.matches`) against the item's real values,
so a hash collision, or values that hash alike without being equal (`true` and `1`, `2021` and `2021.0`,
two integers beyond 2**53), can only add a candidate that the check drops, never lose one.

Not indexed (checked on the ranked candidates instead, within a bound): a condition on `null` (it also
matches an item without the key), and list or object values (no filter value equals them).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

from shared.types import Filters


def tag(fact: list[Any]) -> int:
    """A signed 63-bit integer (SQLite's INTEGER) for one fact."""
    digest = hashlib.blake2b(json.dumps(fact, ensure_ascii=False).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def source_tag(source: str) -> int:
    return tag(["source", source])


def value_tag(key: str, value: Any) -> int | None:
    """The tag of `key == value`, or None for a value no tag stands for (null, a list, an object)."""
    if isinstance(value, bool | int | float):
        # true and 1, 2021 and 2021.0, 0 and -0.0 hash alike; the exact check tells them apart
        try:
            number: float | str = float(value) + 0.0  # + 0.0: -0.0 is 0.0 (they are equal)
        except OverflowError:  # an integer beyond any float: no stored value equals it
            number = str(value)
        if isinstance(number, float) and not math.isfinite(number):
            number = repr(number)
        return tag(["meta", key, ["n", number]])
    if isinstance(value, str):
        return tag(["meta", key, ["s", value]])
    return None


def item_tags(source: str, metadata: Mapping[str, Any]) -> list[int]:
    """Every tag of one item: its source and each top-level metadata key with a scalar value."""
    tags = {source_tag(source)}
    for key, value in metadata.items():
        found = value_tag(key, value)
        if found is not None:
            tags.add(found)
    return sorted(tags)


def filter_tags(filters: Filters) -> list[int]:
    """The tags an item must all hold to pass `filters` (empty: no condition can be looked up)."""
    tags = [] if filters.source is None else [source_tag(filters.source)]
    for key, value in filters.metadata.items():
        found = value_tag(key, value)
        if found is not None:
            tags.append(found)
    return tags
