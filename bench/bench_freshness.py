"""Freshness: from a file finished in a watched folder to the image being found by a search in another process.

    python -m bench.bench_freshness            # 200 files at 20 files/s, the tiny test model
    python -m bench.bench_freshness --quick    # 30 files

`clipdex watch DIR` runs as a subprocess (its own store connection and model), with default settings
(settle 500 ms, batches of up to 64 waiting up to 200 ms). This process is the search side: it opens the
same data directory with `build_core` and follows the store as a search server does (a refresh every
CLIPDEX_REFRESH_INTERVAL_MS, 250 ms by default). Files are written (open, write, close; no temporary
name) at a steady rate; a file counts as visible the first time a search with its stored vector returns
it. Reported: p50, p99 and max of (visible - closed), in seconds. Targets: p50 <= 1 s, p99 <= 3 s.

Only the folder source is measured here (the Kafka source has its own measurement).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from clipdex.synthetic import generate
from shared.config import load_settings
from shared.core import build_core

TINY_CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "configs"
READY_LINE = "the files found at start are indexed"


def model_env(args: argparse.Namespace, data: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPDEX_")}
    env.update(
        CLIPDEX_DATA_DIR=str(data),
        CLIPDEX_MODEL=args.model,
        CLIPDEX_PRETRAINED="none",
        CLIPDEX_DEVICE="cpu",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    if args.model == "clipdex-tiny":
        env["CLIPDEX_MODEL_CONFIGS"] = str(TINY_CONFIGS)
    return env


def jpegs(n: int, size: int) -> list[bytes]:
    out = []
    for sample in generate(n, seed=11, size=size):
        buf = io.BytesIO()
        sample.image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def start_watcher(root: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipdex", "watch", str(root)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    assert proc.stderr is not None
    stderr = proc.stderr
    threading.Thread(target=lambda: lines.extend(iter(stderr.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 180
    while not any(READY_LINE in line for line in lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the watcher did not start:\n" + "".join(lines[-30:]))
        time.sleep(0.05)
    return proc, lines


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="clipdex-bench-fresh-"))
    root, data = work / "drop", work / "data"
    root.mkdir()
    env = model_env(args, data)
    payloads = jpegs(args.files + 1, args.size)  # every file different, or a copy would reuse a vector
    # One image in the folder at start makes the watcher create the store (and bind the model) first.
    (root / "seed.jpg").write_bytes(payloads[0])
    proc, lines = start_watcher(root, env)
    settings = load_settings(
        **{k.removeprefix("CLIPDEX_").lower(): v for k, v in env.items() if k.startswith("CLIPDEX_")}
    )
    core = build_core(settings)
    core.start_refresh()
    closed: dict[str, float] = {}
    visible: dict[str, float] = {}
    lock = threading.Lock()
    done = threading.Event()

    def watch_search() -> None:
        while not done.is_set():
            with lock:
                pending = [i for i in closed if i not in visible]
            for item_id in pending:
                stored = core.vectors.item_vector(item_id)
                if stored is None:
                    continue
                hits = core.search.search_vector(stored, 1)
                if hits and hits[0].id == item_id:
                    with lock:
                        visible[item_id] = time.monotonic()
            time.sleep(0.005)

    searcher = threading.Thread(target=watch_search, daemon=True)
    searcher.start()
    try:
        interval = 1.0 / args.rate
        next_at = time.monotonic()
        for i in range(args.files):
            name = f"f{i:05d}.jpg"
            with open(root / name, "wb") as fh:
                fh.write(payloads[i + 1])
            with lock:
                closed[f"folder:drop/{name}"] = time.monotonic()
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
        deadline = time.monotonic() + 60
        while len(visible) < len(closed) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        done.set()
        searcher.join(timeout=10)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        core.close()
        shutil.rmtree(work, ignore_errors=True)
    lags = np.array([visible[i] - closed[i] for i in closed if i in visible])
    batch_lines = [line for line in lines if "batch source=folder" in line]
    sizes = [int(m.group(1)) for line in batch_lines if (m := re.search(r" size=(\d+)", line))]
    embed = [float(m.group(1)) for line in batch_lines if (m := re.search(r" embed_ms=(\d+)", line))]
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": f"{args.model} (random weights), cpu",
        "files": args.files,
        "rate_per_s": args.rate,
        "visible": len(lags),
        "p50_s": round(float(np.percentile(lags, 50)), 3) if len(lags) else None,
        "p99_s": round(float(np.percentile(lags, 99)), 3) if len(lags) else None,
        "max_s": round(float(lags.max()), 3) if len(lags) else None,
        "batches": len(batch_lines),
        "mean_batch_size": round(float(np.mean(sizes)), 1) if sizes else None,
        "mean_embed_ms": round(float(np.mean(embed)), 1) if embed else None,
        "load_average": os.getloadavg()[0],
        "watcher_exit_code": proc.returncode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="30 files")
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="files per second")
    parser.add_argument("--size", type=int, default=256, help="image side, pixels")
    parser.add_argument("--model", default="clipdex-tiny")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args()
    if args.quick:
        args.files = 30
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args)
    if not args.json:
        print(
            f"folder freshness, {result['model']}, {result['files']} files at {result['rate_per_s']:g}/s: "
            f"p50 {result['p50_s']} s, p99 {result['p99_s']} s, max {result['max_s']} s "
            f"({result['visible']}/{result['files']} visible, {result['batches']} batches of "
            f"{result['mean_batch_size']} on average, {result['mean_embed_ms']} ms embedding each)"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
