"""Re-embedding: its throughput against indexing with the same model, and what the switch costs at scale.

    python -m bench.bench_reembed            # 96 generated JPEGs to ViT-B-32 (random weights), 100k items
    python -m bench.bench_reembed --quick    # 48 JPEGs, tiny -> tiny-16, 20k items (seconds)

1. Throughput, as a ratio in one run: the same folder is indexed from scratch with model B (`clipdex
   index`'s code path: scan, read, hash, decode, embed, write) and re-embedded to model B from a store
   indexed with model A (`clipdex reembed`'s: pending scan, read, hash, decode, embed, write), alternately,
   `--rounds` times. Model loading is excluded; the re-embed's time includes its final switch.
2. The store at scale (synthetic vectors, no model): N live items with vectors in the active space, a
   shadow space filled with another dimension; the time of one `pending` call (the re-embed's scan, at the
   start and when nothing is left), of `coverage` (status), of the switch transaction (writers wait this
   long: it counts what is still pending inside the transaction), and of dropping the old space afterwards
   (in chunks; writers wait one chunk at most).

Not part of the test run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from clipdex.synthetic import write_folder
from indexer import service
from shared.config import Settings, load_settings
from shared.roles import SpaceVector, Upsert
from shared.sqlite.spaces import SqliteSpaces
from shared.sqlite.store import SqliteStore
from shared.types import ModelIdentity

TINY_CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "configs"


def model_settings(data_dir: Path, model: str, args: argparse.Namespace) -> Settings:
    tiny = model.startswith("clipdex-tiny")
    return load_settings(
        data_dir=data_dir,
        model=model,
        pretrained="none",
        model_configs=TINY_CONFIGS if tiny else None,
        device="cpu",
        batch_size=args.batch_size,
        reembed_grace_s=0,
    )


async def index_seconds(settings: Settings, root: Path) -> float:
    summary = await service.index_folder(settings, root)
    return summary.seconds


async def reembed_seconds(settings: Settings) -> float:
    report = await service.reembed(settings, asyncio.Event())
    assert report is not None and report.switched, report
    return report.seconds


def throughput(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    root = work / "images"
    write_folder(root, args.images, seed=5, size=(800, 600) if not args.quick else 128)
    rows = []
    for round_ in range(args.rounds):
        # B from scratch
        index_s = asyncio.run(index_seconds(model_settings(work / f"fresh-{round_}", args.model_b, args), root))
        # A, then re-embedded to B; the A indexing is not measured
        data = work / f"moved-{round_}"
        asyncio.run(index_seconds(model_settings(data, args.model_a, args), root))
        reembed_s = asyncio.run(reembed_seconds(model_settings(data, args.model_b, args)))
        rows.append(
            {
                "index_img_s": args.images / index_s,
                "reembed_img_s": args.images / reembed_s,
                "ratio": index_s / reembed_s,
            }
        )
        print(f"  round {round_ + 1}: {json.dumps({k: round(v, 2) for k, v in rows[-1].items()})}", flush=True)
    return {
        "images": args.images,
        "model_a": args.model_a,
        "model_b": args.model_b,
        "rounds": rows,
        "median_ratio": statistics.median(r["ratio"] for r in rows),
    }


def at_scale(n: int, work: Path) -> dict[str, Any]:
    old = ModelIdentity("old", "none", 64, "a" * 32)
    new = ModelIdentity("new", "none", 32, "b" * 32)
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"items": n}
    with SqliteStore(work / f"scale-{n}.sqlite3") as store:
        store.bind_model(old)
        started = time.perf_counter()
        for start in range(0, n, 5_000):
            vecs = rng.standard_normal((min(5_000, n - start), 64)).astype(np.float32)
            store.apply(
                [Upsert(f"kafka:{start + i:08d}", "kafka", "u", f"h{start + i}", {}, v) for i, v in enumerate(vecs)]
            )
        out["fill_s"] = round(time.perf_counter() - started, 1)
        spaces = SqliteSpaces(store)
        shadow = spaces.create_shadow(new, None)
        out["pending_first_ms"] = round(timed_ms(lambda: spaces.pending(shadow.id, limit=64)), 2)
        started = time.perf_counter()
        after = ""
        while batch := spaces.pending(shadow.id, after=after, limit=1_000):
            after = batch[-1].id
            spaces.add_vectors(shadow.id, [SpaceVector(p, p.sha256 or "", vec(rng, 32)) for p in batch])
        out["fill_shadow_s"] = round(time.perf_counter() - started, 1)
        out["pending_none_left_ms"] = round(timed_ms(lambda: spaces.pending(shadow.id, limit=64)), 1)
        out["coverage_ms"] = round(timed_ms(lambda: store.coverage(shadow.id)), 1)
        switched: list[bool] = []
        out["switch_ms"] = round(timed_ms(lambda: switched.append(spaces.switch(shadow.id))), 1)
        assert switched == [True]
        out["drop_old_space_s"] = round(timed_ms(lambda: spaces.drop_spaces(grace_s=0)) / 1000, 2)
    return out


def vec(rng: np.random.Generator, dim: int) -> np.ndarray:
    x = rng.standard_normal(dim).astype(np.float32)
    return x / np.linalg.norm(x)


def timed_ms(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--images", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--items", type=int)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.images = args.images or (48 if args.quick else 96)
    args.rounds = args.rounds or 3
    args.items = args.items or (20_000 if args.quick else 100_000)
    args.model_a, args.model_b = ("clipdex-tiny", "clipdex-tiny-16") if args.quick else ("clipdex-tiny", "ViT-B-32")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_avg": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="clipdex-bench-reembed-") as tmp:
        work = Path(tmp)
        print(f"throughput: {args.images} images, {args.model_a} -> {args.model_b}", flush=True)
        result["throughput"] = throughput(args, work)
        print(f"the store at {args.items:,} items", flush=True)
        result["scale"] = at_scale(args.items, work)
    result["load_avg_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
