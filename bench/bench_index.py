"""Bulk folder indexing throughput, as ratios measured in one run on the same images and the same model.

    python -m bench.bench_index            # 192 generated 800x600 JPEGs, ViT-B-32 random weights (minutes)
    python -m bench.bench_index --quick    # 24 images, the tiny test model: a smoke run (seconds)

Three figures, one process, the same images and model, interleaved batch by batch: before each micro-batch
the real indexer writes, the bench measures the model alone on 64 images and the seed loop on a few, so
each comparison is between neighbours in time (the machine is shared; a busy spell of another process
then hits both sides of a ratio alike). The ratios reported are medians over the batches.
- encode only: images decoded and preprocessed beforehand, then the model on batches of 64 (the ceiling),
  called from a worker thread as the pipeline calls it;
- seed loop: open, preprocess, encode, one image at a time (what the seed project did);
- clipdex index: the real write path (FolderSource.index_once over the Pipeline): scan, read, hash, decode
  + preprocess in the pool, the model, one SQLite transaction per micro-batch; from files on disk to
  durable rows. Its throughput counts the scan and the writes, not the bench's own measurements between
  them. Model loading is excluded from every figure.

With `--runtime onnx --precision int8` the indexer and "encode only" run on ONNX Runtime, and the bench
also measures torch fp32 alone on the same batches ("torch encode only"; the seed loop always runs on
torch fp32, as the seed did), so the runtime's gain is a ratio between neighbours in time too.

Targets: clipdex index >= 0.85 x encode only, and >= 1.8 x the seed loop; with ONNX int8, >= 1.5 x torch
and >= 2.5 x the seed loop. Not part of the test run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from clipdex.synthetic import write_folder
from indexer.pipeline import Pipeline
from indexer.records import BatchReport, Record
from indexer.sources.folder import Folder, FolderSource
from shared.config import Settings, load_settings
from shared.embedder import Embedder
from shared.images import decode_image
from shared.sqlite.store import SqliteStore

TINY_CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "configs"


def make_settings(data_dir: Path, root: Path, args: argparse.Namespace) -> Settings:
    return load_settings(
        data_dir=data_dir,
        model=args.model,
        pretrained="none",
        model_configs=TINY_CONFIGS if args.model == "clipdex-tiny" else None,
        device=args.device,
        runtime=args.runtime,
        precision=args.precision,
        model_cache_dir=args.cache_dir,
        allowed_roots=[str(root)],
        batch_size=args.batch_size,
    )


def images(root: Path, n: int, size: tuple[int, int]) -> list[Path]:
    found = sorted(root.glob("*.jpg"))
    if len(found) < n:
        write_folder(root, n - len(found), seed=7, size=size, start=len(found))
        found = sorted(root.glob("*.jpg"))
    return found[:n]


def encode_only(embedder: Embedder, tensors: list[torch.Tensor], batch: int) -> float:
    """The model alone, called from a worker thread as the pipeline calls it."""

    def go() -> None:
        for i in range(0, len(tensors), batch):
            embedder.encode_images(torch.stack(tensors[i : i + batch]))

    with ThreadPoolExecutor(1) as model_thread:
        started = time.perf_counter()
        model_thread.submit(go).result()
        return len(tensors) / (time.perf_counter() - started)


def seed_loop(embedder: Embedder, paths: list[Path]) -> float:
    started = time.perf_counter()
    for path in paths:
        with Image.open(path) as img:
            tensor = embedder.preprocess(img.convert("RGB"))
        embedder.encode_images(tensor.unsqueeze(0))
    return len(paths) / (time.perf_counter() - started)


class Interleaved:
    """The pipeline as a sink, with the model alone and the seed loop measured just before each batch."""

    def __init__(
        self,
        pipeline: Pipeline,
        embedder: Embedder,
        tensors: list[torch.Tensor],
        seed_paths: list[Path],
        torch_embedder: Embedder,
    ):
        self.pipeline = pipeline
        self.embedder = embedder
        self.torch_embedder = torch_embedder  # the baseline: torch fp32, as the seed ran
        self.tensors = tensors
        self.seed_paths = seed_paths
        self.rows: list[dict[str, float]] = []
        self.measuring_s = 0.0

    async def write(self, records: Sequence[Record]) -> BatchReport:
        started = time.perf_counter()
        encode = encode_only(self.embedder, self.tensors, len(self.tensors))
        torch_encode = encode
        if self.torch_embedder is not self.embedder:
            torch_encode = encode_only(self.torch_embedder, self.tensors, len(self.tensors))
        seed = seed_loop(self.torch_embedder, self.seed_paths)
        self.measuring_s += time.perf_counter() - started
        started = time.perf_counter()
        report = await self.pipeline.write(records)
        index = len(records) / (time.perf_counter() - started)
        self.rows.append(
            {
                "records": len(records),
                "encode_only": encode,
                "torch_encode_only": torch_encode,
                "seed_loop": seed,
                "clipdex_index": index,
            }
        )
        return report


async def clipdex_index(
    embedder: Embedder,
    settings: Settings,
    root: Path,
    tensors: list[torch.Tensor],
    seed_paths: list[Path],
    torch_embedder: Embedder,
) -> dict[str, Any]:
    with SqliteStore(settings.db_path, vector_dtype=settings.vector_dtype) as store:
        store.bind_model(embedder.identity)
        pipeline = Pipeline.from_settings(store, embedder, settings, roots=[root])
        try:
            sink = Interleaved(pipeline, embedder, tensors, seed_paths, torch_embedder)
            folder = Folder(root, store.register_folder(str(root)))
            summary = await FolderSource.from_settings(folder, sink, store, store.rename_items, settings).index_once()
        finally:
            pipeline.close()
    assert summary.failed == 0, summary.failures
    seconds = summary.seconds - sink.measuring_s
    return {"img_s": (summary.indexed + summary.reused) / seconds, "seconds": seconds, "batches": sink.rows}


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="clipdex-bench-index-"))
    root = work / "images"
    paths = images(root, args.images, (args.width, args.height))
    data = work / "data"
    settings = make_settings(data, root, args)
    embedder = Embedder.from_settings(settings)
    embedder.load()
    torch_embedder = embedder
    if (embedder.runtime, embedder.precision) != ("torch", "fp32") and args.device == "cpu":
        torch_embedder = Embedder.from_settings(settings.model_copy(update={"runtime": "torch", "precision": "fp32"}))
        torch_embedder.load()

    sample = paths[: args.batch_size]
    tensors = [embedder.preprocess(decode_image(p.read_bytes(), max_pixels=settings.max_pixels)) for p in sample]
    encode_only(embedder, tensors[:8], 8)  # warm up: the first calls allocate
    encode_only(torch_embedder, tensors[:8], 8)
    runs = []
    for _ in range(args.rounds):
        shutil.rmtree(data, ignore_errors=True)
        seed_paths = paths[-args.seed_images :]
        runs.append(asyncio.run(clipdex_index(embedder, settings, root, tensors, seed_paths, torch_embedder)))
    full = [row for r in runs for row in r["batches"] if row["records"] == args.batch_size]
    rows = full or [row for r in runs for row in r["batches"]]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "device": str(embedder.device),
        "model": f"{args.model} (random weights), {embedder.runtime} {embedder.precision}",
        "images": f"{len(paths)} JPEGs {args.width}x{args.height}",
        "batch_size": args.batch_size,
        "clipdex_index_img_s": round(max(r["img_s"] for r in runs), 2),
        "encode_only_img_s": round(statistics.median(r["encode_only"] for r in rows), 2),
        "torch_fp32_encode_only_img_s": round(statistics.median(r["torch_encode_only"] for r in rows), 2),
        "seed_loop_img_s": round(statistics.median(r["seed_loop"] for r in rows), 2),
        "ratio_to_torch_encode_only": round(
            statistics.median(r["clipdex_index"] / r["torch_encode_only"] for r in rows), 2
        ),
        "ratio_to_encode_only": round(statistics.median(r["clipdex_index"] / r["encode_only"] for r in rows), 3),
        "ratio_to_seed_loop": round(statistics.median(r["clipdex_index"] / r["seed_loop"] for r in rows), 2),
        "batches": [{k: round(v, 2) for k, v in row.items()} for row in rows],
        "load_average": os.getloadavg()[0],
    }
    embedder.close()
    torch_embedder.close()
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="24 images, the tiny test model: a smoke run")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--runtime", default="torch", choices=["auto", "torch", "onnx"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "int8"])
    parser.add_argument("--cache-dir", default=None, help="CLIPDEX_MODEL_CACHE_DIR (ONNX exports)")
    parser.add_argument("--images", type=int, default=192, help="a multiple of the batch size")
    parser.add_argument("--seed-images", type=int, default=8, help="images in each one-at-a-time measurement")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="index the folder this many times (fresh store)")
    parser.add_argument("--width", type=int, default=800)
    parser.add_argument("--height", type=int, default=600)
    parser.add_argument("--work-dir", help="keep the generated images here (reused by the next run)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.images, args.seed_images, args.rounds, args.batch_size = "clipdex-tiny", 24, 4, 1, 8
        args.width, args.height = 200, 150
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args)
    if not args.json:
        r = result
        print(
            f"{r['model']} on {r['device']}, {r['images']}, batch {r['batch_size']}\n"
            f"  encode only     {r['encode_only_img_s']:8.2f} images/s\n"
            f"  seed loop       {r['seed_loop_img_s']:8.2f} images/s\n"
            f"  clipdex index   {r['clipdex_index_img_s']:8.2f} images/s\n"
            f"  per batch (median): clipdex index = {r['ratio_to_encode_only']:.3f} x encode only (target >= 0.85), "
            f"{r['ratio_to_seed_loop']:.2f} x seed loop (target >= 1.8)"
        )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
