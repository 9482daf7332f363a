"""Milvus filter expressions that no id, key or value can inject into: they hold hashes and integers only.

    item id   ─blake2b─▶ 32 hex digits     `key in ["9f2c…", …]`           lookups by id
    content   ─blake2b─▶ 32 hex digits     `content in ["1b7e…", …]`       a known image under another id
    source, metadata key, (key, value) ─blake2b─▶ 63-bit integers in the row's `tags` array:
              `array_contains(tags, 4021…)`, and for `key: null`, `not array_contains(tags, 7730…)`
    the product of a product's image (`shared.types.parent_of`) ─▶ a tag too: its images, failed ones too

A string from a stranger (an event's id or metadata, a query's filter) never reaches Milvus's expression
parser: only the digits of its hash do, so there is nothing to escape and nothing to get wrong on any Milvus
version or parser (pymilvus's own `get(ids=…)` and `delete(ids=…)` wrap VARCHAR keys in bare quotes, so
they are never used here). Every expression is also checked against the few tokens this module writes.

The original values stay in their own fields (`item_id`, `source`, `metadata` as JSON) and come back with
each row; readers compare those exactly (`Filters.matches_values`), so a hash collision could only add a
candidate that the exact check drops, never lose one. Equal values hash equally by the rules of
`shared.types.same_value`: `true` is not `1`, `2021` is `2021.0`, a string is never a number.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from shared.types import Filters, parent_of

_KEY_BYTES = 16  # 128 bits: no two ids of any catalog that fits in one Milvus share a key
_TAG_BYTES = 8
_TOKENS = re.compile(
    r"""\s+|[()\[\],]|==|<=|>=|-?\d+|"[0-9a-f]{32}(?::-?\d+)?"|"(?:indexed|failed)"
    |(?:and|or|not|in|array_contains|key|pk|content|tags|status|version|id|name|retry_at)\b""",
    re.VERBOSE,
)


def item_key(item_id: str) -> str:
    """The 32 hex digits that stand for an item id in expressions."""
    return _digest(item_id, b"id").hex()


def content_key(sha256: str) -> str:
    """The 32 hex digits that stand for a content hash in expressions."""
    return _digest(sha256, b"content").hex()


def row_pk(key: str, version: int) -> str:
    """The primary key of one stored version of an item (version -1: none given)."""
    return f"{key}:{version}"


def source_tag(source: str) -> int:
    return _tag(["source", source])


def product_tag(product_id: str) -> int:
    return _tag(["product", product_id])


def row_tags(item_id: str, source: str, metadata: Mapping[str, Any]) -> list[int]:
    """An item row's tags: `tags`, and its product's when the item is a product's image."""
    product = parent_of(item_id)
    return tags(source, metadata) + ([] if product is None else [product_tag(product)])


def any_tag(tags_: Iterable[int]) -> str:
    """`array_contains(tags, …) or …`: rows holding any of these tags."""
    return checked(" or ".join(f"array_contains(tags, {int(t)})" for t in tags_))


def tags(source: str, metadata: Mapping[str, Any]) -> list[int]:
    """A row's filterable facts: its source, each key with a non-null value, and each (key, scalar)."""
    out = [source_tag(source)]
    for key, value in metadata.items():
        if value is None:
            continue
        out.append(_tag(["has", key]))
        canonical = _canonical(value)
        if canonical is not None:
            out.append(_tag(["is", key, *canonical]))
    return out


# -- expressions ------------------------------------------------------------------------------------------


def keys_in(field: str, keys: Iterable[str]) -> str:
    """`field in ["…", …]` for hex keys, or primary keys made of one."""
    return checked(f"{field} in [{', '.join(json.dumps(k) for k in keys)}]")


def ints_in(field: str, values: Iterable[int]) -> str:
    return checked(f"{field} in [{', '.join(str(int(v)) for v in values)}]")


def search_expr(filters: Filters | None, exclude_keys: Sequence[str] = ()) -> str:
    """Searchable rows that pass `filters`, except those of `exclude_keys`."""
    parts = ['status == "indexed"']
    if filters is not None:
        if filters.source is not None:
            parts.append(f"array_contains(tags, {source_tag(filters.source)})")
        for key, wanted in filters.metadata.items():
            if wanted is None:
                parts.append(f"not array_contains(tags, {_tag(['has', key])})")
                continue
            canonical = _canonical(wanted)
            if canonical is None:  # NaN equals nothing
                return checked('status == "failed" and status == "indexed"')
            parts.append(f"array_contains(tags, {_tag(['is', key, *canonical])})")
    if exclude_keys:
        parts.append(f"not ({keys_in('key', exclude_keys)})")
    return checked(" and ".join(parts))


def deletes_expr(deletes: Sequence[tuple[str, int | None]]) -> str:
    """The rows of these (item key, version) pairs: all of an item's, or those up to a delete's version."""
    unversioned = [k for k, v in deletes if v is None]
    parts = [keys_in("key", unversioned)] if unversioned else []
    parts += [f'(key == "{k}" and version <= {int(v)})' for k, v in deletes if v is not None]
    return checked(" or ".join(parts))


def checked(expr: str) -> str:
    """The expression, if it is made only of the tokens this module writes; AssertionError otherwise."""
    if _TOKENS.sub("", expr):
        raise AssertionError(f"not an expression clipdex writes: {expr[:200]!r}")
    return expr


# -- hashing ------------------------------------------------------------------------------------------------


def _digest(text: str, person: bytes) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=_KEY_BYTES, person=person).digest()


def _tag(parts: list[Any]) -> int:
    data = json.dumps(parts, ensure_ascii=True, separators=(",", ":")).encode()
    digest = hashlib.blake2b(data, digest_size=_TAG_BYTES, person=b"tag").digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits: a non-negative int64, no unary minus to parse


def _canonical(value: Any) -> list[Any] | None:
    """Equal scalars (by `same_value`) map to one form; None for what equals nothing (NaN, a list, an object)."""
    if isinstance(value, bool):
        return ["b", value]
    if isinstance(value, int):
        return ["n", str(value)]
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return ["n", str(int(value))] if value.is_integer() else ["f", repr(value)]
    if isinstance(value, str):
        return ["s", value]
    return None
