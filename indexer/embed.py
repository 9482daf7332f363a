"""Embed: decoding overlapped with the model, which runs in its own thread, off the event loop.

    decode pool ─▶ [ window of decoded images (bounded) ] ─▶ model thread: sub-batch k
        (decoding sub-batches k+1, k+2 while the model encodes k)     │ the model raised:
                                                                      └▶ each image of k alone

An image that fails to decode, or that the model fails on (alone), is a failure of that image only; the
rest of the micro-batch is embedded.

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

from shared.errors import EmbedFailed, ImageRejected, ItemError
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

    async def embed(keys: list[K], tensors: list[torch.Tensor]) -> None:
        try:
            vectors, ms = await loop.run_in_executor(model_pool, run_model, tensors)
            embedded = list(zip(keys, vectors, strict=True))
        except Exception as exc:  # one odd image (or a flaky device) must not cost the whole batch
            if len(tensors) == 1:
                logger.warning("the model failed on one image: %s: %s", type(exc).__name__, exc)
                out.failures[keys[0]] = EmbedFailed(f"the model failed on this image: {type(exc).__name__}: {exc}")
                return
            logger.warning("the model failed on %d images (%s); trying them one at a time", len(tensors), exc)
            for key, tensor in zip(keys, tensors, strict=True):
                await embed([key], [tensor])
            return
        out.embed_ms += ms
        out.model_calls += 1
        out.vectors.update(embedded)

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
            if tensors:
                await embed(keys, tensors)
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
