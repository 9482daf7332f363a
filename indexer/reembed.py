"""Re-embedding: fill a shadow space with a new model's vectors of every live item, each read again from
its source, then switch the store to that model without stopping search.

    pending items, by id from a cursor ─▶ fetch + hash (pool, retries) ─▶ a vector of the same content
    already in the shadow space? reuse it ─▶ decode ⇢ embed with the new model ─▶ add_vectors: one
    transaction per micro-batch (an item replaced meanwhile is skipped: it is pending again; one whose
    source is gone is a dead letter) ─▶ progress ─▶ throttle ─▶ next micro-batch
    a pass from the first id finds nothing pending ─▶ compact the shadow space (on the usual thresholds)
    ─▶ switch: one transaction, False if an item arrived meanwhile (then another pass)

The store is the position: killed at any point, the next run starts with the items still pending, so a
finished item is never embedded twice and an interrupted micro-batch is redone whole. Indexers write
meanwhile with the old model (search uses it until the switch); an item they add or change is pending
for the shadow space again, a delete removes it from both. One re-embed runs at a time (`reembed_lock`).
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from indexer.compaction import Compactor
from indexer.decode import Fetch, decode_pool, fetch_with_retries
from indexer.embed import decode_and_embed
from indexer.pipeline import PipelineOptions
from indexer.sources import folder
from shared.config import Settings
from shared.embedder import Embedder
from shared.errors import ItemError
from shared.fetch import FetchPolicy, fetch_bytes
from shared.heartbeat import Heartbeat
from shared.roles import Catalog, Coverage, Pending, Space, SpaceFailure, Spaces, SpaceVector
from shared.types import Embedding

logger = logging.getLogger(__name__)

LOCK_FILE = "reembed.lock"


@dataclass(frozen=True)
class Progress:
    """Where a re-embed stands: the store's counts, and this run's speed."""

    coverage: Coverage
    rate: float  # items per second covered by this run
    eta_s: float | None  # None: no rate yet

    @property
    def done(self) -> int:
        return self.coverage.done + self.coverage.failed


@dataclass
class ReembedReport:
    switched: bool = False
    embedded: int = 0  # images through the new model, this run
    reused: int = 0  # contents already in the shadow space (copies): no model call
    failed: int = 0  # dead letters written, this run
    skipped: int = 0  # replaced or deleted while being embedded: pending again, or gone
    seconds: float = 0.0
    coverage: Coverage | None = None


class Throttle:
    """At most `rate` items per second, on average over micro-batches (0: no limit)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate

    async def wait(self, items: int, took_s: float, stop: asyncio.Event) -> None:
        if self.rate <= 0:
            return
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, items / self.rate - took_s))


