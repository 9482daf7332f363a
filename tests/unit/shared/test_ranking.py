"""From ranked candidates to a page: the relative cutoff, copies folded, the order, the page after a place."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import ranking
from shared.query import Collapse, Place
from shared.types import Hit, image_id


def hit(item_id: str, score: float, sha: str | None = None, **metadata: object) -> Hit:
    return Hit(item_id, f"u/{item_id}", score, dict(metadata), sha256=sha or f"sha-{item_id}")


def ids(hits: list[Hit]) -> list[str]:
    return [h.id for h in hits]


def test_the_relative_cutoff_is_measured_from_the_best_hit() -> None:
    hits = [hit("a", 0.9), hit("b", 0.85), hit("c", 0.8), hit("d", 0.5)]
    assert ranking.drop_tail(hits, 0.1) == (hits[:3], True)
    assert ranking.drop_tail(hits, 0.5) == (hits, False)
    assert ranking.drop_tail(hits, 0.0) == (hits[:1], True)
    assert ranking.drop_tail(hits, None) == (hits, False)
    assert ranking.drop_tail([], 0.1) == ([], False)


def test_copies_of_one_file_fold_into_the_best_ranked_one() -> None:
    hits = [hit("a", 0.9, "x"), hit("b", 0.8), hit("c", 0.7, "x"), hit("d", 0.6, "x"), hit("e", 0.5, None)]
    hits[4] = Hit("e", "u/e", 0.5, {}, sha256=None)
    folded = ranking.collapse(hits, Collapse.HASH)
    assert ids(folded) == ["a", "b", "e"]
    assert folded[0].duplicates == ("c", "d") and folded[0].score == 0.9 and folded[1].duplicates == ()
    assert ranking.collapse(hits, Collapse.NONE) == hits


def test_near_copies_fold_by_cosine_without_chaining() -> None:
    base = np.eye(4, dtype=np.float32)
    close = (0.99 * base[0] + np.sqrt(1 - 0.99**2) * base[1]).astype(np.float32)  # 0.99 to a
    between = (0.96 * base[0] + np.sqrt(1 - 0.96**2) * base[1]).astype(np.float32)  # 0.96 to a, 0.99 to close
    vectors = np.stack([base[0], close, between, base[2], base[2]])
    hits = [
        hit("a", 0.9),
        hit("close", 0.8),
        hit("between", 0.7),
        hit("other", 0.6, "o"),
        hit("copy-of-other", 0.5, "o"),
    ]
    folded = ranking.collapse(hits, Collapse.NEAR, vectors, near=0.97)
    assert ids(folded) == ["a", "between", "other"]  # "between" is near "close", which is not a leader
    assert folded[0].duplicates == ("close",) and folded[2].duplicates == ("copy-of-other",)


def test_a_hash_copy_follows_its_leader_into_a_near_group() -> None:
    v = np.array([[1, 0], [1, 0], [1, 0]], dtype=np.float32)
    hits = [hit("a", 0.9), hit("b", 0.8, "s"), hit("c", 0.7, "s")]
    folded = ranking.collapse(hits, Collapse.NEAR, v, near=0.97)
    assert ids(folded) == ["a"] and folded[0].duplicates == ("b", "c")


def test_parent_folds_a_products_images_into_its_best_one_and_other_items_by_hash() -> None:
    shoe = [image_id("kafka:A-1", f"https://cdn/a-{n}.jpg") for n in range(3)]
    boot = image_id("kafka:B-2", "https://cdn/b.jpg")
    hits = [
        hit(shoe[1], 0.9, "s1", parent="A-1"),
        hit("kafka:loose", 0.85, "x"),
        hit(boot, 0.8, "placeholder", parent="B-2"),
        hit(shoe[0], 0.7, "placeholder", parent="A-1"),  # the same picture as B-2's: still A-1's image
        hit("kafka:loose-copy", 0.6, "x"),
        hit(shoe[2], 0.5, "s3", parent="A-1"),
        hit("kafka:A-1", 0.4, "s9"),  # the product's id itself is no image of it
    ]
    folded = ranking.collapse(hits, Collapse.PARENT)
    assert ids(folded) == [shoe[1], "kafka:loose", boot, "kafka:A-1"]
    assert folded[0].duplicates == (shoe[0], shoe[2]) and folded[0].score == 0.9
    assert folded[1].duplicates == ("kafka:loose-copy",) and folded[2].duplicates == ()
    by_hash = ranking.collapse(hits, Collapse.HASH)  # by hash, A-1's images show apart; one joins B-2's
    assert ids(by_hash) == [shoe[1], "kafka:loose", boot, shoe[2], "kafka:A-1"]


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3)), min_size=1, max_size=30), st.integers(1, 30))
def test_folding_a_prefix_is_a_prefix_of_folding_all(rows: list[tuple[int, int]], cut: int) -> None:
    """What pages rely on: reading deeper never regroups what was already shown."""
    # d: the direction of the hit's vector (`near`), and its product (`parent`; 3: none)
    hits = [
        hit(image_id(f"p{d}", f"u{n}") if d < 3 else f"i{n}", 1 - n / 100, f"h{h}") for n, (h, d) in enumerate(rows)
    ]
    vectors = np.stack([np.eye(4, dtype=np.float32)[d] for _, d in rows])
    for mode in (Collapse.HASH, Collapse.NEAR, Collapse.PARENT):
        whole = ranking.collapse(hits, mode, vectors, near=0.97)
        part = ranking.collapse(hits[:cut], mode, vectors[:cut], near=0.97)
        assert ids(part) == ids(whole)[: len(part)]
        shown = {i for h in whole for i in (h.id, *h.duplicates)}
        assert shown == {h.id for h in hits}  # every hit is shown once, as a hit or a duplicate


def test_pages_after_a_place_never_overlap_and_concatenate() -> None:
    hits = ranking.order([hit(f"i{n}", round(1 - (n // 3) / 10, 3), year=n % 4) for n in range(20)], "year", True)
    shown: list[str] = []
    after = None
    while True:
        page, before = ranking.page_after(hits, after, 6, "year", True)
        assert before == len(shown)
        if not page:
            break
        shown += ids(page)
        after = Place.of(page[-1], "year")
    assert shown == ids(hits)
