"""SearchService on a real store with the tiny model, on each backend (`store_settings`: SQLite with its
FAISS index, then Milvus): filters, min_score, top_k, find-similar, deletes and replacements; weighted
terms, pages, copies collapsed and sorting, checked against brute force."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import shared.milvus.search as milvus_search
import shared.sqlite.search as search_module
from indexer.compaction import compact
from shared import ranking
from shared.config import Settings
from shared.embedder import Embedder
from shared.errors import InvalidRequest, NotFound
from shared.query import MAX_DEPTH, Collapse, ItemTerm, SearchOptions, Term, TextTerm, combine
from shared.roles import Delete, Failure, Upsert
from shared.search import MAX_QUERY_CHARS, SearchService, cap_query
from shared.sqlite.index import IndexParams
from shared.stores import open_reader, open_writer
from shared.types import Filters, Hit, image_id

DIM = 32
PARAMS = IndexParams("flat", 200_000, None, None, 16, 64, 10**6, 1e9)


def unit(seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return x / np.linalg.norm(x)


def towards(target: np.ndarray, cos: float, seed: int) -> np.ndarray:
    """A unit vector whose cosine with `target` is exactly `cos`."""
    other = unit(seed)
    other -= (other @ target) * target
    other /= np.linalg.norm(other)
    return (cos * target + np.sqrt(1 - cos**2) * other).astype(np.float32)


class World:
    """A store opened as an indexer and as a search process would open it."""

    def __init__(self, settings: Settings, embedder: Embedder) -> None:
        self.settings = settings
        self.writer_side = open_writer(settings, embedder.identity)
        self.reader = open_reader(settings, embedder.identity)
        self.store = self.writer_side.writer
        self.vectors = self.reader.vectors
        self.search = SearchService(self.vectors, self.reader.catalog, embedder)

    def add(self, item_id: str, vector: np.ndarray, source: str = "kafka", **metadata: Any) -> None:
        self.store.apply(upserts=[Upsert(item_id, source, f"https://x/{item_id}", f"sha-{item_id}", metadata, vector)])

    def refresh(self) -> None:
        self.vectors.refresh()

    def close(self) -> None:
        self.reader.close()
        self.writer_side.close()


@pytest.fixture
def world(store_settings: Settings, tiny_embedder: Embedder) -> Iterator[World]:
    w = World(store_settings, tiny_embedder)
    yield w
    w.close()


QUERY = unit(1000)


@pytest.fixture
def ranked(world: World) -> World:
    """item-0 .. item-19 with cosines 0.95, 0.90, ... to QUERY; even ones are red, every third from the folder."""
    for i in range(20):
        colour = "red" if i % 2 == 0 else "blue"
        source = "folder" if i % 3 == 0 else "kafka"
        world.add(f"item-{i}", towards(QUERY, 0.95 - 0.05 * i, seed=i), source=source, colour=colour, rank=i)
    world.refresh()
    return world


def ids(hits: Any) -> list[str]:
    return [h.id for h in hits]


# -- ranking, filters, min_score --------------------------------------------------------------------------------


def test_hits_are_best_first_with_their_uri_score_and_metadata(ranked: World) -> None:
    hits = ranked.search.search_vector(QUERY, 3)
    assert ids(hits) == ["item-0", "item-1", "item-2"]
    assert hits[0].uri == "https://x/item-0" and hits[0].metadata == {"colour": "red", "rank": 0}
    np.testing.assert_allclose([h.score for h in hits], [0.95, 0.90, 0.85], atol=1e-5)


def test_metadata_filters_are_equality_on_every_key(ranked: World) -> None:
    red = ranked.search.search_vector(QUERY, 5, Filters(metadata={"colour": "red"}))
    assert ids(red) == ["item-0", "item-2", "item-4", "item-6", "item-8"]
    assert ids(ranked.search.search_vector(QUERY, 5, Filters(metadata={"colour": "red", "rank": 4}))) == ["item-4"]
    assert ranked.search.search_vector(QUERY, 5, Filters(metadata={"colour": "green"})) == []
    assert ranked.search.search_vector(QUERY, 5, Filters(metadata={"missing-key": None})) != []  # absent == None


def test_the_source_filter(ranked: World) -> None:
    hits = ranked.search.search_vector(QUERY, 10, Filters(source="folder"))
    assert ids(hits) == ["item-0", "item-3", "item-6", "item-9", "item-12", "item-15", "item-18"]
    both = ranked.search.search_vector(QUERY, 10, Filters(metadata={"colour": "blue"}, source="folder"))
    assert ids(both) == ["item-3", "item-9", "item-15"]


def test_a_selective_filter_still_finds_top_k_far_down_the_ranking(world: World) -> None:
    world.store.apply(
        upserts=[
            Upsert(f"n{i}", "kafka", f"https://x/n{i}", f"sha-n{i}", {"tag": "rare" if i >= 280 else "common"}, v)
            for i, v in ((i, towards(QUERY, 0.99 - 0.003 * i, seed=i)) for i in range(300))
        ]
    )
    world.refresh()
    hits = world.search.search_vector(QUERY, 10, Filters(metadata={"tag": "rare"}))
    assert ids(hits) == [f"n{i}" for i in range(280, 290)]


def test_min_score_cuts_the_list(ranked: World) -> None:
    hits = ranked.search.search_vector(QUERY, 10, min_score=0.8)
    assert ids(hits) == ["item-0", "item-1", "item-2", "item-3"]
    assert ranked.search.search_vector(QUERY, 10, min_score=0.99) == []
    red = ranked.search.search_vector(QUERY, 10, Filters(metadata={"colour": "red"}), min_score=0.72)
    assert ids(red) == ["item-0", "item-2", "item-4"]


@pytest.mark.parametrize("top_k", [0, -1, 101, 10_000])
def test_top_k_out_of_range_is_an_invalid_request(ranked: World, top_k: int) -> None:
    with pytest.raises(InvalidRequest, match="from 1 to 100"):
        ranked.search.search_text("a cat", top_k=top_k)
    with pytest.raises(InvalidRequest):
        ranked.search.similar_to_item("item-0", top_k=top_k)
    with pytest.raises(InvalidRequest):
        ranked.search.search_image(Image.new("RGB", (8, 8)), top_k=top_k)


def test_top_k_bounds_are_inclusive(ranked: World) -> None:
    assert len(ranked.search.search_text("a cat", top_k=1).hits) == 1
    assert len(ranked.search.search_text("a cat", top_k=100).hits) == 20


@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_an_empty_query_is_an_invalid_request(ranked: World, query: str) -> None:
    with pytest.raises(InvalidRequest, match="empty"):
        ranked.search.search_text(query)


# -- text and image queries -----------------------------------------------------------------------------------------


def test_text_search_finds_the_item_stored_with_that_texts_vector(world: World, tiny_embedder: Embedder) -> None:
    captions = ["a red bicycle", "a sleeping cat", "the sea at night"]
    for caption in captions:
        world.add(caption.replace(" ", "-"), tiny_embedder.encode_texts([caption])[0].vector)
    world.refresh()
    result = world.search.search_text("  a sleeping cat ", top_k=1)  # surrounding blanks do not matter
    assert ids(result.hits) == ["a-sleeping-cat"] and result.hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert result.query_truncated is False
    assert world.search.search_text(" ".join(["cat"] * 100)).query_truncated is True
    assert (result.index.items, result.index.vectors, result.index.generation) == (3, 3, 0)


class RecordingEmbedder:
    """The tiny model, noting every text it is asked to encode (and so every key of its query cache)."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.texts: list[str] = []

    def encode_text(self, text: str) -> Any:
        self.texts.append(text)
        return self.inner.encode_text(text)


