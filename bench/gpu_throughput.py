"""End-to-end indexing throughput on a GPU, from JPEG bytes: decode overlapped with the encode, fp16, pinned memory.

    python bench/gpu_throughput.py            # ViT-B-32 (random weights) on CUDA: 4096 JPEGs of 800x600
    python bench/gpu_throughput.py --quick    # anywhere (CPU, the tiny test model): proves the script still works

It runs the indexer's own embedding stage (`indexer.embed.decode_and_embed`, with
`indexer.decode.decode_and_preprocess` in a thread pool and the shared `Embedder`, which picks fp16 on
CUDA and copies each batch from pinned memory) over JPEG bytes held in memory, so disk speed does not
count. It prints, in images/s:

- end to end: bytes -> decode + preprocess (CPU pool) -> pinned batch -> GPU encode -> vectors on the host;
- encode only: preprocessed batches, the model alone (the ceiling);
- decode only: the pool alone (the other ceiling; on a GPU this is usually the lower one);
- with --gpu-decode: nvJPEG decode and resize on the GPU (torchvision.io.decode_jpeg) -> encode, which shows
  what the device does when the CPU is taken out of the loop (not the indexer's path).

Random weights cost the same as trained ones, so the figures hold for real models. Not part of the test run.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script from anywhere

from clipdex.synthetic import generate
from indexer.decode import decode_and_preprocess, decode_pool
from indexer.embed import decode_and_embed
from shared.embedder import Embedder, ModelSpec

TINY_CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "configs"
MAX_PIXELS = 64_000_000


def jpeg_bytes(unique: int, width: int, height: int) -> list[bytes]:
    out = []
    for sample in generate(unique, seed=5, size=(width, height)):
        buf = io.BytesIO()
        sample.image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def indexer_decode(embedder: Embedder) -> Callable[[bytes], torch.Tensor]:
    """Decode + preprocess as the pipeline does: toward the model's input side (JPEG draft, reduce)."""
    return functools.partial(
        decode_and_preprocess,
        max_pixels=MAX_PIXELS,
        preprocess=embedder.preprocess,
        input_side=max(embedder.image_size),
    )


def sync(embedder: Embedder) -> None:
    if embedder.device.type == "cuda":
        torch.cuda.synchronize()


def end_to_end(embedder: Embedder, datas: list[bytes], batch: int, workers: int) -> float:
    decode = indexer_decode(embedder)
    items = list(enumerate(datas))

    async def go() -> int:
        with decode_pool(workers) as pool, ThreadPoolExecutor(1, thread_name_prefix="clipdex-embed") as model_pool:
            out = await decode_and_embed(
                items,
                decode,
                embedder.encode_images,
                decode_pool=pool,
                model_pool=model_pool,
                sub_batch=batch,
                window=max(2 * batch, 4 * workers),
                pin_memory=embedder.device.type == "cuda",
            )
        assert not out.failures, out.failures
        return len(out.vectors)

    started = time.perf_counter()
    done = asyncio.run(go())
    sync(embedder)
    return done / (time.perf_counter() - started)


def encode_only(embedder: Embedder, datas: list[bytes], batch: int, rounds: int) -> float:
    decode = indexer_decode(embedder)
    tensors = torch.stack([decode(d) for d in datas[:batch]])
    device_batch = tensors.to(embedder.device, embedder.dtype)
    embedder.encode_images(device_batch)  # warm up (kernels, autotuning)
    sync(embedder)
    started = time.perf_counter()
    for _ in range(rounds):
        embedder.encode_images(device_batch)
    sync(embedder)
    return rounds * batch / (time.perf_counter() - started)


def decode_only(embedder: Embedder, datas: list[bytes], workers: int) -> float:
    decode = indexer_decode(embedder)
    with decode_pool(workers) as pool:
        started = time.perf_counter()
        for _ in pool.map(decode, datas, chunksize=8):
            pass
        return len(datas) / (time.perf_counter() - started)


def gpu_decode(embedder: Embedder, datas: list[bytes], batch: int) -> float | None:
    """nvJPEG on the GPU, resize + crop + normalise there too, then the model."""
    if embedder.device.type != "cuda":
        return None
    import torchvision.transforms.v2.functional as TF
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from torchvision.io import decode_jpeg

    side = embedder.image_size
    mean = torch.tensor(OPENAI_DATASET_MEAN, device="cuda", dtype=embedder.dtype).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, device="cuda", dtype=embedder.dtype).view(1, 3, 1, 1)
    raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]

    def run(chunk: list[torch.Tensor]) -> None:
        images = decode_jpeg(chunk, device="cuda")
        crops = [TF.center_crop(TF.resize(img, [side[0]], antialias=True), list(side)) for img in images]
        x = (torch.stack(crops).to(embedder.dtype) / 255 - mean) / std
        with torch.inference_mode():
            embedder.model.encode_image(x)

    run(raw[:batch])  # warm up
    sync(embedder)
    started = time.perf_counter()
    for i in range(0, len(raw), batch):
        run(raw[i : i + batch])
    sync(embedder)
    return len(raw) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU, tiny model, 64 small images")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    parser.add_argument("--n", type=int, default=4096, help="images per end-to-end run")
    parser.add_argument("--unique", type=int, default=256, help="distinct JPEGs generated (cycled up to --n)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 4, help="decode threads")
    parser.add_argument("--width", type=int, default=800)
    parser.add_argument("--height", type=int, default=600)
    parser.add_argument("--gpu-decode", action="store_true", help="also measure nvJPEG decode on the GPU")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.device, args.n, args.unique, args.batch = "clipdex-tiny", "cpu", 64, 16, 16
        args.width, args.height, args.workers = 160, 120, 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = ModelSpec(
        args.model, None, TINY_CONFIGS if args.model == "clipdex-tiny" else None, args.device, args.precision
    )
    embedder = Embedder(spec)
    embedder.load()
    unique = jpeg_bytes(args.unique, args.width, args.height)
    datas = [unique[i % len(unique)] for i in range(args.n)]
    end_to_end(embedder, datas[: args.batch], args.batch, args.workers)  # warm up
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "gpu": torch.cuda.get_device_name(0) if embedder.device.type == "cuda" else None,
        "model": f"{args.model} (random weights)",
        "device": str(embedder.device),
        "dtype": str(embedder.dtype).removeprefix("torch."),
        "images": f"{args.n} JPEGs {args.width}x{args.height} ({len(datas[0]) // 1024} KB)",
        "batch": args.batch,
        "decode_workers": args.workers,
        "end_to_end_img_s": round(end_to_end(embedder, datas, args.batch, args.workers), 1),
        "encode_only_img_s": round(encode_only(embedder, datas, args.batch, max(2, args.n // args.batch)), 1),
        "decode_only_img_s": round(decode_only(embedder, datas, args.workers), 1),
    }
    if args.gpu_decode:
        gpu = gpu_decode(embedder, datas, args.batch)
        result["gpu_decode_end_to_end_img_s"] = None if gpu is None else round(gpu, 1)
    embedder.close()
    print(
        f"{result['model']} on {result['gpu'] or result['device']} ({result['dtype']}), {result['images']}, "
        f"batch {args.batch}, {args.workers} decode threads:\n"
        f"  end to end   {result['end_to_end_img_s']:9.1f} images/s\n"
        f"  encode only  {result['encode_only_img_s']:9.1f} images/s\n"
        f"  decode only  {result['decode_only_img_s']:9.1f} images/s"
        + (f"\n  nvJPEG path  {result.get('gpu_decode_end_to_end_img_s')} images/s" if args.gpu_decode else "")
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
