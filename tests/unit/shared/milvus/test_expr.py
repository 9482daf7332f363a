"""Milvus expressions: no id, key or value from a stranger reaches Milvus's parser, and filters mean there
exactly what `Filters.matches` means (fuzzed: pure checks, then the same filters on a real milvus-lite)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.milvus import expr as ex
from shared.roles import Delete, Upsert
from shared.stores import ReadSide, WriteSide, open_reader, open_writer
from shared.types import Filters, ModelIdentity, same_value
from tests.conftest import milvus_settings_for

HOSTILE = ['"', "'", "\\", '" or 1==1 or "', "] or key in [", "\n", "\x00", "é", "😀", "like '%'", "$meta", "{x}"]
texts = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=12))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
)
metadata = st.dictionaries(st.sampled_from(["a", "b", '"k"', "k\\", "é"]) | texts, scalars, max_size=4)


# -- pure: what an expression can contain --------------------------------------------------------------------


@given(filters=metadata, source=st.none() | texts, exclude=st.lists(texts, max_size=3))
@settings(max_examples=300, deadline=None)
def test_a_search_expression_holds_no_text_from_the_query(
    filters: dict[str, Any], source: str | None, exclude: list[str]
) -> None:
    built = ex.search_expr(Filters(metadata=filters, source=source), [ex.item_key(i) for i in exclude])
    assert ex.checked(built) == built  # only the tokens this module writes
    for text in [*filters, *(v for v in filters.values() if isinstance(v, str)), *exclude]:
        if len(text) > 2 and not text.isalnum():
            assert text not in built


@pytest.mark.parametrize(
    "injected",
    [
        'status == "indexed" or "a" == "a"',
        'key in ["x"] or key in ["y"]',
        'status == "indexed" and item_id like "%"',
        "metadata[\"k\"] == 'v'",
        'key == "0123456789abcdef0123456789abcdeg"',
        "status == 'indexed'",
    ],
)
def test_checked_refuses_anything_this_module_does_not_write(injected: str) -> None:
    with pytest.raises(AssertionError, match="not an expression clipdex writes"):
        ex.checked(injected)


def test_deletes_name_versions_as_numbers() -> None:
    built = ex.deletes_expr([(ex.item_key("a"), None), (ex.item_key('b" or "'), 3)])
    assert built.count("version <= 3") == 1 and ex.checked(built) == built


json_scalars = st.one_of(
    st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.text(max_size=4)
)


@given(a=json_scalars, b=json_scalars)
@settings(max_examples=500)
def test_equal_values_hash_equal_and_unequal_ones_do_not(a: Any, b: Any) -> None:
    """The tags stand for `same_value`: a filter finds exactly what the exact check keeps."""
    assert (ex._canonical(a) == ex._canonical(b)) == same_value(a, b)


@pytest.mark.parametrize(("a", "b"), [(1, 1.0), (0, -0.0), (2**53, 2.0**53), (True, True), ("1", "1")])
def test_json_equality_examples(a: Any, b: Any) -> None:
    assert same_value(a, b) and ex._canonical(a) == ex._canonical(b)


@pytest.mark.parametrize(
    ("a", "b"), [(True, 1), (False, 0), ("1", 1), (2**53 + 1, 2.0**53), (1.5, 1), (math.inf, 2**1023)]
)
def test_json_inequality_examples(a: Any, b: Any) -> None:
    assert not same_value(a, b) and ex._canonical(a) != ex._canonical(b)


# -- on a real milvus-lite: hostile ids, keys and values round trip, and filter exactly ------------------------

DIM = 8
MODEL = ModelIdentity("clipdex-fuzz", "none", DIM, "f" * 64)


@pytest.fixture(scope="module")
def sides(milvus_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WriteSide, ReadSide]]:
    settings_ = milvus_settings_for(tmp_path_factory.mktemp("fuzz"), milvus_uri)
    with open_writer(settings_, MODEL) as writer, open_reader(settings_, MODEL) as reader:
        yield writer, reader


counter = iter(range(10**9))


@given(items=st.lists(st.tuples(texts, metadata), min_size=1, max_size=6), wanted=metadata, source=st.none() | texts)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_filters_on_milvus_find_exactly_what_the_exact_check_keeps(
    sides: tuple[WriteSide, ReadSide],
    items: list[tuple[str, dict[str, Any]]],
    wanted: dict[str, Any],
    source: str | None,
) -> None:
    writer, reader = sides
    run = next(counter)
    rng = np.random.default_rng(run)
    vectors = rng.standard_normal((len(items), DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ups = [
        Upsert(f"{run}/{raw}#{n}", "kafka" if n % 2 else raw, f"u{n}", f"sha-{run}-{n}", meta, vectors[n])
        for n, (raw, meta) in enumerate(items)
    ]
    writer.writer.apply(upserts=ups)
    try:
        for up in ups:
            got = writer.catalog.get_item(up.id)
            assert got is not None and (got.id, got.source, got.metadata) == (up.id, up.source, up.metadata)
        filters = Filters(metadata=wanted, source=source)
        mine = {u.id for u in ups}
        expected = {u.id for u in ups if filters.matches_values(u.source, u.metadata)}
        hits = reader.vectors.search(vectors[0], 100, filters).hits
        assert {h.id for h in hits if h.id in mine} == expected
        excluded = reader.vectors.search(vectors[0], 100, exclude={ups[0].id}).hits
        assert ups[0].id not in {h.id for h in excluded}
    finally:
        writer.writer.apply(deletes=[Delete(u.id) for u in ups])
    assert writer.writer.states([u.id for u in ups]) == {}


def test_a_hostile_id_is_stored_and_deleted_as_itself_alone(sides: tuple[WriteSide, ReadSide], tmp_path: Path) -> None:
    writer, _ = sides
    ids = ['x" or key != "', "x", "x'", "x\\", 'x"]', "x\n"]
    vec = np.ones(DIM, np.float32) / math.sqrt(DIM)
    writer.writer.apply(upserts=[Upsert(i, "kafka", "u", f"sha{n}", {}, vec) for n, i in enumerate(ids)])
    writer.writer.apply(deletes=[Delete(ids[0])])
    assert sorted(writer.writer.states(ids)) == sorted(ids[1:])
    writer.writer.apply(deletes=[Delete(i) for i in ids[1:]])
