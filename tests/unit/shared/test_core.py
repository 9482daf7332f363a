"""A search process follows the store to a new model (`clipdex reembed`) without a restart: it loads the
new model and its space before switching, a query uses one model and one space, and one that cannot
load the new model keeps answering with the old and says why."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from indexer.reembed import Reembedder
from indexer.service import index_folder
from shared.config import Settings
from shared.core import build_core
from shared.embedder import Embedder
from shared.fetch import FetchPolicy
from shared.stores import open_writer
from tests.conftest import TINY_CONFIGS, tiny_settings_for
from tests.sample_store import COLOURS, png_bytes
from tools.metrics import Metrics
from tools.queries import Queries
from tools.schemas import IndexStatusOut

QUERY = "a red square"


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    root = tmp_path / "images"
    root.mkdir()
    for name, rgb in COLOURS.items():
        for size in ((48, 32), (32, 48), (40, 40)):
            (root / f"{name}-{size[0]}x{size[1]}.png").write_bytes(png_bytes(rgb, size))
    settings = tiny_settings_for(tmp_path / "data")
    asyncio.run(index_folder(settings, root))
    yield settings


def reembed(settings: Settings, embedder: Embedder, *, model_configs: str | None = str(TINY_CONFIGS)) -> None:
    """`clipdex reembed` to `embedder`'s model, in this process, up to the switch."""
    with open_writer(settings, None) as store:
        shadow = store.spaces.create_shadow(embedder.identity, model_configs)
        worker = Reembedder(store.spaces, store.catalog, shadow, embedder, settings)
        assert asyncio.run(worker.run(asyncio.Event())).switched


def test_a_server_follows_the_switch_and_a_query_never_mixes_two_models(
    settings: Settings, tiny16_embedder: Embedder
) -> None:
    core = build_core(settings)
    try:
        before = core.search  # what a query in flight at the switch holds
        old = core.search.search_text(QUERY, 5)
        assert old.index.model is not None and old.index.model.dim == 32 and len(old.hits) == 5
        reembed(settings, tiny16_embedder)
        assert core.follow_switch() is True and core.follow_switch() is False
        new = core.search.search_text(QUERY, 5)
        assert new.index.model == tiny16_embedder.identity and len(new.hits) == 5
        text = tiny16_embedder.encode_text(QUERY).vector
        for hit in new.hits:  # every score is the new model's text against the new model's image vector
            stored = core.vectors.item_vector(hit.id)
            assert stored is not None and stored.shape == (16,)
            assert hit.score == pytest.approx(float(np.dot(text, stored)), abs=1e-5)
        again = before.search_text(QUERY, 5)  # the old pair still answers, whole, until it drains
        assert again.index.model is not None and again.index.model.dim == 32
        assert [h.id for h in again.hits] == [h.id for h in old.hits]
        assert core.vectors.state().model == tiny16_embedder.identity
        core.refresh()  # the refresher's tick: nothing more to switch; the new space stays current
        status = IndexStatusOut.of(Queries(core, FetchPolicy.from_settings(settings), Metrics()).status_sync())
        assert (status.model.name, status.answering_model.name, status.reembed) == (
            "clipdex-tiny-16",
            "clipdex-tiny-16",
            None,
        )
    finally:
        core.close()


def test_a_server_that_cannot_load_the_new_model_keeps_answering_with_the_old(
    settings: Settings, tiny16_embedder: Embedder, tmp_path: Path
) -> None:
    core = build_core(settings)
    try:
        reembed(settings, tiny16_embedder, model_configs=str(tmp_path / "not-here"))
        assert core.follow_switch() is False
        assert core.switch_error is not None and "clipdex-tiny-16" in core.switch_error
        result = core.search.search_text(QUERY, 3)
        assert result.index.model is not None and result.index.model.name == "clipdex-tiny"
        status = IndexStatusOut.of(Queries(core, FetchPolicy.from_settings(settings), Metrics()).status_sync())
        assert status.model.name == "clipdex-tiny-16" and status.answering_model.name == "clipdex-tiny"
        assert status.switch_error is not None and "clipdex-tiny-16" in status.switch_error
        assert str(tmp_path) not in status.switch_error  # clients learn no server path (tools.redaction)
        assert core.follow_switch() is False  # not tried again at every tick
    finally:
        core.close()
