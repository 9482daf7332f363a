"""A search request: the maths of weighted terms, the result order, and cursors a stranger may tamper with."""

from __future__ import annotations

import base64
import json
from functools import cmp_to_key

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import InvalidRequest
from shared.query import (
    MAX_CURSOR_CHARS,
    Collapse,
    Cursor,
    ItemTerm,
    Place,
    SearchOptions,
    TextTerm,
    check_terms,
    combine,
    compare,
    fingerprint,
)
from shared.types import Filters, Hit


def unit(seed: int, dim: int = 16) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(dim)
    return (x / np.linalg.norm(x)).astype(np.float32)


# -- the maths ----------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(st.floats(min_value=-3, max_value=3).filter(lambda w: abs(w) > 0.05), min_size=1, max_size=5))
def test_the_score_ranks_by_the_weighted_sum_of_each_terms_cosine(weights: list[float]) -> None:
    terms = [unit(i) * (i + 2) for i in range(len(weights))]  # not unit: each term is normalised first
    items = np.stack([unit(100 + i) for i in range(30)])
    total = sum(w * t / np.linalg.norm(t) for w, t in zip(weights, terms, strict=True))
    if np.linalg.norm(total) < 1e-3:
        return
    q = combine(weights, terms)
    assert np.linalg.norm(q) == pytest.approx(1.0, abs=1e-5)
    weighted = sum(w * (items @ (t / np.linalg.norm(t))) for w, t in zip(weights, terms, strict=True))
    np.testing.assert_allclose(items @ q, weighted / np.linalg.norm(total), atol=1e-4)


