"""Freshness through Kafka: from producing an event to the image being found by a search in another process.

    python -m bench.bench_freshness_kafka            # 200 events at 20 events/s, the tiny test model
    python -m bench.bench_freshness_kafka --quick    # 30 events
    python -m bench.bench_freshness_kafka --bootstrap-servers HOST:PORT   # an existing broker
    python -m bench.bench_freshness_kafka --store milvus      # the Milvus store (a milvus-lite server process)

`clipdex consume` runs as a subprocess (its own store connection and model) with default settings
(batches of up to 64, fetch wait up to 200 ms, commit after every batch). The broker is a tansu process on
a loopback port (tests/brokers.py), unless --bootstrap-servers names one. This process is the search side:
it opens the same data directory with `build_core` and follows the store as a search server does (a
refresh every CLIPDEX_REFRESH_INTERVAL_MS, 250 ms by default). Events are produced at a steady rate, each
naming a different JPEG; an event counts as visible the first time a search with its item's stored vector
returns it. Reported: p50, p99 and max of (visible - produced), in seconds. Targets: p50 <= 1 s, p99 <= 3 s.

With `--store milvus` the consumer writes to Milvus and the search side is a stateless replica's reader
(Bounded consistency): a milvus-lite server process (tests/milvus.py) unless --milvus-uri names a Milvus.
milvus-lite is a test engine written in Python: its figures are not Milvus's.
"""

from __future__ import annotations

import argparse
import asyncio
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
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import AIOKafkaProducer

from clipdex.synthetic import generate
from shared.config import load_settings
from shared.core import Core, build_core

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIGS = ROOT / "tests" / "fixtures" / "configs"
READY_LINE = "consuming from"
BATCH_FIELDS = re.compile(r"size=(\d+) .*decode_ms=(\d+) embed_ms=(\d+) write_ms=(\d+)")


