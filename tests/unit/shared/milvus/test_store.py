"""What only the Milvus store has (the shared contract is tests/unit/shared/test_store_contract.py): its
collections' names, what Milvus would refuse, a writer stopped between its steps, an unreachable server.
A Milvus that stops and comes back mid-stream: tests/integration/test_milvus_scale_out.py."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from shared.config import Settings
from shared.errors import ConfigError, StoreUnavailable
from shared.milvus import expr as ex
from shared.milvus.collections import derived_name
from shared.milvus.store import MilvusStore
from shared.roles import Failure, Upsert
from shared.stores import WriteSide, open_catalog, open_reader, open_writer
from shared.types import ModelIdentity
from tests.brokers import free_port
from tests.conftest import milvus_settings_for
from tests.milvus import MilvusLite

DIM = 8
MODEL = ModelIdentity("ViT-B-32", "laion2b_s34b_b79k", DIM, "0123456789abcdef" * 4)


def vec(seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return x / np.linalg.norm(x)


@pytest.fixture
def settings(milvus_uri: str, tmp_path: Path) -> Settings:
    return milvus_settings_for(tmp_path / "scratch", milvus_uri)


@pytest.fixture
def store(settings: Settings) -> Iterator[WriteSide]:
    with open_writer(settings, MODEL) as side:
        yield side


def rows_of(side: WriteSide, item_id: str) -> list[int]:
    """The versions stored for an item, superseded ones included."""
    assert isinstance(side.writer, MilvusStore)
    milvus, names = side.writer.milvus, side.writer.names
    return sorted(
        int(r["version"]) for r in milvus.query(names.items, ex.keys_in("key", [ex.item_key(item_id)]), ["version"])
    )


def test_the_collection_is_named_after_the_model_one_per_model() -> None:
    assert derived_name(MODEL) == "clipdex_vit_b_32_0123456789ab"
    other = ModelIdentity("ViT-L-14", "openai", 768, "fedcba9876543210" * 4)
    assert derived_name(other) == "clipdex_vit_l_14_fedcba987654" != derived_name(MODEL)
    odd = ModelIdentity("hf-hub:org/Some Model++", "none", 8, "/not/a/checksum")
    assert re.fullmatch(r"clipdex_hf_hub_org_some_model_[0-9a-f]{12}", derived_name(odd))


def test_commands_without_a_model_find_the_one_store_or_ask_which(tmp_path: Path) -> None:
    server = MilvusLite(tmp_path / "milvus")  # a database of its own: the session's holds other tests' stores
    try:
        derived = milvus_settings_for(tmp_path, server.uri).model_copy(update={"milvus_collection": None})
        with open_catalog(derived) as catalog:
            assert catalog is None  # nothing there, and nothing is created by looking
        with open_writer(derived, MODEL) as side:
            side.writer.apply(upserts=[Upsert("a", "kafka", "u", "sha-a", {}, vec(1))])
        with open_catalog(derived) as catalog:
            assert catalog is not None and catalog.model_identity() == MODEL and catalog.stats().items == 1
        with open_writer(derived, ModelIdentity("ViT-L-14", "openai", DIM, "f" * 64)):
            pass  # a second model: a collection of its own
        with pytest.raises(ConfigError, match=r"several clipdex collections.*CLIPDEX_MILVUS_COLLECTION"):  # noqa: SIM117
            with open_catalog(derived):
                pass
        with open_catalog(derived.model_copy(update={"milvus_collection": derived_name(MODEL)})) as catalog:
            assert catalog is not None and catalog.model_identity() == MODEL
    finally:
        server.stop()


def test_what_milvus_would_refuse_is_a_dead_letter_and_the_rest_of_the_batch_is_written(store: WriteSide) -> None:
    many = {f"k{i}": i for i in range(2100)}  # 2 tags a key: more than an array holds
    result = store.writer.apply(
        upserts=[
            Upsert("big", "kafka", "u", "sha-big", many, vec(1)),
            Upsert("fine", "kafka", "u", "sha-fine", {"k": 1}, vec(2)),
        ]
    )
    assert (result.indexed, result.failed) == (1, 1)
    big = store.catalog.get_item("big")
    assert big is not None and big.status == "failed" and "metadata keys" in (big.reason or "")
    assert store.catalog.get_item("fine") is not None
    [letter] = store.catalog.dead_letters()
    assert letter.item_id == "big" and "2,100 metadata keys" in letter.reason


def test_a_long_or_unencodable_dead_letter_is_kept_cut_and_escaped(store: WriteSide) -> None:
    payload = "x" * 70_000 + "\udcff"
    store.writer.apply(failures=[Failure("folder", payload, "bad \udcff name", id=None)])
    [letter] = store.catalog.dead_letters()
    assert letter.payload.startswith("x" * 1000) and letter.payload.endswith("(cut)")
    assert len(letter.payload.encode()) <= 65_535 and letter.reason == "bad \\udcff name"


def test_a_writer_stopped_between_its_steps_leaves_a_superseded_row_that_a_replay_removes(
    store: WriteSide, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.writer.apply(upserts=[Upsert("a", "kafka", "u", "sha-1", {}, vec(1), 1)])
    assert isinstance(store.writer, MilvusStore)

    def down(*args: object) -> None:
        raise StoreUnavailable("Milvus went away")

    newer = [Upsert("a", "kafka", "u", "sha-2", {}, vec(2), 2)]
    with monkeypatch.context() as m:
        m.setattr(store.writer, "_drop_superseded", down)
        with pytest.raises(StoreUnavailable):
            store.writer.apply(upserts=newer)
    assert rows_of(store, "a") == [1, 2]
    with open_reader(settings, MODEL) as reader:  # meanwhile: the item once, at its newest version
        assert [h.id for h in reader.vectors.search(vec(2), 10).hits] == ["a"]
        assert store.writer.states(["a"])["a"].version == 2
    store.writer.apply(upserts=newer)  # the uncommitted batch, replayed
    assert rows_of(store, "a") == [2]


def test_an_unreachable_server_is_retriable_and_said_quickly(tmp_path: Path) -> None:
    settings = milvus_settings_for(tmp_path, f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1") as err:
        open_writer(settings, MODEL)
    assert err.value.retriable and time.monotonic() - started < 30