def test_terms_that_cancel_out_are_refused() -> None:
    v = unit(1)
    with pytest.raises(InvalidRequest, match="cancel"):
        combine([1.0, -1.0], [v, 2 * v])


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([], "at least one term"),
        ([-1.0], "negative weight"),
        ([-1.0, -0.5], "negative weight"),
        ([0.0], "non-zero"),
        ([float("nan")], "non-zero"),
        ([float("inf")], "non-zero"),
        ([True], "non-zero"),
        ([1e9], "between"),
        ([1.0] * 17, "at most 16"),
    ],
)
def test_weights_are_checked(weights: list[float], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        check_terms([TextTerm("x", w) for w in weights])


# -- the result order ---------------------------------------------------------------------------------------


def hit(item_id: str, score: float, **metadata: object) -> Hit:
    return Hit(item_id, f"u/{item_id}", score, dict(metadata))


def in_order(hits: list[Hit], key: str | None, descending: bool) -> list[str]:
    places = {h.id: Place.of(h, key) for h in hits}
    ordered = sorted(hits, key=cmp_to_key(lambda a, b: compare(places[a.id], places[b.id], descending)))
    return [h.id for h in ordered]


def test_by_score_then_id_at_the_shown_precision() -> None:
    hits = [hit("b", 0.5), hit("a", 0.5000000001), hit("c", 0.9), hit("d", 0.1)]
    assert in_order(hits, None, True) == ["c", "a", "b", "d"]  # 0.5 and 0.5000000001 tie: id decides


def test_by_a_metadata_value_numbers_before_text_missing_last_either_way() -> None:
    hits = [
        hit("n1", 0.9, year=2021),
        hit("n2", 0.5, year=2023),
        hit("n3", 0.7, year=2023.0),
        hit("s", 0.8, year="2022"),
        hit("none", 0.99),
        hit("null", 0.98, year=None),
        hit("list", 0.97, year=[2020]),
        hit("t", 0.6, year=True),
    ]
    assert in_order(hits, "year", False) == ["t", "n1", "n3", "n2", "s", "none", "null", "list"]
    assert in_order(hits, "year", True) == ["s", "n3", "n2", "n1", "t", "none", "null", "list"]


# -- cursors ------------------------------------------------------------------------------------------------

FP = fingerprint([TextTerm("a red circle")], SearchOptions())


def test_a_cursor_round_trips() -> None:
    for place in (Place(0.5, "kafka:x"), Place(0.25, "folder:é/ü.jpg", "2021-01-01", True), Place(-1.0, "", 3, True)):
        cursor = Cursor(FP, 20, place)
        text = cursor.encode()
        assert text.isascii() and "=" not in text
        assert Cursor.decode(text, FP) == cursor


def test_a_cursor_belongs_to_one_search() -> None:
    text = Cursor(FP, 10, Place(0.5, "x")).encode()
    others = [
        fingerprint([TextTerm("a blue circle")], SearchOptions()),
        fingerprint([TextTerm("a red circle", 0.5)], SearchOptions()),
        fingerprint([TextTerm("a red circle"), ItemTerm("x", -1)], SearchOptions()),
        fingerprint([TextTerm("a red circle")], SearchOptions(filters=Filters({"k": "v"}))),
        fingerprint([TextTerm("a red circle")], SearchOptions(collapse=Collapse.NONE)),
        fingerprint([TextTerm("a red circle")], SearchOptions(max_drop=0.1)),
        fingerprint([TextTerm("a red circle")], SearchOptions(sort_by="metadata.year")),
    ]
    assert len(set(others)) == len(others) and FP not in others
    assert fingerprint([TextTerm("a red circle")], SearchOptions(top_k=50)) == FP  # pages may change size
    for other in others:
        with pytest.raises(InvalidRequest, match="belongs to another search"):
            Cursor.decode(text, other)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not base64!",
        "x" * (MAX_CURSOR_CHARS + 1),
        _b64(b"\xff\xfe"),
        _b64(b"[1, 2]"),
        _b64(b"[" * 100_000),
        _b64(json.dumps({"v": 2, "f": FP, "o": 1, "s": 0.5, "i": "x"}).encode()),
        _b64(json.dumps({"v": 1, "f": FP, "o": 0, "s": 0.5, "i": "x"}).encode()),
        _b64(json.dumps({"v": 1, "f": FP, "o": 1000, "s": 0.5, "i": "x"}).encode()),
        _b64(json.dumps({"v": 1, "f": FP, "o": True, "s": 0.5, "i": "x"}).encode()),
        _b64(json.dumps({"v": 1, "f": FP, "o": 5, "s": "0.5", "i": "x"}).encode()),
        _b64(json.dumps({"v": 1, "f": FP, "o": 5, "s": float("nan"), "i": "x"}).encode()),
        _b64(json.dumps({"v": 1, "f": FP, "o": 5, "s": 0.5, "i": 7}).encode()),
        _b64(b'{"v": 1, "f": "' + FP.encode() + b'", "o": 5, "s": 1e999, "i": "x"}'),
    ],
)
def test_a_tampered_cursor_is_an_invalid_request(text: str) -> None:
    with pytest.raises(InvalidRequest, match="not one this server gave out"):
        Cursor.decode(text, FP)


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(max_size=200))
def test_any_text_as_a_cursor_is_refused_in_words(text: str) -> None:
    with pytest.raises(InvalidRequest):
        Cursor.decode(text, FP)


# -- options -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (SearchOptions(top_k=0), "top_k"),
        (SearchOptions(top_k=101), "top_k"),
        (SearchOptions(min_score=1.5), "min_score"),
        (SearchOptions(max_drop=-0.1), "max_drop"),
        (SearchOptions(max_drop=3), "max_drop"),
        (SearchOptions(collapse="fuzzy"), "collapse"),  # type: ignore[arg-type]
        (SearchOptions(order="up"), "order"),  # type: ignore[arg-type]
        (SearchOptions(sort_by="year"), "sort_by"),
        (SearchOptions(sort_by="metadata."), "sort_by"),
    ],
)
def test_options_are_checked(options: SearchOptions, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        options.check()


def test_sort_by_names_a_metadata_key_or_the_score() -> None:
    assert SearchOptions(sort_by="metadata.year").sort_key == "year"
    assert SearchOptions(sort_by="metadata.a.b").sort_key == "a.b"  # a top-level key with a dot in it
    assert SearchOptions(sort_by="score").sort_key is None
    assert SearchOptions().sort_key is None
