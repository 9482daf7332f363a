"""The micro-batcher: batches close when full or when the first item has waited max_wait; nothing is lost."""

from __future__ import annotations

import asyncio
import time

import pytest

from indexer.batcher import MicroBatcher


async def test_a_full_batch_comes_out_at_once() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_size=3, max_wait_s=10)
    for i in range(5):
        await batcher.put(i)
    started = time.monotonic()
    assert await batcher.next_batch() == [0, 1, 2]
    assert time.monotonic() - started < 1
    assert batcher.pending() == 2


async def test_a_partial_batch_comes_out_after_max_wait() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_size=10, max_wait_s=0.15)
    await batcher.put(1)
    started = time.monotonic()
    assert await batcher.next_batch() == [1]
    assert 0.1 <= time.monotonic() - started < 2


async def test_items_arriving_within_max_wait_join_the_batch() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_size=10, max_wait_s=0.5)

    async def trickle() -> None:
        for i in range(3):
            await batcher.put(i)
            await asyncio.sleep(0.02)

    producer = asyncio.create_task(trickle())
    assert await batcher.next_batch() == [0, 1, 2]
    await producer


async def test_the_wait_for_a_first_item_has_no_time_limit() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(max_size=2, max_wait_s=0.01)

    async def late() -> None:
        await asyncio.sleep(0.1)
        await batcher.put("late")

    producer = asyncio.create_task(late())
    assert await batcher.next_batch() == ["late"]
    await producer


async def test_stop_ends_an_idle_wait_with_an_empty_batch() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_size=2, max_wait_s=1)
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, stop.set)
    assert await asyncio.wait_for(batcher.next_batch(stop), 5) == []


async def test_stop_does_not_drop_queued_items() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_size=2, max_wait_s=1)
    stop = asyncio.Event()
    stop.set()
    await batcher.put(7)
    assert await batcher.next_batch(stop) == [7]
    assert await batcher.next_batch(stop) == []


async def test_a_cancelled_wait_loses_no_item() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_size=5, max_wait_s=0.01)
    waiting = asyncio.create_task(batcher.next_batch(asyncio.Event()))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await batcher.put(1)
    assert await batcher.next_batch() == [1]


async def test_the_queue_is_bounded_so_a_fast_producer_waits() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_size=2, max_wait_s=0, capacity=2)
    await batcher.put(1)
    await batcher.put(2)
    blocked = asyncio.create_task(batcher.put(3))
    await asyncio.sleep(0.02)
    assert not blocked.done()
    assert await batcher.next_batch() == [1, 2]
    await asyncio.wait_for(blocked, 1)
    assert await batcher.next_batch() == [3]


def test_max_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_size"):
        MicroBatcher(max_size=0, max_wait_s=1)