class Reembedder:
    def __init__(
        self,
        spaces: Spaces,
        catalog: Catalog,
        space: Space,
        embedder: Embedder,
        settings: Settings,
        *,
        compactor: Compactor | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.spaces = spaces
        self.catalog = catalog
        self.space = space
        self.embedder = embedder
        self.settings = settings
        self.options = PipelineOptions.from_settings(settings, device=embedder.device.type)
        self.batch_size = settings.batch_size
        self.throttle = Throttle(settings.reembed_rate)
        self.compactor = compactor
        self.on_progress = on_progress
        self.heartbeat = heartbeat
        self._decode = self.options.decoder(embedder)
        self._policies: dict[tuple[Path, ...], FetchPolicy] = {}

    async def run(self, stop: asyncio.Event) -> ReembedReport:
        """Re-embed until the store switches (report.switched) or `stop` is set (the micro-batch in
        flight is finished and durable first)."""
        started = time.monotonic()
        report = ReembedReport()
        first = await asyncio.to_thread(self.catalog.coverage, self.space.id)
        self._progress(first, first, started, "running")
        fetch_pool = ThreadPoolExecutor(self.options.fetch_workers, thread_name_prefix="clipdex-reembed-fetch")
        decode = decode_pool(self.options.decode_workers, "clipdex-reembed-decode")
        model = ThreadPoolExecutor(1, thread_name_prefix="clipdex-reembed-embed")
        try:
            cursor = ""
            while not stop.is_set():
                batch = await asyncio.to_thread(self.spaces.pending, self.space.id, after=cursor, limit=self.batch_size)
                if batch:
                    cursor = batch[-1].id
                    batch_started = time.monotonic()
                    await self._one_batch(batch, report, fetch_pool, decode, model)
                    now = await asyncio.to_thread(self.catalog.coverage, self.space.id)
                    self._progress(first, now, started, "running")
                    await self.throttle.wait(len(batch), time.monotonic() - batch_started, stop)
                elif cursor:
                    cursor = ""  # items changed behind the cursor are found by the next pass
                else:
                    covered = await self._switch()
                    if covered is not None:
                        report.switched, report.coverage = True, covered
                        break
        finally:
            for pool in (fetch_pool, decode, model):
                pool.shutdown(wait=True, cancel_futures=True)
        report.seconds = time.monotonic() - started
        if report.coverage is None:
            report.coverage = await asyncio.to_thread(self.catalog.coverage, self.space.id)
        self._progress(first, report.coverage, started, "switched" if report.switched else "stopped")
        return report

    async def _switch(self) -> Coverage | None:
        """Nothing pending: compact the shadow space if a threshold says so (readers then load a main
        index, not a big delta), and switch, unless something arrived meanwhile. The coverage at the
        switch (its failures become failed items then), or None: not switched."""
        if self.compactor is not None:
            await asyncio.to_thread(self.compactor.compact_if_needed)
        covered = await asyncio.to_thread(self.catalog.coverage, self.space.id)
        if await asyncio.to_thread(self.spaces.switch, self.space.id):
            return covered
        logger.info("items arrived while the re-embed finished: another pass")
        return None

    async def _one_batch(
        self,
        batch: Sequence[Pending],
        report: ReembedReport,
        fetch_pool: ThreadPoolExecutor,
        decode: ThreadPoolExecutor,
        model: ThreadPoolExecutor,
    ) -> None:
        read = await asyncio.gather(*(self._read(item, fetch_pool) for item in batch))
        failures = [
            SpaceFailure(item, f"{type(out).__name__}: {out}", tries, retriable=out.retriable)
            for item, out, tries in read
            if isinstance(out, ItemError)
        ]
        fetched = [(item, out) for item, out, _ in read if isinstance(out, tuple)]
        hashes = [sha for _, (_, sha) in fetched]
        known = await asyncio.to_thread(self.spaces.embeddings_in, self.space.id, hashes) if hashes else {}
        todo: dict[str, bytes] = {}
        for _, (data, sha) in fetched:
            if sha not in known:
                todo.setdefault(sha, data)
        done = await decode_and_embed(
            list(todo.items()),
            self._decode,
            self.embedder.encode_images,
            decode_pool=decode,
            model_pool=model,
            sub_batch=self.options.embed_batch,
            pin_memory=self.embedder.device.type == "cuda",
        )
        vectors: list[SpaceVector] = []
        for item, (_, sha) in fetched:
            vector: Embedding | None = known.get(sha, done.vectors.get(sha))
            if vector is None:
                error = done.failures[sha]
                failures.append(SpaceFailure(item, f"{type(error).__name__}: {error}", retriable=error.retriable))
            else:
                vectors.append(SpaceVector(item, sha, vector))
        written = await asyncio.to_thread(self.spaces.add_vectors, self.space.id, vectors, failures)
        report.embedded += len(done.vectors)
        report.reused += sum(1 for _, (_, sha) in fetched if sha in known)
        report.failed += len(failures)
        report.skipped += len(vectors) - written
        for failure in failures:
            logger.warning("re-embed: %s: %s", failure.item.id, failure.reason)

    async def _read(
        self, item: Pending, pool: ThreadPoolExecutor
    ) -> tuple[Pending, tuple[bytes, str] | ItemError, int]:
        outcome, tries = await fetch_with_retries(
            pool,
            self._fetcher(item),
            item.uri,
            retries=self.options.fetch_retries,
            backoff_s=self.options.retry_backoff_s,
            name=item.id,
        )
        return item, outcome, tries

    def _fetcher(self, item: Pending) -> Fetch:
        """What the indexer that wrote the item could read: CLIPDEX_ALLOWED_ROOTS and URL hosts, and for a
        folder item, its watched folder (its uri less its relative path)."""
        roots = tuple(r for r in [folder.root_from(item.source, item.uri, item.metadata)] if r is not None)
        policy = self._policies.get(roots)
        if policy is None:
            policy = self._policies[roots] = FetchPolicy.from_settings(self.settings, extra_roots=roots)
        return functools.partial(fetch_bytes, policy=policy)

    def _progress(self, first: Coverage, now: Coverage, started: float, state: str) -> None:
        elapsed = time.monotonic() - started
        covered = (now.done + now.failed) - (first.done + first.failed)
        rate = covered / elapsed if elapsed > 0 and covered > 0 else 0.0
        eta = now.remaining / rate if rate > 0 else (0.0 if now.remaining == 0 else None)
        progress = Progress(now, rate, eta)
        if self.on_progress is not None:
            self.on_progress(progress)
        if self.heartbeat is not None:
            self.heartbeat.beat(
                state=state,
                space=self.space.id,
                done=progress.done,
                total=now.total,
                failed=now.failed,
                rate=round(rate, 3),
                eta_s=None if eta is None else round(eta, 1),
            )


@contextmanager
def reembed_lock(data_dir: Path) -> Iterator[bool]:
    """One re-embed per store at a time: yields False (without the lock) when another process holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / LOCK_FILE, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def holder_of_lock(data_dir: Path) -> str:
    try:
        return (data_dir / LOCK_FILE).read_text().strip() or "?"
    except OSError:
        return "?"


@asynccontextmanager
async def background_reembed(
    settings: Settings,
    spaces: Spaces | None,
    catalog: Catalog,
    load: Callable[[Space], Embedder],
    release: Callable[[Embedder], None],
    *,
    check_interval_s: float = 5.0,
) -> AsyncIterator[None]:
    """`CLIPDEX_REEMBED_IN_INDEXER`: while the block runs, fill a pending shadow space (`clipdex reembed
    --detach` created it) in the background of an indexer, when no other process re-embeds."""
    if not settings.reembed_in_indexer or spaces is None:
        yield
        return
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            shadow = next((s for s in await asyncio.to_thread(catalog.spaces) if s.state == "shadow"), None)
            if shadow is not None:
                try:
                    await _fill(shadow)
                except Exception:
                    logger.exception("background re-embed failed; trying again in %.0f s", check_interval_s)
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), check_interval_s)

    async def _fill(shadow: Space) -> None:
        with reembed_lock(settings.data_dir) as mine:
            if not mine:
                return
            embedder = await asyncio.to_thread(load, shadow)
            try:
                heartbeat = Heartbeat.reembed(settings.data_dir, model=shadow.model.name if shadow.model else None)
                worker = Reembedder(spaces, catalog, shadow, embedder, settings, heartbeat=heartbeat)
                report = await worker.run(stop)
                if report.switched:
                    logger.info("re-embed done: the store answers with %s now", embedder.identity.name)
            finally:
                release(embedder)

    task = asyncio.create_task(loop(), name="clipdex-reembed")
    try:
        yield
    finally:
        stop.set()
        await task
