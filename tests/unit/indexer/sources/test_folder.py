"""The folder source's decisions without a watcher: which names count, what a scan finds, and how a
folder is reconciled with the store."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image

from indexer.sources.folder import delete_record, is_image, reconcile, scan, upsert_record
from indexer.sources.settle import FileStat
from shared.types import Item


@pytest.mark.parametrize(
    ("rel", "wanted"),
    [
        ("a.jpg", True),
        ("sub/deeper/B.JPEG", True),
        ("x.png", True),
        ("x.webp", True),
        ("notes.txt", False),
        ("movie.mp4", False),
        (".hidden.jpg", False),
        (".cache/a.jpg", False),
        ("a.jpg.part", False),
        ("a.jpg.tmp", False),
        ("a.jpg.crdownload", False),
        ("a.jpg~", False),
        ("~$a.jpg", False),
        ("noext", False),
    ],
)
def test_which_names_are_images(rel: str, wanted: bool) -> None:
    assert is_image(rel) is wanted


def _image(path: Path, fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 10, 10)).save(out, format=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.getvalue())
    return out.getvalue()


def test_a_scan_finds_images_in_subfolders_and_skips_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _image(root / "a.jpg")
    _image(root / "sub" / "b.png", "PNG")
    _image(root / ".thumbs" / "c.jpg")
    _image(root / "d.jpg.part")
    (root / "readme.txt").write_text("hi")
    outside = tmp_path / "outside.jpg"
    _image(outside)
    (root / "link.jpg").symlink_to(outside)  # followed; the pipeline refuses it as outside the root
    (root / "broken.jpg").symlink_to(tmp_path / "nothing.jpg")
    found = scan(root)
    assert sorted(found) == ["a.jpg", "link.jpg", "sub/b.png"]
    assert found["a.jpg"] == FileStat.of(root / "a.jpg")
    assert sorted(scan(root, "sub")) == ["sub/b.png"]


def _item(root: Path, rel: str, *, size: int = 10, mtime_ns: int = 1000, failed: bool = False, when: float = 0) -> Item:
    at = datetime.fromtimestamp(when, UTC)
    return Item(
        id=f"folder:{rel}",
        source="folder",
        uri=str(root / rel),
        sha256=None if failed else "h",
        metadata={} if failed else {"path": rel, "bytes": size, "mtime_ns": mtime_ns},
        status="failed" if failed else "indexed",
        reason="ImageRejected: truncated" if failed else None,
        version=None,
        vector_id=None if failed else 1,
        created_at=at,
        updated_at=at,
    )


def test_reconcile_finds_what_changed_since_the_last_run(tmp_path: Path) -> None:
    root = tmp_path / "root"
    files = {
        "same.jpg": FileStat(10, 1000),
        "touched.jpg": FileStat(10, 2000),
        "new.jpg": FileStat(5, 1000),
        "failed-unchanged.jpg": FileStat(3, 1_000_000_000),
        "failed-fixed.jpg": FileStat(3, 9_000_000_000),
    }
    items = [
        _item(root, "same.jpg"),
        _item(root, "touched.jpg"),
        _item(root, "gone.jpg"),
        _item(root, "failed-unchanged.jpg", failed=True, when=5),
        _item(root, "failed-fixed.jpg", failed=True, when=5),
        _item(tmp_path / "other-root", "x.jpg"),
    ]
    out = reconcile(root, files, items)
    assert sorted(rel for rel, _ in out.upserts) == ["failed-fixed.jpg", "new.jpg", "touched.jpg"]
    assert out.deletes == ["gone.jpg"]
    assert (out.unchanged, out.failed_before, out.foreign) == (1, 1, 1)


def test_folder_records_carry_the_id_the_path_and_the_file_state(tmp_path: Path) -> None:
    record = upsert_record(tmp_path, "sub/a.jpg", FileStat(7, 42), seen_at=1.0)
    assert record.source == "folder" and record.event is not None
    assert (record.event.op, record.event.id, record.event.uri) == ("upsert", "sub/a.jpg", str(tmp_path / "sub/a.jpg"))
    assert record.event.metadata == {"path": "sub/a.jpg", "bytes": 7, "mtime_ns": 42}
    gone = delete_record("sub/a.jpg", seen_at=1.0)
    assert gone.event is not None and gone.event.op == "delete"
    too_long = upsert_record(tmp_path, "x" * 2000 + ".jpg", FileStat(1, 1), seen_at=1.0)
    assert too_long.event is None and too_long.error
