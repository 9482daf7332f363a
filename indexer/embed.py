"""Embed: decoding overlapped with the model, which runs in its own thread, off the event loop.

    decode pool ─▶ [ window of decoded images (bounded) ] ─▶ model thread: sub-batch k
        (decoding sub-batches k+1, k+2 while the model encodes k)

Decoding is submitted item by item, at most `window` ahead of the model, and consumed in order, so the
model waits on decoding only for the first sub-batch of a micro-batch, and memory stays bounded. The
event loop only awaits: a Kafka consumer's heartbeats and an HTTP server in the same process keep going.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from shared.errors import ImageRejected, ItemError
from shared.types import Embedding

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

Decode = Callable[[bytes], torch.Tensor]
Encode = Callable[[torch.Tensor], Embedding]


@dataclass
class Embedded(Generic[K]):
    vectors: dict[K, Embedding] = field(default_factory=dict)
    failures: dict[K, ItemError] = field(default_factory=dict)
    decode_ms: float = 0.0  # summed over the decode threads
    embed_ms: float = 0.0  # time in the model
    model_calls: int = 0


async def decode_and_embed(
    items: Sequence[tuple[K, bytes]],
    decode: Decode,
    encode: Encode,
    *,
    decode_pool: Executor,
    model_pool: Executor,
    sub_batch: int,
    window: int | None = None,
    pin_memory: bool = False,
) -> Embedded[K]:
    """Decode every item in `decode_pool` and encode them in sub-batches in `model_pool`."""
    loop = asyncio.get_running_loop()
    out: Embedded[K] = Embedded()
    ahead = max(window or 2 * sub_batch, sub_batch)
    queue: deque[tuple[K, asyncio.Future[tuple[torch.Tensor | ItemError, float]]]] = deque()
    todo = iter(items)

    def top_up() -> None:
        while len(queue) < ahead:
            nxt = next(todo, None)
            if nxt is None:
                return
            key, data = nxt
            queue.append((key, loop.run_in_executor(decode_pool, _decode_one, decode, data)))

    def run_model(tensors: list[torch.Tensor]) -> tuple[Embedding, float]:
        started = time.perf_counter()
        batch = torch.stack(tensors)
        if pin_memory:
            batch = batch.pin_memory()  # lets the copy to the GPU overlap (non_blocking)
        vectors = encode(batch)
        return vectors, (time.perf_counter() - started) * 1000

    top_up()
    try:
        while queue:
            chunk = [queue.popleft() for _ in range(min(sub_batch, len(queue)))]
            top_up()  # the pool decodes the next sub-batches while this one waits and encodes
            keys: list[K] = []
            tensors: list[torch.Tensor] = []
            for key, future in chunk:
                result, ms = await future
                out.decode_ms += ms
                if isinstance(result, ItemError):
                    out.failures[key] = result
                else:
                    keys.append(key)
                    tensors.append(result)
            if not tensors:
                continue
            vectors, ms = await loop.run_in_executor(model_pool, run_model, tensors)
            out.embed_ms += ms
            out.model_calls += 1
            out.vectors.update(zip(keys, vectors, strict=True))
    finally:
        for _, future in queue:  # on an error or a cancellation: drop the decoding not yet started
            future.cancel()
    return out


def _decode_one(decode: Decode, data: bytes) -> tuple[torch.Tensor | ItemError, float]:
    started = time.perf_counter()
    try:
        result: torch.Tensor | ItemError = decode(data)
    except ItemError as exc:
        result = exc
    except Exception as exc:  # a decoder bug on one odd file must not stop the batch
        logger.warning("unexpected error decoding an image", exc_info=True)
        result = ImageRejected(f"cannot decode the image: {type(exc).__name__}: {exc}")
    return result, (time.perf_counter() - started) * 1000
