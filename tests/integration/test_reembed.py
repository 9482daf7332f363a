"""Changing the model without downtime, with real processes. `clipdex watch` (indexing with the old
model) and `clipdex serve` (answering queries all along) run throughout, while `clipdex reembed` moves the
store to a model of another dimension: it is killed with SIGKILL mid-way and run again, and files come,
change and go meanwhile. No query fails, each is answered by one model from that model's own vectors,
nothing is embedded twice, and after the switch the store holds exactly the folder, in the new model."""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from clipdex import synthetic
from indexer import service
from indexer.commands import absolute_model_paths, status_of
from shared.core import build_core
from shared.embedder import Embedder
from shared.roles import Space
from shared.sqlite.store import SqliteStore
from tests.brokers import free_port, stop_process
from tests.conftest import (
    SHAPES_MODELS,
    TINY16_MODEL,
    TINY_CONFIGS,
    clipdex_command,
    tiny_env,
    tiny_settings_for,
)

pytestmark = pytest.mark.integration

N = 24
QUERY = "a red square"
SIMILAR_TO = "folder:images/img-01.png"  # never changed


def png(i: int) -> bytes:
    pixels = np.random.default_rng(i).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@dataclass
class Querier:
    """Queries the server over HTTP, back to back, from a thread, and keeps every answer."""

    url: str
    answers: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                for kind, path, params in (
                    ("text", "/search", {"query": QUERY, "top_k": 5}),
                    ("similar", "/similar", {"id": SIMILAR_TO, "top_k": 5}),
                ):
                    response = client.get(path, params=params)
                    body = (
                        response.json()
                        if response.headers.get("content-type", "").startswith("application/json")
                        else {}
                    )
                    self.answers.append((kind, response.status_code, body))
                time.sleep(0.01)