def model_env(args: argparse.Namespace, data: Path, images: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPDEX_")}
    env.update(
        CLIPDEX_DATA_DIR=str(data),
        CLIPDEX_MODEL=args.model,
        CLIPDEX_PRETRAINED="none",
        CLIPDEX_DEVICE="cpu",
        CLIPDEX_ALLOWED_ROOTS=str(images),
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    if args.model == "clipdex-tiny":
        env["CLIPDEX_MODEL_CONFIGS"] = str(TINY_CONFIGS)
    for name in ("runtime", "precision", "model_cache_dir"):
        if getattr(args, name, None):
            env[f"CLIPDEX_{name.upper()}"] = str(getattr(args, name))
    return env


def write_jpegs(folder: Path, n: int, size: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i, sample in enumerate(generate(n, seed=13, size=size)):
        buf = io.BytesIO()
        sample.image.save(buf, format="JPEG", quality=90)
        path = folder / f"e{i:05d}.jpg"
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def start_consumer(bootstrap: str, topic: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipdex", "consume", "--bootstrap-servers", bootstrap, "--topic", topic],
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
            raise RuntimeError("clipdex consume did not start:\n" + "".join(lines[-30:]))
        time.sleep(0.05)
    return proc, lines


def upsert(item: str, path: Path) -> bytes:
    return json.dumps({"op": "upsert", "id": item, "uri": str(path)}).encode()


class Searcher:
    """A search process's view: marks each produced item visible when a search returns it."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.produced: dict[str, float] = {}
        self.visible: dict[str, float] = {}
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def expect(self, item_id: str, at: float) -> None:
        with self._lock:
            self.produced[item_id] = at

    def _run(self) -> None:
        while not self._done.is_set():
            with self._lock:
                pending = [i for i in self.produced if i not in self.visible]
            for item_id in pending:
                stored = self.core.vectors.item_vector(item_id)
                if stored is None:
                    continue
                hits = self.core.search.search_vector(stored, 1)
                if hits and hits[0].id == item_id:
                    with self._lock:
                        self.visible[item_id] = time.monotonic()
            time.sleep(0.005)

    def wait_all(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.visible) < len(self.produced) and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=10)


async def produce(bootstrap: str, topic: str, events: list[tuple[str, Path]], rate: float, searcher: Searcher) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks=1)
    await producer.start()
    try:
        interval = 1.0 / rate
        next_at = time.monotonic()
        for item, path in events:
            searcher.expect(f"kafka:{item}", time.monotonic())
            await producer.send(topic, upsert(item, path), key=item.encode())
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await producer.flush()
    finally:
        await producer.stop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="clipdex-bench-kafka-"))
    data, images = work / "data", work / "images"
    paths = write_jpegs(images, args.events + 1, args.size)  # every image different: no vector reuse
    env = model_env(args, data, images)
    broker = None
    milvus = None
    if args.store == "milvus":
        uri = args.milvus_uri
        if uri is None:
            sys.path.insert(0, str(ROOT))
            from tests.milvus import MilvusLite

            milvus = MilvusLite(work / "milvus")
            uri = milvus.uri
        collection = f"bench_{uuid.uuid4().hex[:8]}"
        env.update(CLIPDEX_STORE="milvus", CLIPDEX_MILVUS_URI=uri, CLIPDEX_MILVUS_COLLECTION=collection)
    if args.bootstrap_servers:
        bootstrap = args.bootstrap_servers
    else:
        sys.path.insert(0, str(ROOT))
        from tests.brokers import TansuBroker

        broker = TansuBroker()
        bootstrap = broker.bootstrap
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    proc: subprocess.Popen[str] | None = None
    core: Core | None = None
    searcher: Searcher | None = None
    try:
        proc, lines = start_consumer(bootstrap, topic, env)
        # A first event makes the indexer create the store and bind the model before the reader opens it.
        asyncio.run(_send_one(bootstrap, topic, "seed", paths[0]))
        deadline = time.monotonic() + 60
        while not any("batch source=kafka" in line for line in lines):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the seed event was not indexed:\n" + "".join(lines[-30:]))
            time.sleep(0.05)
        settings = load_settings(
            **{k.removeprefix("CLIPDEX_").lower(): v for k, v in env.items() if k.startswith("CLIPDEX_")}
        )
        core = build_core(settings)
        core.start_refresh()
        searcher = Searcher(core)
        events = [(f"e{i:05d}", paths[i + 1]) for i in range(args.events)]
        asyncio.run(produce(bootstrap, topic, events, args.rate, searcher))
        searcher.wait_all(60)
    finally:
        if searcher is not None:
            searcher.close()
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if core is not None:
            core.close()
        if broker is not None:
            broker.close()
        if milvus is not None:
            milvus.stop()
        shutil.rmtree(work, ignore_errors=True)
    assert searcher is not None
    lags = np.array([searcher.visible[i] - searcher.produced[i] for i in searcher.produced if i in searcher.visible])
    batch_lines = [line for line in lines if "batch source=kafka" in line][1:]  # less the seed's
    timings = np.array(
        [[float(v) for v in m.groups()] for line in batch_lines if (m := BATCH_FIELDS.search(line))]
    ).reshape(-1, 4)
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": f"{args.model} (random weights), cpu",
        "broker": "external" if args.bootstrap_servers else "tansu (in memory)",
        "store": args.store if args.store == "sqlite" or args.milvus_uri else "milvus (milvus-lite)",
        "events": args.events,
        "rate_per_s": args.rate,
        "visible": len(lags),
        "p50_s": round(float(np.percentile(lags, 50)), 3) if len(lags) else None,
        "p99_s": round(float(np.percentile(lags, 99)), 3) if len(lags) else None,
        "max_s": round(float(lags.max()), 3) if len(lags) else None,
        "batches": len(batch_lines),
        "mean_batch_size": round(float(timings[:, 0].mean()), 1) if len(timings) else None,
        "mean_decode_ms": round(float(timings[:, 1].mean())) if len(timings) else None,
        "mean_embed_ms": round(float(timings[:, 2].mean())) if len(timings) else None,
        "mean_write_ms": round(float(timings[:, 3].mean())) if len(timings) else None,
        "consumer_exit_code": proc.returncode if proc is not None else None,
    }


async def _send_one(bootstrap: str, topic: str, item: str, path: Path) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, upsert(item, path), key=item.encode())
    finally:
        await producer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="30 events")
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="events per second")
    parser.add_argument("--size", type=int, default=256, help="image side, pixels")
    parser.add_argument("--model", default="clipdex-tiny")
    parser.add_argument("--runtime", default=None, help="CLIPDEX_RUNTIME of the indexer (default: auto)")
    parser.add_argument("--precision", default=None, help="CLIPDEX_PRECISION of the indexer")
    parser.add_argument("--model-cache-dir", default=None, help="CLIPDEX_MODEL_CACHE_DIR (ONNX exports)")
    parser.add_argument("--bootstrap-servers", default=None, help="use this broker instead of starting tansu")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    parser.add_argument("--store", choices=["sqlite", "milvus"], default="sqlite")
    parser.add_argument("--milvus-uri", default=None, help="a Milvus (default: start a milvus-lite server)")
    args = parser.parse_args()
    if args.quick:
        args.events = 30
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args)
    if not args.json:
        print(
            f"kafka freshness, {result['store']} store, {result['model']}, {result['events']} events at "
            f"{result['rate_per_s']:g}/s: "
            f"p50 {result['p50_s']} s, p99 {result['p99_s']} s, max {result['max_s']} s "
            f"({result['visible']}/{result['events']} visible, {result['batches']} batches of "
            f"{result['mean_batch_size']} on average: decode {result['mean_decode_ms']} ms, "
            f"embed {result['mean_embed_ms']} ms, write {result['mean_write_ms']} ms)"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
