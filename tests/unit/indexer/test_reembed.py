"""The re-embed: every live item read again from its source and embedded with the new model into a
shadow space, resumably, beside writers of the old model; then the switch, which indexers follow."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipdex import cli
from clipdex.cli import build_parser
from indexer.decode import sha256_of
from indexer.events import Event
from indexer.progress import ProgressBar, format_eta
from indexer.records import Record
from indexer.redeliver import retry_records
from indexer.reembed import Progress, Reembedder, ReembedReport, Throttle, reembed_lock
from indexer.service import index_folder, open_indexer
from shared.cliargs import setting_overrides
from shared.config import Settings, load_settings
from shared.embedder import Embedder
from shared.roles import Delete, Space, Upsert
from shared.sqlite.store import SqliteStore
from shared.stores import WriteSide, open_writer
from tests.conftest import TINY_CONFIGS, tiny_env, tiny_settings_for

N = 12


def png(i: int, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(i)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[tuple[Settings, Path]]:
    """N images indexed with the tiny model (32 dimensions) by `clipdex index`'s code path. No allowed
    roots are configured: the re-embed reads a folder item from the folder it was indexed from."""
    root = tmp_path / "images"
    root.mkdir()
    for i in range(N):
        (root / f"img-{i:02d}.png").write_bytes(png(i))
    settings = tiny_settings_for(tmp_path / "data", batch_size=4)
    summary = asyncio.run(index_folder(settings, root))
    assert summary.indexed == N
    yield settings, root


def shadow_for(store: WriteSide, embedder: Embedder) -> Space:
    return store.spaces.create_shadow(embedder.identity, str(TINY_CONFIGS))


def run(
    store: WriteSide,
    shadow: Space,
    embedder: Embedder,
    settings: Settings,
    on_progress: Callable[[Progress], None] | None = None,
    stop: asyncio.Event | None = None,
) -> ReembedReport:
    async def main() -> ReembedReport:
        worker = Reembedder(store.spaces, store.catalog, shadow, embedder, settings, on_progress=on_progress)
        return await worker.run(stop or asyncio.Event())

    return asyncio.run(main())


def space_vectors(settings: Settings, space: Space) -> set[int]:
    with SqliteStore(settings.db_path) as store:
        return {int(v) for ids, _ in store.feed(space.id).live_vectors() for v in ids}


def embedded(embedder: Embedder, path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return embedder.encode_images([img.convert("RGB")])[0]


def test_every_item_gets_the_new_models_vector_then_the_store_switches(
    folder: tuple[Settings, Path], tiny16_embedder: Embedder
) -> None:
    settings, root = folder
    seen: list[Progress] = []
    with open_writer(settings, None) as store:
        shadow = shadow_for(store, tiny16_embedder)
        report = run(store, shadow, tiny16_embedder, settings, on_progress=seen.append)
        assert report.switched and report.embedded == N and report.failed == 0
        assert store.catalog.model_identity() == tiny16_embedder.identity
        assert [s.state for s in store.catalog.spaces()] == ["retired", "active"]
    with open_writer(settings, tiny16_embedder.identity) as store:  # a writer of the new model: its space
        for i in range(N):
            stored = store.catalog.get_item(f"folder:images/img-{i:02d}.png")
            assert stored is not None and stored.vector_id is not None
        feed = store.compaction.ledgers()[0] if store.compaction else None
        assert feed is not None
        vector = feed.item_vector("folder:images/img-03.png")
        assert vector is not None and vector[1].shape == (16,)
        np.testing.assert_allclose(vector[1], embedded(tiny16_embedder, root / "img-03.png"), atol=1e-5)
    # progress: the store's counts as they grow, this run's rate, and an ETA that reaches 0
    assert seen[0].done == 0 and seen[-1].done == N and seen[-1].coverage.total == N
    assert seen[-1].eta_s == 0.0 and seen[-1].rate > 0


def test_a_stopped_run_resumes_without_embedding_a_finished_item_again(
    folder: tuple[Settings, Path], tiny16_embedder: Embedder
) -> None:
    settings, _ = folder
    with open_writer(settings, None) as store:
        shadow = shadow_for(store, tiny16_embedder)

        async def first_batch_only() -> ReembedReport:
            stop = asyncio.Event()
            calls: list[Progress] = []

            def after(p: Progress) -> None:
                calls.append(p)
                if len(calls) == 2:  # the first micro-batch is durable: stop here
                    stop.set()

            worker = Reembedder(store.spaces, store.catalog, shadow, tiny16_embedder, settings, on_progress=after)
            return await worker.run(stop)

        first = asyncio.run(first_batch_only())
        assert not first.switched and first.embedded == 4
        cov = store.catalog.coverage(shadow.id)
        assert (cov.done, cov.remaining) == (4, N - 4)
        finished = space_vectors(settings, shadow)
        again = store.spaces.create_shadow(tiny16_embedder.identity, None)  # what a second `clipdex reembed` does
        assert again.id == shadow.id
        second = run(store, again, tiny16_embedder, settings)
        assert second.switched and second.embedded == N - 4  # nothing twice
        after = space_vectors(settings, shadow)
        assert len(finished) == 4 and finished < after and len(after) == N  # the first four kept their vectors


def test_items_written_by_the_old_model_meanwhile_are_right_after_the_switch(
    folder: tuple[Settings, Path], tiny_embedder: Embedder, tiny16_embedder: Embedder
) -> None:
    settings, root = folder
    (root / "new.png").write_bytes(png(100))
    (root / "img-05.png").write_bytes(png(105))  # changed content
    writes_done: list[bool] = []
    with open_writer(settings, tiny_embedder.identity) as old, open_writer(settings, None) as store:
        shadow = shadow_for(store, tiny16_embedder)

        def an_indexer_writes(p: Progress) -> None:
            if writes_done or p.done < 4:
                return
            writes_done.append(True)  # after the first batch: one item changes, one comes, two go
            old.writer.apply(
                [folder_upsert(root, "new.png", tiny_embedder), folder_upsert(root, "img-05.png", tiny_embedder)],
                [_delete("img-00.png"), _delete("img-11.png")],
            )
            (root / "img-00.png").unlink()
            (root / "img-11.png").unlink()

        report = run(store, shadow, tiny16_embedder, settings, on_progress=an_indexer_writes)
        assert writes_done and report.switched and report.failed == 0
    with open_writer(settings, tiny16_embedder.identity) as store:
        items = {i.id for i in store.catalog.items()}
        expected = {f"folder:images/{p.name}" for p in root.iterdir()}
        assert items == expected and "folder:images/new.png" in items and "folder:images/img-00.png" not in items
        assert store.catalog.stats().items == len(expected)  # each with a vector in the new space
        feed = store.compaction.ledgers()[0] if store.compaction else None
        assert feed is not None
        for name in ("new.png", "img-05.png"):
            vector = feed.item_vector(f"folder:images/{name}")
            assert vector is not None
            np.testing.assert_allclose(vector[1], embedded(tiny16_embedder, root / name), atol=1e-5)


def folder_upsert(root: Path, name: str, embedder: Embedder) -> Upsert:
    path = root / name
    return Upsert(
        f"folder:images/{name}",
        "folder",
        str(path),
        sha256_of(path.read_bytes()),
        {"path": name},
        embedded(embedder, path),
    )


def _delete(name: str) -> Delete:
    return Delete(f"folder:images/{name}")


def test_a_source_gone_is_a_dead_letter_a_failed_item_after_the_switch_and_retriable(
    folder: tuple[Settings, Path], tiny16_embedder: Embedder
) -> None:
    settings, root = folder
    (root / "img-07.png").unlink()
    with open_writer(settings, None) as store:
        report = run(store, shadow_for(store, tiny16_embedder), tiny16_embedder, settings)
        assert report.switched and report.failed == 1 and report.coverage is not None
        assert report.coverage.failed == 1
        [letter] = store.catalog.dead_letters()
        assert letter.item_id == "folder:images/img-07.png" and "re-embedding with clipdex-tiny-16" in letter.reason
        assert "SourceNotFound" in letter.reason
        item = store.catalog.get_item("folder:images/img-07.png")
        assert item is not None and item.status == "failed" and item.vector_id is None
        [record] = retry_records(letter)  # `clipdex dlq retry` sends it through the pipeline again
        assert record.event is not None and record.event.uri == str(root / "img-07.png")
        assert record.event.metadata["path"] == "img-07.png"


def test_identical_contents_are_embedded_once(folder: tuple[Settings, Path], tiny16_embedder: Embedder) -> None:
    settings, root = folder
    (root / "copy.png").write_bytes((root / "img-02.png").read_bytes())
    asyncio.run(index_folder(settings, root))
    with open_writer(settings, None) as store:
        report = run(store, shadow_for(store, tiny16_embedder), tiny16_embedder, settings)
    assert report.switched and report.embedded == N  # N + 1 items


def test_an_indexer_of_the_old_model_follows_the_switch(
    folder: tuple[Settings, Path], tiny16_embedder: Embedder
) -> None:
    settings, root = folder

    async def main() -> None:
        async with open_indexer(settings, roots=[root], compaction=False) as indexer:
            assert indexer.embedder.identity.dim == 32
            with open_writer(settings, None) as store:
                worker = Reembedder(
                    store.spaces, store.catalog, shadow_for(store, tiny16_embedder), tiny16_embedder, settings
                )
                assert (await worker.run(asyncio.Event())).switched
            (root / "late.png").write_bytes(png(200))
            event = Event(op="upsert", id="late.png", uri=str(root / "late.png"), metadata={"path": "late.png"})
            report = await indexer.pipeline.write([Record("folder", "late.png", event)])
            assert report.indexed == 1 and indexer.embedder.identity.dim == 16

    asyncio.run(main())
    with open_writer(settings, tiny16_embedder.identity) as store:
        assert store.catalog.stats().items == N + 1


def test_one_re_embed_at_a_time(tmp_path: Path) -> None:
    with reembed_lock(tmp_path) as first, reembed_lock(tmp_path) as second:
        assert first and not second
    with reembed_lock(tmp_path) as again:
        assert again


async def test_the_throttle_holds_the_rate_and_a_stop_cuts_it_short() -> None:
    stop = asyncio.Event()
    started = time.monotonic()
    await Throttle(100).wait(10, 0.02, stop)  # 10 items at 100/s: 0.1 s, of which 0.02 s went to the work
    assert time.monotonic() - started >= 0.07
    started = time.monotonic()
    await Throttle(0).wait(1000, 0.0, stop)
    stop.set()
    await Throttle(1).wait(1000, 0.0, stop)
    assert time.monotonic() - started < 1


def test_the_progress_bar_shows_the_rate_and_the_eta() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, width=10, every_s=0)
    bar.show(25, 100, "1 failed", rate=5.0, eta_s=15.0)
    bar.show(100, 100, "1 failed", rate=5.0, eta_s=0.0)
    bar.show(100, 100, "1 failed", rate=5.0, eta_s=0.0)  # the end, once
    assert out.getvalue().splitlines() == [
        "[##........] 25/100 (25%) 5.0/s, ETA 15s, 1 failed",
        "[##########] 100/100 (100%) 5.0/s, ETA 0s, 1 failed",
    ]
    assert [format_eta(s) for s in (None, 59.4, 61, 3725)] == ["-", "59s", "1m01s", "1h02m"]


def test_an_indexer_with_reembed_in_indexer_fills_a_detached_re_embed(
    folder: tuple[Settings, Path], tiny16_embedder: Embedder
) -> None:
    settings, root = folder
    settings = settings.model_copy(update={"reembed_in_indexer": True})
    with open_writer(settings, None) as store:
        shadow_for(store, tiny16_embedder)  # what `clipdex reembed --detach` leaves behind

    async def main() -> None:
        async with open_indexer(settings, roots=[root]) as indexer:
            deadline = time.monotonic() + 60
            while indexer.store.catalog.model_identity() != tiny16_embedder.identity:
                assert time.monotonic() < deadline, "the background re-embed did not switch"
                await asyncio.sleep(0.05)

    asyncio.run(main())
    with open_writer(settings, tiny16_embedder.identity) as store:
        assert store.catalog.stats().items == N


def test_abort_from_the_command_line_drops_the_shadow_space(
    folder: tuple[Settings, Path],
    tiny16_embedder: Embedder,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings, _ = folder
    with open_writer(settings, None) as store:
        shadow_for(store, tiny16_embedder)
    for name, value in tiny_env(settings.data_dir).items():
        monkeypatch.setenv(name, value)

    def main(*argv: str) -> int:  # the real parser and settings, without the CLI's logging setup
        args = build_parser().parse_args(list(argv))
        code: int = args.func(args, load_settings(**setting_overrides(args)))
        return code

    assert main("reembed", "--abort") == 0
    assert "aborted the re-embed with clipdex-tiny-16" in capsys.readouterr().out
    with open_writer(settings, None) as store:
        assert [s.state for s in store.catalog.spaces()] == ["active"]
    assert main("reembed", "--abort") == 0
    assert "no re-embed in progress" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--model", "ViT-B-16", "--pretrained", "x"], ["--abort"]])
def test_on_the_milvus_store_the_command_stops_at_once_and_says_what_to_do(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLIPDEX_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CLIPDEX_STORE", "milvus")
    monkeypatch.setenv("CLIPDEX_MILVUS_URI", "http://127.0.0.1:9")  # nothing listens: nothing may be asked
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)
    started = time.monotonic()
    assert cli.main(["reembed", *argv]) == 2
    assert time.monotonic() - started < 5  # no connection attempt, no model load
    err = capsys.readouterr().err
    assert "re-embedding (clipdex reembed) is supported on the SQLite store" in err
    assert "docs/architecture.md" in err and "CLIPDEX_MODEL" in err
    assert not (tmp_path / "data").exists()