def test_a_huge_query_is_cut_before_tokenising_flagged_and_cached_cut(world: World, tiny_embedder: Embedder) -> None:
    """Issue 9: a 0.9 MB query took 3 s per tokenisation and stayed in the query cache."""
    world.add("bike", tiny_embedder.encode_texts(["a red bicycle"])[0].vector)
    world.refresh()
    model = RecordingEmbedder(tiny_embedder)
    search = SearchService(world.vectors, world.reader.catalog, model, max_query_chars=MAX_QUERY_CHARS)  # type: ignore[arg-type]
    huge = "a red bicycle " * 75_000  # 1 MB
    result = search.search_text(huge, top_k=1)
    assert result.query_truncated is True and ids(result.hits) == ["bike"]
    (text,) = model.texts
    assert len(text) <= MAX_QUERY_CHARS and huge.startswith(text)  # the cache key is the cut text
    assert search.search_text(huge[: MAX_QUERY_CHARS + 1]).query_truncated is True


def test_runs_of_whitespace_count_once_against_the_cap(world: World, tiny_embedder: Embedder) -> None:
    model = RecordingEmbedder(tiny_embedder)
    search = SearchService(world.vectors, world.reader.catalog, model, max_query_chars=20)  # type: ignore[arg-type]
    result = search.search_text("  a red\n\n" + " " * 5000 + "\tbicycle  ")
    assert result.query_truncated is False and model.texts == ["a red bicycle"]  # what the tokenizer sees anyway
    assert search.search_text("x" * 20).query_truncated is False
    assert search.search_text("x" * 21).query_truncated is True and model.texts[-1] == "x" * 20


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.lists(st.sampled_from(["a", "bc", " ", "\n\t", " " * 100, "\u3000", "é" * 7]), max_size=200),
    st.integers(min_value=1, max_value=40),
)
def test_the_cap_reads_a_prefix_and_cuts_exactly_as_the_whole_query_would(parts: list[str], cap: int) -> None:
    query = "".join(parts)
    collapsed = " ".join(query.split())
    expected = (collapsed[:cap].rstrip(), True) if len(collapsed) > cap else (collapsed, False)
    assert cap_query(query, cap) == expected


