"""Filter tags: a filter's candidates come from an index, are a superset of the items that pass, follow
every write, and are added to a store written before they existed."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shared.roles import Delete, Failure, Upsert
from shared.sqlite import tags
from shared.sqlite.store import SCHEMA_VERSION, SqliteStore
from shared.types import Filters, Item
from tests.unit.shared.sqlite.old_schemas import make_store

DIM = 8


def vec(seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return x / np.linalg.norm(x)


def up(
    item_id: str, embedding: np.ndarray | None = None, source: str = "kafka", sha: str | None = None, **metadata: Any
) -> Upsert:
    emb = vec(hash(item_id) % 1000) if embedding is None else embedding
    return Upsert(item_id, source, f"https://x/{item_id}", sha or f"sha-{item_id}", dict(metadata), emb)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore(tmp_path / "db.sqlite3") as s:
        yield s


def matching_ids(store: SqliteStore, filters: Filters, limit: int = 1000) -> set[str] | None:
    vids = store.matching_vectors(filters, limit)
    if vids is None:
        return None
    return {item.id for item in store.items_for_vectors([int(v) for v in vids]).values()}


# -- which candidates ---------------------------------------------------------------------------------------


def test_candidates_are_the_items_with_every_value(store: SqliteStore) -> None:
    store.apply(
        upserts=[
            up("a", colour="red", year=2021),
            up("b", colour="red", year=2020),
            up("c", colour="blue", year=2021, source="folder"),
            up("d", colour="red", year=2021.0, source="folder"),
        ]
    )
    assert matching_ids(store, Filters({"colour": "red"})) == {"a", "b", "d"}
    assert matching_ids(store, Filters({"colour": "red", "year": 2021})) == {"a", "d"}  # 2021 is 2021.0
    assert matching_ids(store, Filters(source="folder")) == {"c", "d"}
    assert matching_ids(store, Filters({"year": 2021}, source="kafka")) == {"a"}
    assert matching_ids(store, Filters({"colour": "green"})) == set()
    assert matching_ids(store, Filters({"colour": "2021"})) == set()  # a string is not a number


def test_null_conditions_are_not_looked_up_and_the_others_still_are(store: SqliteStore) -> None:
    store.apply(upserts=[up("a", colour="red"), up("b", colour="red", gone=None), up("c")])
    assert store.matching_vectors(Filters({"gone": None}), 1000) is None  # absent or null: not in the index
    assert matching_ids(store, Filters({"gone": None, "colour": "red"})) == {"a", "b"}  # exact check follows


def test_more_matches_than_the_limit_is_none_and_the_rarest_condition_decides(store: SqliteStore) -> None:
    store.apply(upserts=[up(f"i{n}", common="yes", rare="yes" if n < 3 else "no") for n in range(50)])
    assert store.matching_vectors(Filters({"common": "yes"}), 49) is None
    assert matching_ids(store, Filters({"common": "yes"}), 50) == {f"i{n}" for n in range(50)}
    assert matching_ids(store, Filters({"common": "yes", "rare": "yes"}), 10) == {"i0", "i1", "i2"}


def test_hostile_keys_and_values_are_data(store: SqliteStore) -> None:
    odd = {
        "x' OR '1'='1": "1; DROP TABLE items; --",
        'a"]) or 1 == 1 or (["': "b",
        "$.year": "json path",
        "": "empty key",
        "é\u0000\u2028": "\U0001f600",
    }
    store.apply(upserts=[up("odd", **odd), up("plain", colour="red")])
    for key, value in odd.items():
        assert matching_ids(store, Filters({key: value})) == {"odd"}
        assert matching_ids(store, Filters({key: value + "x"})) == set()
    assert matching_ids(store, Filters({"colour": "red' OR 1=1 --"})) == set()
    assert matching_ids(store, Filters({"colour": "red"})) == {"plain"}


def test_numbers_no_float_holds_match_nothing(store: SqliteStore) -> None:
    store.apply(upserts=[up("a", n=1), up("b", n=True)])
    assert matching_ids(store, Filters({"n": 10**400})) == set()
    assert matching_ids(store, Filters({"n": float("inf")})) == set()
    assert matching_ids(store, Filters({"n": 1})) == {"a", "b"}  # true hashes as 1: the exact check decides


# -- following writes -----------------------------------------------------------------------------------------


def test_tags_follow_updates_replacements_deletes_and_failures(store: SqliteStore) -> None:
    store.apply(upserts=[up("a", colour="red"), up("b", colour="red")])
    store.apply(upserts=[Upsert("a", "kafka", "https://x/a", "sha-a", {"colour": "blue"}, None)])  # metadata only
    assert matching_ids(store, Filters({"colour": "red"})) == {"b"}
    assert matching_ids(store, Filters({"colour": "blue"})) == {"a"}
    store.apply(upserts=[up("b", vec(7), sha="sha-b2", colour="green")])  # a new vector
    assert matching_ids(store, Filters({"colour": "red"})) == set()
    assert matching_ids(store, Filters({"colour": "green"})) == {"b"}
    store.apply(failures=[Failure("kafka", "{}", "broken", id="b")])  # the older good vector stays
    assert matching_ids(store, Filters({"colour": "green"})) == {"b"}
    store.apply(deletes=[Delete("a"), Delete("b")])
    assert matching_ids(store, Filters(source="kafka")) == set()
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT COUNT(*) FROM item_tags").fetchone()[0] == 0
    db.close()


def test_a_version_1_store_gains_its_tags_when_opened(tmp_path: Path) -> None:
    blue = "INSERT INTO items VALUES ('c', 'kafka', 'u', 'sha-c', '{\"colour\": \"blue\"}', 'indexed', NULL, NULL, "
    blue += "2, 1, 1);"
    blue += "INSERT INTO vectors VALUES (2, 'c', 'sha-c', zeroblob(32), 0, 2, 1.0);"
    path = make_store(tmp_path / "db.sqlite3", 1, blue)  # what version 1 wrote: no tags
    with SqliteStore(path) as store:
        assert matching_ids(store, Filters({"colour": "red"})) == {"folder:a.jpg"}
        assert matching_ids(store, Filters({"colour": "blue"})) == {"c"}
        assert store._meta("schema_version") == str(SCHEMA_VERSION)


def test_an_item_whose_metadata_holds_minus_zero_is_found_by_a_filter_on_zero_after_the_migration(
    tmp_path: Path,
) -> None:
    old_tag = tags.tag(["meta", "z", ["n", -0.0]])  # how versions 2 and 3 tagged -0.0: apart from 0
    rows = "INSERT INTO items(id, source, uri, sha256, metadata, status, version, vector_id, created_at, updated_at) "
    rows += "VALUES ('m', 'kafka', 'u', 'sha-m', '{\"z\": -0.0}', 'indexed', NULL, 2, 1, 1);"
    rows += "INSERT INTO vectors VALUES (2, 'm', 'sha-m', zeroblob(32), 0, 2, 1.0);"
    rows += f"INSERT INTO item_tags VALUES ({tags.source_tag('kafka')}, 2), ({old_tag}, 2);"
    with SqliteStore(make_store(tmp_path / "db.sqlite3", 3, rows)) as store:
        assert matching_ids(store, Filters({"z": 0})) == matching_ids(store, Filters({"z": -0.0})) == {"m"}
        assert matching_ids(store, Filters({"colour": "red"})) == {"folder:a.jpg"}  # the others kept theirs


def test_a_newer_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    SqliteStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(Exception, match="schema version 99"):
        SqliteStore(path)


# -- a superset of what passes, whatever the values --------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
)
values = st.one_of(scalars, st.lists(scalars, max_size=2), st.dictionaries(st.text(max_size=2), scalars, max_size=2))
keys = st.sampled_from(["a", "b", "", "x'y", "é"])


@settings(max_examples=400, deadline=None, database=None)
@given(
    st.dictionaries(keys, values, max_size=4),
    st.dictionaries(keys, scalars, max_size=3),
    st.sampled_from(["kafka", "folder"]),
    st.sampled_from([None, "kafka", "folder"]),
)
@example({"a": 0}, {"a": -0.0}, "kafka", None)  # found by this test: -0.0 == 0, once tagged apart
@example({"a": -0.0}, {"a": 0}, "kafka", None)
def test_every_item_that_passes_holds_every_tag_of_the_filter(
    metadata: dict[str, Any], wanted: dict[str, Any], source: str, wanted_source: str | None
) -> None:
    item = _item(source, json.loads(json.dumps(metadata)))  # as stored: through JSON
    filters = Filters(wanted, wanted_source)
    if filters.matches(item):
        assert set(tags.filter_tags(filters)) <= set(tags.item_tags(item.source, item.metadata))


def _item(source: str, metadata: dict[str, Any]) -> Item:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    return Item("i", source, "u", None, metadata, "indexed", None, None, 1, now, now)
