"""A sample store for the read-side tests: a few real images (embedded by the tiny model) and many
synthetic items, written the way an indexer would have written them."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from shared.config import Settings
from shared.embedder import Embedder
from shared.roles import Delete, Failure, Upsert, Writer
from shared.stores import open_writer
from shared.types import Embedding

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220)}
N_SYNTHETIC = 40


def png_bytes(rgb: tuple[int, int, int], size: tuple[int, int] = (48, 32)) -> bytes:
    out = io.BytesIO()
    img = Image.new("RGB", size, rgb)
    img.paste((255, 255, 255), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    img.save(out, format="PNG")
    return out.getvalue()


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> Embedding:
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Sample:
    """What `fill_store` wrote: the ids by kind, and the folder of image files."""

    root: Path
    image_ids: dict[str, str]  # colour -> item id
    synthetic_ids: list[str]
    failed_id: str
    nested_id: str

    @property
    def searchable(self) -> int:
        return len(self.image_ids) + len(self.synthetic_ids) + 1  # + the nested image


def fill_store(store: Writer, embedder: Embedder, root: Path, *, seed: int = 0) -> Sample:
    """Three coloured images and a nested one under `root` (real embeddings), N_SYNTHETIC catalog items
    with random vectors and URL uris, and one failed item with a dead letter."""
    store.bind_model(embedder.identity)
    dim = embedder.identity.dim
    root.mkdir(parents=True, exist_ok=True)
    ups: list[Upsert] = []
    image_ids: dict[str, str] = {}
    for colour, rgb in COLOURS.items():
        data = png_bytes(rgb)
        path = root / f"{colour}.png"
        path.write_bytes(data)
        vec = embedder.encode_images([Image.open(io.BytesIO(data)).convert("RGB")])[0]
        image_ids[colour] = f"folder:{colour}.png"
        ups.append(Upsert(image_ids[colour], "folder", str(path), sha(data), {"colour": colour, "year": 2021}, vec))
    nested = root / "sub" / "dir" / "x.png"
    nested.parent.mkdir(parents=True, exist_ok=True)
    nested.write_bytes(png_bytes((200, 200, 0)))
    nested_vec = embedder.encode_images([Image.open(nested).convert("RGB")])[0]
    ups.append(Upsert("folder:sub/dir/x.png", "folder", str(nested), sha(nested.read_bytes()), {}, nested_vec))
    rng = np.random.default_rng(seed)
    vecs = unit_vectors(rng, N_SYNTHETIC, dim)
    synthetic = [f"kafka:sku-{i}" for i in range(N_SYNTHETIC)]
    for i, item_id in enumerate(synthetic):
        meta = {"category": "shoes" if i % 2 else "hats", "year": 2020 + i % 3, "code": str(2020 + i % 3)}
        uri = f"https://img.example.com/sku-{i}.jpg"
        ups.append(Upsert(item_id, "kafka", uri, f"{i:064x}", meta, vecs[i]))
    failure = Failure("kafka", '{"op": "upsert", "id": "bad"}', "not an image (unrecognised format)", id="kafka:bad")
    store.apply(upserts=ups, failures=[failure])
    return Sample(root, image_ids, synthetic, "kafka:bad", "folder:sub/dir/x.png")


def fill_data_dir(settings: Settings, embedder: Embedder, root: Path) -> Sample:
    """`fill_store` through the store of `settings` opened as a writer, as an indexer opens it."""
    with open_writer(settings, embedder.identity) as store:
        return fill_store(store.writer, embedder, root)


def add_items(store: Writer, ids: list[str], vectors: Embedding, metadata: dict[str, object] | None = None) -> None:
    store.apply(
        upserts=[
            Upsert(i, "kafka", f"https://img.example.com/{i}.jpg", sha(i.encode()), dict(metadata or {}), v)
            for i, v in zip(ids, vectors, strict=True)
        ]
    )


def delete_items(store: Writer, ids: list[str]) -> None:
    store.apply(deletes=[Delete(i) for i in ids])


def damage_store_file(path: Path, page_size: int = 16_384) -> None:
    """Overwrite every page of the SQLite file at `path` but the first (its header) with junk, as a
    failing disk might: every later read of it fails inside SQLite."""
    import sqlite3

    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(page_size)
        fh.write(b"\xa5" * (size - page_size))