def test_image_search_finds_the_same_image(world: World, tiny_embedder: Embedder) -> None:
    images = [Image.new("RGB", (40, 30), colour) for colour in ("red", "green", "blue")]
    for n, img in enumerate(images):
        world.add(f"img-{n}", tiny_embedder.encode_images([img])[0])
    world.refresh()
    hits = world.search.search_image(images[2], top_k=1).hits
    assert ids(hits) == ["img-2"] and hits[0].score == pytest.approx(1.0, abs=1e-5)


# -- find similar to a stored item ------------------------------------------------------------------------------------


class NoModel:
    """Stands in for the embedder: any model call fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"similar_to_item called the model ({name})")


def test_similar_to_item_excludes_itself_and_makes_no_model_call(ranked: World) -> None:
    service = SearchService(ranked.vectors, ranked.reader.catalog, NoModel())  # type: ignore[arg-type]
    hits = service.similar_to_item("item-0", top_k=3).hits
    assert "item-0" not in ids(hits) and len(hits) == 3
    stored = ranked.vectors.item_vector("item-0")
    assert stored is not None
    want = sorted(
        (f"item-{i}" for i in range(1, 20)),
        key=lambda item: -float(ranked.vectors.item_vector(item) @ stored),  # type: ignore[operator]
    )
    assert ids(hits) == want[:3]


def test_similar_to_item_with_filters_and_a_full_page(ranked: World) -> None:
    hits = ranked.search.similar_to_item("item-0", top_k=19).hits
    assert len(hits) == 19 and "item-0" not in ids(hits)
    red = ranked.search.similar_to_item("item-0", top_k=5, filters=Filters(metadata={"colour": "red"})).hits
    assert len(red) == 5 and all(h.metadata["colour"] == "red" and h.id != "item-0" for h in red)


def test_an_unknown_item_is_not_found(ranked: World) -> None:
    with pytest.raises(NotFound, match="no item with id 'nope'"):
        ranked.search.similar_to_item("nope")


def test_a_failed_item_without_a_vector_is_not_found_with_the_reason(ranked: World) -> None:
    ranked.store.apply(failures=[Failure("kafka", "raw", "ImageRejected: truncated", id="broken")])
    with pytest.raises(NotFound, match=r"has no vector.*truncated"):
        ranked.search.similar_to_item("broken")


# -- deletes and replacements -----------------------------------------------------------------------------------------


def test_a_deleted_item_is_never_returned_even_before_the_index_refreshes(ranked: World) -> None:
    ranked.store.apply(deletes=[Delete("item-0"), Delete("item-2")])
    hits = ranked.search.search_vector(QUERY, 5)  # the index still holds both vectors
    assert ids(hits) == ["item-1", "item-3", "item-4", "item-5", "item-6"]
    assert "item-0" not in ids(ranked.search.similar_to_item("item-1", top_k=100).hits)


def test_a_replaced_item_appears_once_with_its_new_vector(ranked: World) -> None:
    ranked.add("item-19", towards(QUERY, 0.99, seed=99), colour="gold")  # was the worst match, now the best
    before = ranked.search.search_vector(QUERY, 20)
    # never the old vector: SQLite has dropped it and not yet loaded the new one; Milvus has the new one
    assert all(h.metadata == {"colour": "gold"} for h in before if h.id == "item-19")
    ranked.refresh()
    hits = ranked.search.search_vector(QUERY, 20)
    assert ids(hits)[0] == "item-19" and ids(hits).count("item-19") == 1 and hits[0].metadata == {"colour": "gold"}


def test_results_are_the_same_after_compaction(ranked: World) -> None:
    if ranked.writer_side.compaction is None:
        pytest.skip("Milvus compacts its segments by itself")
    before = ranked.search.search_vector(QUERY, 10)
    (ledger,) = ranked.writer_side.compaction.ledgers()
    compact(ledger, PARAMS, ledger.dim, ledger.index_dir)
    ranked.refresh()
    after = ranked.search.search_vector(QUERY, 10)
    assert ids(after) == ids(before)
    info = ranked.search.info()
    assert (info.generation, info.delta_size, info.vectors, info.items) == (1, 0, 20, 20)
    assert info.newest_indexed_at is not None


# -- weighted terms, pages, copies, order ----------------------------------------------------------------------


def all_pages(service: SearchService, terms: list[Term], options: SearchOptions, sizes: list[int]) -> list[Hit]:
    """Every page, following next_cursor, with page sizes taken in turn from `sizes`."""
    shown: list[Hit] = []
    cursor = None
    for n in range(2000):
        result = service.search(terms, replace(options, top_k=sizes[n % len(sizes)], cursor=cursor))
        shown += result.hits
        cursor = result.next_cursor
        if cursor is None:
            return shown
    raise AssertionError("pages never ended")


def oracle(world: World, query: np.ndarray, options: SearchOptions) -> list[Hit]:
    """The whole ordered result, from every stored item, by brute force."""
    hits = []
    for item in world.reader.catalog.items():
        stored = world.vectors.item_vector(item.id)
        assert stored is not None
        if options.filters is None or options.filters.matches(item):
            hits.append(Hit(item.id, item.uri, float(stored @ query), item.metadata, sha256=item.sha256))
    ordered = ranking.order(hits, None, True)
    if options.min_score is not None:
        ordered = [h for h in ordered if h.score >= options.min_score]
    ordered, _ = ranking.drop_tail(ordered, options.max_drop)
    grouped = ranking.collapse(ordered, options.collapse)
    return ranking.order(grouped, options.sort_key, options.order == "desc")[:MAX_DEPTH]


@pytest.fixture
def crowded(world: World) -> World:
    """240 items: every fifth a copy (same content, same vector) of the one before; a year and a colour each."""
    rng = np.random.default_rng(11)
    ups: list[Upsert] = []
    for i in range(240):
        copy = i % 5 == 4
        sha = f"sha-{i - 1}" if copy else f"sha-{i}"
        vec = ups[-1].embedding if copy else towards(QUERY, float(rng.uniform(-0.2, 0.95)), seed=i)
        meta = {"year": 2000 + int(rng.integers(0, 12)), "colour": ["red", "blue", "green"][i % 3]}
        if i % 17 == 0:
            meta.pop("year")
        ups.append(Upsert(f"item-{i:03d}", "kafka", f"https://x/{i}", sha, meta, vec))
    world.store.apply(upserts=ups)
    world.refresh()
    return world


@pytest.mark.parametrize(
    "options",
    [
        SearchOptions(),
        SearchOptions(collapse=Collapse.NONE),
        SearchOptions(max_drop=0.4),
        SearchOptions(min_score=0.0, filters=Filters({"colour": "red"})),
        SearchOptions(sort_by="metadata.year", order="desc"),
        SearchOptions(sort_by="metadata.year", order="asc", max_drop=0.6, collapse=Collapse.NONE),
    ],
)
def test_pages_never_overlap_and_concatenate_to_one_deep_search(crowded: World, options: SearchOptions) -> None:
    terms: list[Term] = [TextTerm("anything")]
    want = oracle(crowded, combine([1.0], [crowded.search.embedder.encode_text("anything").vector]), options)
    got = all_pages(crowded.search, terms, options, [7, 1, 13, 100])
    assert [h.id for h in got] == [h.id for h in want] and len(want) > 15
    assert [h.duplicates for h in got] == [h.duplicates for h in want]


def test_copies_show_once_listing_the_others_by_default(crowded: World) -> None:
    result = crowded.search.search([ItemTerm("item-003")], SearchOptions(top_k=100))
    by_id = {h.id: h for h in result.hits}
    assert "item-003" not in by_id and "item-004" in by_id  # the item itself is left out, its copy is not
    shown = {i for h in result.hits for i in (h.id, *h.duplicates)}
    assert len(shown) == len(result.hits) + sum(len(h.duplicates) for h in result.hits)
    assert any(h.duplicates for h in result.hits)
    for h in result.hits:
        for dup in h.duplicates:
            assert crowded.reader.catalog.get_item(dup).sha256 == h.sha256  # type: ignore[union-attr]


def test_a_page_after_new_items_arrived_above_it_repeats_nothing(crowded: World) -> None:
    terms: list[Term] = [TextTerm("anything")]
    vector = crowded.search.embedder.encode_text("anything").vector
    first = crowded.search.search(terms, SearchOptions(top_k=10))
    crowded.add("newcomer", vector, colour="red")  # the best match of all, after page one was shown
    crowded.store.apply(deletes=[Delete(first.hits[3].id)])
    crowded.refresh()
    second = crowded.search.search(terms, SearchOptions(top_k=10, cursor=first.next_cursor))
    assert not {h.id for h in second.hits} & ({h.id for h in first.hits} | {"newcomer"})
    assert len(second.hits) == 10


def test_pages_reach_a_thousand_results_deep(world: World) -> None:
    rng = np.random.default_rng(3)
    vecs = rng.standard_normal((1100, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    world.store.apply(upserts=[Upsert(f"i{n}", "kafka", "u", f"s{n}", {}, v) for n, v in enumerate(vecs)])
    world.refresh()
    got = all_pages(world.search, [TextTerm("x")], SearchOptions(), [100])
    assert len(got) == MAX_DEPTH == len({h.id for h in got})
    scores = [round(h.score, 6) for h in got]
    assert scores == sorted(scores, reverse=True)


def test_a_cursor_from_another_search_is_refused(crowded: World) -> None:
    first = crowded.search.search([TextTerm("anything")], SearchOptions(top_k=5))
    with pytest.raises(InvalidRequest, match="another search"):
        crowded.search.search([TextTerm("something else")], SearchOptions(top_k=5, cursor=first.next_cursor))


# -- collapse=parent: one hit per product ---------------------------------------------------------------------


@pytest.fixture
def shop(world: World) -> World:
    """Products as the indexer writes them (an item per image, `<product>#<key>`, `parent` in metadata):
    P-00 with 60 images that all rank above everything else, P-01 .. P-24 with 1 to 5 images each (some
    showing the same picture as another product's), and 30 loose items, every third a copy of the one before."""
    rng = np.random.default_rng(5)
    shoes = combine([1.0], [world.search.embedder.encode_text("shoes").vector])  # what the tests search for
    ups: list[Upsert] = []

    def image(product: str, n: int, vector: np.ndarray, sha: str, **meta: Any) -> Upsert:
        uri = f"https://cdn.example/{product}/{n}.jpg"
        metadata = {"parent": product, **meta}
        return Upsert(image_id(f"kafka:{product}", uri), "kafka", uri, sha, metadata, vector)

    for n in range(60):
        ups.append(image("P-00", n, towards(shoes, 0.99 - 0.001 * n, seed=9000 + n), f"sha-P-00-{n}", year=2020))
    for p in range(1, 25):
        for n in range(1 + p % 5):
            sha = "sha-shared" if (p % 7, n) == (3, 0) else f"sha-P-{p:02d}-{n}"
            vector = towards(shoes, float(rng.uniform(-0.3, 0.9)), seed=20_000 + 100 * p + n)
            ups.append(image(f"P-{p:02d}", n, vector, sha, year=2000 + p % 9))
    for i in range(30):
        copy = i % 3 == 2
        vector = ups[-1].embedding if copy else towards(shoes, float(rng.uniform(-0.3, 0.9)), seed=5000 + i)
        sha = ups[-1].sha256 if copy else f"sha-loose-{i}"
        ups.append(Upsert(f"kafka:loose-{i:02d}", "kafka", f"https://x/{i}", sha, {"year": 2000 + i % 11}, vector))
    world.store.apply(upserts=ups)
    world.refresh()
    return world


def test_parent_shows_each_product_once_its_best_image_listing_the_others(shop: World) -> None:
    vector = combine([1.0], [shop.search.embedder.encode_text("shoes").vector])
    result = shop.search.search([TextTerm("shoes")], SearchOptions(top_k=100, collapse=Collapse.PARENT))
    images: dict[str, list[tuple[float, str]]] = {}
    for item in shop.reader.catalog.items():
        if "parent" in item.metadata:
            score = float(shop.vectors.item_vector(item.id) @ vector)  # type: ignore[operator]
            images.setdefault(str(item.metadata["parent"]), []).append((score, item.id))
    shown = [h for h in result.hits if "parent" in h.metadata]
    assert sorted(h.metadata["parent"] for h in shown) == sorted(images)  # every product once (each matched)
    for hit in shown:
        mine = images[str(hit.metadata["parent"])]
        assert hit.id == max(mine)[1] and hit.score == pytest.approx(max(mine)[0], abs=1e-5)  # its best image
        assert sorted((hit.id, *hit.duplicates)) == sorted(i for _, i in mine)  # the others listed
    loose = [h for h in result.hits if "parent" not in h.metadata]
    assert len(loose) == 20 and sorted(len(h.duplicates) for h in loose) == [0] * 10 + [1] * 10  # copies fold by hash
    assert len(result.hits) == 24 + 1 + 20 and result.next_cursor is None


@pytest.mark.parametrize(
    "options",
    [
        SearchOptions(collapse=Collapse.PARENT),
        SearchOptions(collapse=Collapse.PARENT, sort_by="metadata.year", order="asc", max_drop=1.0),
        SearchOptions(collapse=Collapse.PARENT, filters=Filters({"year": 2020})),
    ],
)
def test_pages_of_products_never_overlap_and_concatenate(shop: World, options: SearchOptions) -> None:
    """P-00's 60 images fill the top of the ranking: a page of products must read past them (the candidates
    widen), and never show P-00 twice. A page lists the other images among the candidates it read (a
    deep search may list more of them: those ranking far below), in rank order."""
    want = oracle(shop, combine([1.0], [shop.search.embedder.encode_text("shoes").vector]), options)
    got = all_pages(shop.search, [TextTerm("shoes")], options, [3, 1, 8])
    assert [h.id for h in got] == [h.id for h in want]
    for shown, whole in zip(got, want, strict=True):
        assert shown.duplicates == tuple(i for i in whole.duplicates if i in shown.duplicates)
    if options.sort_key is None:
        assert got[0].metadata["parent"] == "P-00" and len(got[0].duplicates) == 59  # read past all of P-00
    products = [h.metadata["parent"] for h in got if "parent" in h.metadata]
    assert len(products) == len(set(products)) and "P-00" in products


def test_a_products_images_are_filtered_by_parent(shop: World) -> None:
    """The indexer's `parent` is metadata like any other: a filter on it finds exactly that product's images."""
    options = SearchOptions(top_k=100, collapse=Collapse.NONE, filters=Filters({"parent": "P-04"}))
    hits = shop.search.search([TextTerm("shoes")], options).hits
    assert len(hits) == 5 and {h.metadata["parent"] for h in hits} == {"P-04"}
    assert all(h.id.startswith("kafka:P-04#") for h in hits)
    one = shop.search.search([TextTerm("shoes")], SearchOptions(collapse=Collapse.PARENT, filters=options.filters))
    assert len(one.hits) == 1 and len(one.hits[0].duplicates) == 4


def test_liked_and_unliked_items_move_the_ranking_and_are_left_out(ranked: World) -> None:
    """item-19 is the worst match for QUERY; liking it with weight 3 makes items near it rank first."""
    like = ranked.search.search([ItemTerm("item-0"), ItemTerm("item-19", 3.0)], SearchOptions(top_k=19))
    assert {"item-0", "item-19"}.isdisjoint(h.id for h in like.hits) and len(like.hits) == 18
    vectors = {h.id: ranked.vectors.item_vector(h.id) for h in like.hits}
    q = combine([1.0, 3.0], [ranked.vectors.item_vector("item-0"), ranked.vectors.item_vector("item-19")])  # type: ignore[list-item]
    assert [h.id for h in like.hits] == sorted(vectors, key=lambda i: (-round(float(vectors[i] @ q), 6), i))
    with pytest.raises(NotFound, match="no item with id 'nope'"):
        ranked.search.search([TextTerm("x"), ItemTerm("nope", -1)])


def test_the_backends_partial_flag_reaches_the_result(ranked: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each backend stops at a bound and says so. SQLite: a `null` filter checked item by item on at most
    MAX_SCAN candidates. Milvus filters inside its search, so its bound (its largest search) is reached
    only when the exact check drops the rows Milvus let through: here every row (as if every tag collided)."""
    if ranked.settings.store == "milvus":
        monkeypatch.setattr(milvus_search, "_MAX_FETCH", 4)
        monkeypatch.setattr(milvus_search.ex, "search_expr", lambda *args: 'status == "indexed"')
    else:
        monkeypatch.setattr(search_module, "MAX_SCAN", 4)
    result = ranked.search.search([TextTerm("x")], SearchOptions(top_k=1, filters=Filters({"colour": None})))
    assert result.hits == [] and result.partial and result.next_cursor is None