@dataclass
class Processes:
    tmp: Path
    env: dict[str, str]
    running: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([*clipdex_command(), *args], env=self.env, stdout=out, stderr=out)
        self.running.append((proc, log))
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return next(log for p, log in self.running if p is proc).read_text()[-4000:]

    def alive(self) -> None:
        for proc, log in self.running:
            if proc.returncode is None and proc.poll() is not None:
                pytest.fail(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    env = tiny_env(tmp_path / "data") | {
        "CLIPDEX_RUNTIME": "torch",  # the re-embed is the same on either runtime; torch starts faster
        "CLIPDEX_REFRESH_INTERVAL_MS": "50",
        "CLIPDEX_WATCH_SETTLE_MS": "100",
        "CLIPDEX_MAX_BATCH_WAIT_MS": "50",
    }
    procs = Processes(tmp_path, env)
    try:
        yield procs
    finally:
        for proc, _ in procs.running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def wait_for(what: str, check: Callable[[], bool], procs: Processes, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        procs.alive()
        if check():
            return
        time.sleep(0.05)
    logs = "\n".join(f"--- {p.args[3]}\n{log.read_text()[-2500:]}" for p, log in procs.running)
    pytest.fail(f"timed out waiting for {what}\n{logs}")


def store_of(data: Path) -> SqliteStore:
    return SqliteStore(data / "clipdex.sqlite3")


def shadow_space(data: Path) -> Space | None:
    with store_of(data) as store:
        return next((s for s in store.spaces() if s.state == "shadow"), None)


def test_a_model_change_under_live_traffic_survives_a_kill_and_misses_nothing(
    tmp_path: Path, processes: Processes, tiny_embedder: Embedder, tiny16_embedder: Embedder
) -> None:
    root, data = tmp_path / "images", tmp_path / "data"
    root.mkdir()
    for i in range(N):
        (root / f"img-{i:02d}.png").write_bytes(png(i))

    port = free_port()
    watcher = processes.start("watch", "watch", str(root))
    server = processes.start("serve", "serve", "--port", str(port))  # the first to bind the model creates the store
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{N} items indexed", lambda: items_in(data) == N, processes)
    wait_for("the server", lambda: healthy(url), processes)
    querier = Querier(url)
    querier.start()
    try:
        run_the_model_change(processes, root, data, url, querier, tiny16_embedder)
    finally:
        querier.stop()
    check_answers(querier.answers, root, tiny_embedder, tiny16_embedder)
    for proc in (watcher, server):
        stop_process(proc, timeout_s=20)
        assert proc.returncode == 0, processes.log(proc)


def run_the_model_change(
    processes: Processes, root: Path, data: Path, url: str, querier: Querier, tiny16_embedder: Embedder
) -> None:

    reembed = [
        *("reembed", "--model", TINY16_MODEL, "--pretrained", "none", "--model-configs", str(TINY_CONFIGS)),
        *("--batch-size", "4", "--grace-s", "2", "--no-progress"),
    ]
    first = processes.start("reembed-1", *reembed, "--rate", "6")
    wait_for("a shadow space", lambda: shadow_space(data) is not None, processes)
    shadow = shadow_space(data)
    assert shadow is not None and shadow.model is not None and shadow.model.dim == 16

    # files come, change and go while the re-embed runs; the watcher indexes them with the old model
    wait_for("a first micro-batch re-embedded", lambda: covered(data, shadow) >= 4, processes)
    for i in (1, 2, 3):
        (root / f"new-{i}.png").write_bytes(png(100 + i))
    (root / "img-20.png").unlink()
    (root / "img-21.png").unlink()
    (root / "img-02.png").write_bytes(png(202))
    wait_for("the watcher to index the changes", lambda: folder_matches_store(root, data), processes)

    metrics = httpx.get(f"{url}/metrics").text  # progress and models, while the re-embed runs
    assert "clipdex_reembed_running 1" in metrics and "clipdex_reembed_active 1" in metrics
    assert re.search(r"^clipdex_reembed_items_total 25$", metrics, re.M), metrics
    assert f'clipdex_model_info{{role="reembed",name="{TINY16_MODEL}"' in metrics
    assert 'clipdex_model_info{role="answering",name="clipdex-tiny"' in metrics

    wait_for("8 items re-embedded", lambda: covered(data, shadow) >= 8, processes)
    first.send_signal(signal.SIGKILL)
    first.wait()
    first_log = processes.log(first)
    with store_of(data) as store:
        finished = set(live_vectors(store, shadow.id))
        cov = store.coverage(shadow.id)
    assert 8 <= len(finished) < cov.total and cov.remaining > 0, first_log

    status = status_of(tiny_settings_for(data))  # what `clipdex status --json` prints: a killed re-embed is paused
    assert status["reembed"]["state"] == "paused" and status["reembed"]["done"] == len(finished)

    second = subprocess.run(
        [*clipdex_command(), *reembed], env=processes.env, capture_output=True, text=True, timeout=180
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"this run: embedded {cov.remaining}," in second.stdout, second.stdout  # nothing twice
    assert "switched: the store answers with clipdex-tiny-16" in second.stdout
    assert "removed the previous model's vectors" in second.stdout

    with store_of(data) as store:
        [active] = store.spaces()  # the old space is gone after its grace period
        assert active.id == shadow.id and active.state == "active"
        assert finished <= set(live_vectors(store, shadow.id))  # vectors of the first run were kept

    wait_for("the server on the new model", lambda: answering(url) == TINY16_MODEL, processes, timeout_s=30)
    (root / "after.png").write_bytes(png(300))  # the watcher follows the switch: the new model indexes it
    wait_for("the watcher on the new model", lambda: folder_matches_store(root, data), processes)

    # the store holds exactly the folder, each file with the new model's vector of its current content
    with store_of(data) as store:
        store.bind_model(tiny16_embedder.identity)
        assert store.stats().items == len(list(root.iterdir())) == N + 3 - 2 + 1
        for path in root.iterdir():
            stored = store.item_vector(f"folder:images/{path.name}")
            assert stored is not None, path.name
            np.testing.assert_allclose(stored[1], embed(tiny16_embedder, path), atol=1e-4)


def check_answers(answers: list[tuple[str, int, dict[str, Any]]], root: Path, old: Embedder, new: Embedder) -> None:
    """Every query succeeded; the models answering go from old to new once; and each answer's scores are
    its model's own: the text (or the item's vector) and the hits' vectors from the one model named."""
    assert answers and all(status == 200 for _, status, _ in answers), [a for a in answers if a[1] != 200][:3]
    names = [body["index"]["model"]["name"] for _, _, body in answers]
    switched_at = names.index(TINY16_MODEL)
    assert set(names[:switched_at]) == {"clipdex-tiny"} and set(names[switched_at:]) == {TINY16_MODEL}
    assert switched_at > 10 and len(names) - switched_at > 2  # queries on both sides of the switch
    models = {"clipdex-tiny": old, TINY16_MODEL: new}
    unchanged = {f"folder:images/img-{i:02d}.png" for i in range(20) if i != 2}  # same file all along
    vectors = {
        (name, item): embed(m, root / item.removeprefix("folder:images/"))
        for name, m in models.items()
        for item in unchanged
    }
    checked = 0
    for kind, _, body in answers:
        name = body["index"]["model"]["name"]
        query = models[name].encode_text(QUERY).vector if kind == "text" else vectors[(name, SIMILAR_TO)]
        for hit in body["hits"]:
            if hit["id"] in unchanged:
                assert hit["score"] == pytest.approx(float(np.dot(query, vectors[(name, hit["id"])])), abs=1e-4)
                checked += 1
    assert checked > len(answers)


def embed(embedder: Embedder, path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return embedder.encode_images([img.convert("RGB")])[0]


def items_in(data: Path) -> int:
    if not (data / "clipdex.sqlite3").exists():
        return 0
    with store_of(data) as store:
        return store.stats().items


def covered(data: Path, shadow: Space) -> int:
    with store_of(data) as store:
        cov = store.coverage(shadow.id)
    return cov.done + cov.failed


def folder_matches_store(root: Path, data: Path) -> bool:
    """Every file is an item of its current content, and no other item is left."""
    with store_of(data) as store:
        stored = store.item_ids(source="folder")
        live = store.stats().items
    files = {f"folder:images/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir()}
    return stored == files and live == len(files)


def live_vectors(store: SqliteStore, space: int) -> list[int]:
    return [int(v) for ids, _ in store.feed(space).live_vectors() for v in ids]


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def answering(url: str) -> str:
    body = httpx.get(f"{url}/search", params={"query": QUERY, "top_k": 1}, timeout=10).json()
    return str(body["index"]["model"]["name"])


def test_after_a_switch_to_the_shapes_model_a_red_circle_finds_red_circles(tmp_path: Path) -> None:
    """From the tiny random model to the trained shapes model (64 dimensions), in one process: a server
    that searched with random weights finds red circles by their description after the switch."""
    root = tmp_path / "images"
    synthetic.write_folder(root, 6, seed=11, size=64, colours=["red"], shapes=["circle"])
    synthetic.write_folder(root, 6, seed=12, size=64, colours=["blue"], shapes=["square"], start=6)
    synthetic.write_folder(root, 12, seed=13, size=64, colours=["green", "yellow"], start=12)
    settings = tiny_settings_for(tmp_path / "data", batch_size=8, reembed_grace_s=0, runtime="torch")
    asyncio.run(service.index_folder(settings, root))
    core = build_core(settings)
    try:
        shapes = absolute_model_paths(
            settings.model_copy(
                update={
                    "model": "clipdex-shapes",
                    "pretrained": str(SHAPES_MODELS / "clipdex-shapes.safetensors"),
                    "model_configs": SHAPES_MODELS,
                }
            )
        )
        report = asyncio.run(service.reembed(shapes, asyncio.Event()))
        assert report is not None and report.switched and report.embedded == 24
        assert core.follow_switch()
        hits = core.search.search_text("a red circle", 5).hits
        assert len(hits) == 5 and all(h.id.startswith("folder:images/red-circle-") for h in hits), hits
        hits = core.search.search_text("a blue square", 5).hits
        assert len(hits) == 5 and all(h.id.startswith("folder:images/blue-square-") for h in hits), hits
    finally:
        core.close()
