"""One decode memory budget per process: HTTP uploads, thumbnails (MCP include_images too) and the
indexer's decode pool all wait on it. Real tiny model, real store, real decodes."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from indexer.events import Event
from indexer.pipeline import Pipeline
from indexer.records import Record
from shared.core import Core, build_core
from shared.embedder import Embedder
from shared.fetch import FetchPolicy
from shared.images import decode_budget
from shared.query import SearchOptions
from shared.stores import open_writer
from tests.conftest import tiny_settings_for
from tools.metrics import Metrics
from tools.queries import Queries

BUDGET_MB = 77  # a value no other test uses: the budget is per process and per setting


def png(rgb: tuple[int, int, int], size: tuple[int, int] = (600, 400)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, rgb).save(out, format="PNG")
    return out.getvalue()


def upsert(item_id: str, uri: str) -> Record:
    event = Event.model_validate({"op": "upsert", "id": item_id, "uri": uri})
    return Record("kafka", event.model_dump_json(), event)


@pytest.fixture
def core(tmp_path: Path, tiny_embedder: Embedder) -> Iterator[Core]:
    settings = tiny_settings_for(tmp_path / "data", allowed_roots=[str(tmp_path)], decode_memory_mb=BUDGET_MB)
    core = build_core(settings, embedder=tiny_embedder)
    yield core
    core.reader.close()  # not core.close(): the embedder is the session's


async def test_uploads_thumbnails_and_indexing_all_wait_for_the_one_budget(core: Core, tmp_path: Path) -> None:
    settings = core.settings
    queries = Queries(core, FetchPolicy.from_settings(settings), Metrics())
    store = open_writer(settings, core.embedder.identity)
    pipeline = Pipeline.from_settings(store.writer, core.embedder, settings)
    try:
        (tmp_path / "red.png").write_bytes(png((220, 30, 30)))
        (tmp_path / "blue.png").write_bytes(png((30, 30, 220)))
        report = await pipeline.write([upsert("red", str(tmp_path / "red.png"))])
        assert report.indexed == 1
        core.vectors.refresh()
        budget = decode_budget(BUDGET_MB)
        assert queries.decode_budget is budget

        with budget.hold(budget.capacity):  # as if other decodes held all of it
            upload = asyncio.create_task(queries.similar_to_image(png((0, 200, 0)), SearchOptions(top_k=1), "http"))
            thumbnails = asyncio.create_task(queries.thumbnails(["kafka:red"], "mcp"))
            indexing = asyncio.create_task(pipeline.write([upsert("blue", str(tmp_path / "blue.png"))]))
            await asyncio.sleep(0.5)
            assert not upload.done() and not thumbnails.done() and not indexing.done()
        result, thumbs, report = await asyncio.wait_for(asyncio.gather(upload, thumbnails, indexing), 30)

        assert len(result.hits) == 1
        assert isinstance(thumbs[0], bytes) and Image.open(io.BytesIO(thumbs[0])).size == (256, 171)
        assert report.indexed == 1
        assert budget.in_use == 0
    finally:
        pipeline.close()
        store.close()
