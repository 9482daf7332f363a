"""The write path: a micro-batch of records in, one durable store transaction out (implements `Sink`).

    records ─▶ resolve.plan ─▶ fetch + hash (pool, retries) ─▶ resolve.classify ─▶ decode ⇢ embed
            (dedup, versions)  (transient errors retried        (unchanged / reused   (embed.py: model off the
                                with backoff, then dead letters) / new)               loop; on a GPU, decoding
                                                                                      overlaps the encode)
            ─▶ writer.apply: upserts + deletes + dead letters in ONE transaction ─▶ BatchReport

`write` returns once the batch is durable, so the caller may then commit its source position. A bad item
is a dead letter and never makes `write` raise; a `StoreError` does, and the caller must stop without
committing (the batch replays, and a replay is idempotent). A transient failure is a dead letter that
the running indexer tries again later (`indexer.redeliver`: `retry_at` from the RetryPolicy); `write_due`
is how it does, under the same lock as every other write.

When a re-embed switches the store to another model while this pipeline runs, the store refuses the
batch (`ModelSwitched`, nothing written); the pipeline loads the store's new model (`follow`), and embeds
and writes the batch again with it (retried dead letters included: they are removed with its outcome).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from indexer.decode import Fetch, decode_and_preprocess, decode_pool, fetch_with_retries
from indexer.embed import Decode, decode_and_embed
from indexer.records import BatchReport, FailedRecord, Record, Redelivery, attempt_of
from indexer.redeliver import RetryPolicy
from indexer.resolve import Classified, Fetched, Work, classify, pending_ids, pending_products, plan
from shared.config import Settings
from shared.embedder import Embedder
from shared.errors import ItemError, ModelSwitched
from shared.fetch import FetchPolicy, fetch_bytes
from shared.images import decode_budget
from shared.roles import Failure, StoredState, Upsert, Writer
from shared.types import Embedding

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineOptions:
    max_pixels: int
    decode_memory_mb: int = 1024  # the process's decode budget (shared.images.decode_budget)
    decode_workers: int = 2
    fetch_workers: int = 8
    embed_batch: int = 16  # images per model call (embed_batch_for); decoding the next ones overlaps it
    fetch_retries: int = 3
    retry_backoff_s: float = 0.5  # doubled after each try
    redelivery: RetryPolicy = field(default_factory=RetryPolicy)  # of the dead letters of transient failures

    @classmethod
    def from_settings(cls, settings: Settings, *, device: str = "cpu") -> PipelineOptions:
        workers = settings.decode_workers or os.cpu_count() or 2
        return cls(
            max_pixels=settings.max_pixels,
            decode_memory_mb=settings.decode_memory_mb,
            decode_workers=workers,
            fetch_workers=max(8, 2 * workers),
            embed_batch=embed_batch_for(settings.batch_size, device),
            fetch_retries=settings.fetch_retries,
            redelivery=RetryPolicy.from_settings(settings),
        )

    def decoder(self, embedder: Embedder) -> Decode:
        """Bytes to this model's input tensor, within the pixel limit and the process's decode budget."""
        return functools.partial(
            decode_and_preprocess,
            max_pixels=self.max_pixels,
            preprocess=embedder.preprocess,
            input_side=max(embedder.image_size),
            budget=decode_budget(self.decode_memory_mb),
        )


def embed_batch_for(batch_size: int, device: str) -> int:
    """Images per model call.

    On a GPU, a quarter of the micro-batch (at least 32): the CPU decodes the next quarters while the GPU
    encodes, and decoding is what bounds a GPU. On the CPU, the whole micro-batch: the model already
    keeps every core busy, so overlapping the decode buys nothing, and small batches lose most when the
    cores are shared (ViT-B-32 on 2 busy cores: 5.3 images/s in batches of 16, 7.2 in 32, 8.5 in 64;
    on 2 idle cores, batches of 8 to 64 are within 10% of each other, 21 to 24 images/s).
    """
    if device == "cuda":
        return min(batch_size, max(32, batch_size // 4))
    return batch_size


Follow = Callable[[Embedder], Embedder]  # the store's active model, given the one a write was refused for


class Pipeline:
    """One writer. `write` calls are serialised; the model runs in one dedicated thread."""

    def __init__(
        self,
        writer: Writer,
        embedder: Embedder,
        fetch: Fetch,
        options: PipelineOptions,
        *,
        follow: Follow | None = None,
    ) -> None:
        self.writer = writer
        self.options = options
        self._fetch = fetch
        self._follow = follow
        self._use(embedder)
        self._fetch_pool = ThreadPoolExecutor(options.fetch_workers, thread_name_prefix="clipdex-fetch")
        self._decode_pool = decode_pool(options.decode_workers)
        self._model_pool = ThreadPoolExecutor(1, thread_name_prefix="clipdex-embed")
        self._lock = asyncio.Lock()
        self.model_calls = 0  # totals, for tests and benchmarks
        self.images_embedded = 0

    @classmethod
    def from_settings(
        cls,
        writer: Writer,
        embedder: Embedder,
        settings: Settings,
        *,
        roots: Sequence[Path] = (),
        follow: Follow | None = None,
    ) -> Pipeline:
        """Paths may resolve under CLIPDEX_ALLOWED_ROOTS and `roots` (the watched folder)."""
        policy = FetchPolicy.from_settings(settings, extra_roots=roots)
        return cls(
            writer,
            embedder,
            functools.partial(fetch_bytes, policy=policy),
            PipelineOptions.from_settings(settings, device=embedder.device.type),
            follow=follow,
        )

    def _use(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self._decode = self.options.decoder(embedder)

    def close(self) -> None:
        for pool in (self._fetch_pool, self._decode_pool, self._model_pool):
            pool.shutdown(wait=True, cancel_futures=True)

    # -- the sink -------------------------------------------------------------------------------------------

    async def write(self, records: Sequence[Record]) -> BatchReport:
        async with self._lock:
            return await self._write_all(records)

    async def write_due(self, read: Callable[[], Sequence[Record]]) -> BatchReport | None:
        """Read records (the dead letters due for a retry) and write them, both under the write lock, so
        that no other write of this process comes between the read and the write."""
        async with self._lock:
            records = await asyncio.to_thread(read)
            return await self._write_all(records) if records else None

    async def _write_all(self, records: Sequence[Record], rounds: int = 3) -> BatchReport:
        """Write; the records of items that changed while they were read (another writer) again."""
        report = await self._write(records)
        for _ in range(rounds - 1):
            if not report.conflicted:
                break
            again = await self._write(_records_of(report.conflicted))
            report.merge(again)
        if report.conflicted:  # still changing under us after three rounds: try later, as for a timeout
            failed = [_changing(w) for w in report.conflicted]
            await asyncio.to_thread(self.writer.apply, failures=[self._dead_letter(f) for f in failed])
            report.failed += len(failed)
            report.failures += failed
            report.conflicted = []
        return report

    async def _write(self, records: Sequence[Record]) -> BatchReport:
        started = time.perf_counter()
        report = BatchReport(records=len(records))
        if not records:
            return report
        stored = await asyncio.to_thread(self._stored, records)
        batch = plan(records, stored)
        report.skipped, report.superseded = len(batch.skipped), batch.superseded
        failures = list(batch.invalid)

        fetched: list[Fetched] = []
        for outcome in await asyncio.gather(*(self._fetch_one(w) for w in batch.upserts)):
            if isinstance(outcome, Fetched):
                fetched.append(outcome)
            else:
                failures.append(outcome)
        lookup = [f.sha256 for f in fetched if not _same_content(f)]
        known = await asyncio.to_thread(self.writer.embeddings_by_sha, lookup) if lookup else {}
        sorted_ = classify(fetched, known)

        vectors, decode_failures = await self._embed(sorted_, report)
        upserts = [_upsert(f, None) for f in sorted_.unchanged]
        upserts += [_upsert(f, vector) for f, vector in sorted_.reused]
        for item in [*sorted_.to_embed, *sorted_.copies]:
            if item.sha256 in vectors:
                upserts.append(_upsert(item, vectors[item.sha256]))
            else:
                failures.append(_failure(item.work, decode_failures[item.sha256], item.tries))

        write_started = time.perf_counter()
        dead_letters = [self._dead_letter(f) for f in failures]
        # a letter read again as several records (a Debezium rename: a delete and an upsert) is one id
        retried = sorted({r.position.dead_letter for r in records if isinstance(r.position, Redelivery)})
        try:
            result = await asyncio.to_thread(self.writer.apply, upserts, batch.store_deletes, dead_letters, retried)
        except ModelSwitched as exc:
            if self._follow is None:
                raise
            logger.info("%s: loading the store's model, then writing the batch again", exc)
            self._use(await asyncio.to_thread(self._follow, self.embedder))
            return await self._write(records)
        report.write_ms = (time.perf_counter() - write_started) * 1000

        changed = set(result.conflicts)
        report.conflicted = [w for w in batch.upserts if w.item_id in changed]
        report.indexed = max(0, result.indexed - len(sorted_.reused))
        report.unchanged = len(sorted_.unchanged) - len(changed)
        report.reused = len(sorted_.reused)
        report.deleted = result.deleted
        report.skipped += result.skipped
        report.failed = len(failures)
        report.failures = failures
        report.total_ms = (time.perf_counter() - started) * 1000
        logger.debug("wrote batch records=%d %s total_ms=%.0f", report.records, report.log_fields(), report.total_ms)
        return report

    def _dead_letter(self, failed: FailedRecord) -> Failure:
        """The failure as stored: a transient one with the time the indexer tries it again."""
        retry_at = self.options.redelivery.next_retry(attempt_of(failed.record), datetime.now(UTC))
        return failed.dead_letter(retry_at if failed.retriable else None)

    # -- stages ---------------------------------------------------------------------------------------------

    def _stored(self, records: Sequence[Record]) -> dict[str, StoredState]:
        """What the store holds for the batch's ids, and for every stored image of its products."""
        stored = self.writer.states(pending_ids(records))
        products = pending_products(records)
        if products:
            stored.update(self.writer.product_images(products))
        return stored

    async def _fetch_one(self, work: Work) -> Fetched | FailedRecord:
        """Read and hash one image; a transient failure is retried with backoff, then dead-lettered."""
        outcome, tries = await fetch_with_retries(
            self._fetch_pool,
            self._fetch,
            work.uri,
            retries=self.options.fetch_retries,
            backoff_s=self.options.retry_backoff_s,
            name=work.item_id,
        )
        if isinstance(outcome, ItemError):
            return _failure(work, outcome, tries)
        data, sha = outcome
        return Fetched(work, data, sha, tries)

    async def _embed(
        self, sorted_: Classified, report: BatchReport
    ) -> tuple[dict[str, Embedding], dict[str, ItemError]]:
        """Embeddings of the new contents, by hash, and why the others could not be decoded."""
        if not sorted_.to_embed:
            return {}, {}
        done = await decode_and_embed(
            [(f.sha256, f.data) for f in sorted_.to_embed],
            self._decode,
            self.embedder.encode_images,
            decode_pool=self._decode_pool,
            model_pool=self._model_pool,
            sub_batch=self.options.embed_batch,
            pin_memory=self.embedder.device.type == "cuda",
        )
        report.decode_ms, report.embed_ms = done.decode_ms, done.embed_ms
        self.model_calls += done.model_calls
        self.images_embedded += len(done.vectors)
        return done.vectors, done.failures


def _same_content(item: Fetched) -> bool:
    stored = item.work.stored
    return stored is not None and stored.has_vector and stored.sha256 == item.sha256


def _upsert(item: Fetched, vector: Embedding | None) -> Upsert:
    work = item.work
    return Upsert(
        id=work.item_id,
        source=work.record.source,
        uri=work.uri,
        sha256=item.sha256,
        metadata=dict(work.event.metadata),
        embedding=vector,
        version=work.event.version,
    )


def _failure(work: Work, exc: ItemError, tries: int) -> FailedRecord:
    return FailedRecord(
        work.record, f"{type(exc).__name__}: {exc}", work.item_id, tries, uri=work.event.uri, retriable=exc.retriable
    )


def _changing(work: Work) -> FailedRecord:
    """An item another writer kept changing while its event was indexed: tried again later, as a timeout."""
    return FailedRecord(work.record, _CHANGING, work.item_id, uri=work.event.uri, retriable=True)


def _records_of(works: Sequence[Work]) -> list[Record]:
    """The records of these items, each once (a product's images share its record), in order."""
    return list({id(w.record): w.record for w in works}.values())


_CHANGING = "ItemChanged: the item changed in the store while this event was indexed; tried again later"
