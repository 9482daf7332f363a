"""The micro-batcher: items in one at a time, batches out by size or by time, whichever comes first.

    put(a) put(b) ........ put(c) put(d) put(e)
    └─ next_batch() waits for the first item, then at most `max_wait_s` for more, and returns
       as soon as it holds `max_size` items: [a, b] (timed out), [c, d] (full, max_size=2), ...

The queue in front of it is bounded, so a fast producer (a folder scan) waits for the indexer instead of
holding a whole folder in memory.
"""

from __future__ import annotations

import asyncio
import time
from typing import Generic, TypeVar

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    def __init__(self, max_size: int, max_wait_s: float, *, capacity: int | None = None) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.max_size = max_size
        self.max_wait_s = max(0.0, max_wait_s)
        self._queue: asyncio.Queue[T] = asyncio.Queue(capacity if capacity is not None else 4 * max_size)

    async def put(self, item: T) -> None:
        """Add one item; waits while the queue is full."""
        await self._queue.put(item)

    def pending(self) -> int:
        return self._queue.qsize()

    async def next_batch(self, stop: asyncio.Event | None = None) -> list[T]:
        """The next batch: waits for a first item (or returns [] once `stop` is set and nothing is queued),
        then for more until `max_size` items or `max_wait_s` after the first."""
        first = await self._first(stop)
        if first is None:
            return []
        batch = [first[0]]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (stop is not None and stop.is_set()):
                break
            try:
                async with asyncio.timeout(remaining):
                    batch.append(await self._queue.get())
            except TimeoutError:
                break
        return batch

    async def _first(self, stop: asyncio.Event | None) -> tuple[T] | None:
        try:
            return (self._queue.get_nowait(),)
        except asyncio.QueueEmpty:
            pass
        if stop is None:
            return (await self._queue.get(),)
        if stop.is_set():
            return None
        getter = asyncio.ensure_future(self._queue.get())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not getter.done():
                getter.cancel()  # an item not yet taken stays in the queue
        if getter.done() and not getter.cancelled():
            return (getter.result(),)
        return None
