"""The folder source's decisions without a watcher: which names count, what a scan finds, and how a
folder is reconciled with the store."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image

from indexer.sources.folder import Folder, delete_record, is_image, reconcile, root_of, scan, upsert_record
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


def _item(
    root: Path,
    rel: str,
    *,
    size: int = 10,
    mtime_ns: int = 1000,
    failed: bool = False,
    transient: bool = False,
    when: float = 0,
    item_id: str | None = None,
) -> Item:
    at = datetime.fromtimestamp(when, UTC)
    return Item(
        id=item_id or f"folder:root/{rel}",
        source="folder",
        uri=str(root / rel),
        sha256=None if failed else "h",
        metadata={} if failed else {"path": rel, "bytes": size, "mtime_ns": mtime_ns},
        status="failed" if failed else "indexed",
        reason=("FetchFailed: EIO" if transient else "ImageRejected: truncated") if failed else None,
        version=None,
        vector_id=None if failed else 1,
        created_at=at,
        updated_at=at,
        retriable=transient,
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
        _item(tmp_path / "other-root", "x.jpg", item_id="folder:other-root/x.jpg"),
    ]
    out = reconcile(Folder(root, "root"), files, items)
    assert sorted(rel for rel, _ in out.upserts) == ["failed-fixed.jpg", "new.jpg", "touched.jpg"]
    assert out.deletes == ["gone.jpg"]
    assert (out.unchanged, out.failed_before, out.foreign, out.renames) == (1, 1, 1, {})


def test_a_file_whose_last_failure_was_transient_is_tried_again_at_start_even_unchanged(tmp_path: Path) -> None:
    """EIO on a network share, a timeout: the file did not change, but trying again may work."""
    root = tmp_path / "root"
    files = {"flaky.jpg": FileStat(3, 1_000_000_000), "bad.jpg": FileStat(3, 1_000_000_000)}
    items = [
        _item(root, "flaky.jpg", failed=True, transient=True, when=5),
        _item(root, "bad.jpg", failed=True, when=5),
    ]
    out = reconcile(Folder(root, "root"), files, items)
    assert [rel for rel, _ in out.upserts] == ["flaky.jpg"] and out.failed_before == 1


def test_two_folders_with_the_same_files_never_share_an_item(tmp_path: Path) -> None:
    a, b = Folder(tmp_path / "a" / "images", "images"), Folder(tmp_path / "b" / "images", "images-2")
    files = {"cat.jpg": FileStat(10, 1000)}
    a_items = [_item(a.root, "cat.jpg", item_id=a.item_id("cat.jpg"))]
    out = reconcile(b, files, a_items, {"images": str(a.root), "images-2": str(b.root)})
    assert [rel for rel, _ in out.upserts] == ["cat.jpg"] and out.deletes == [] and out.foreign == 1
    record = upsert_record(b, "cat.jpg", files["cat.jpg"], 0.0)
    assert record.event is not None and record.event.id == "images-2/cat.jpg"
    assert a.item_id("cat.jpg") == "folder:images/cat.jpg" != b.item_id("cat.jpg")


def test_items_from_before_folder_names_are_adopted_by_their_folder(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    legacy = [
        _item(root, "a.jpg", item_id="folder:a.jpg"),
        _item(root, "sub/b.jpg", item_id="folder:sub/b.jpg"),
        _item(tmp_path / "elsewhere", "c.jpg", item_id="folder:c.jpg"),  # another folder's, left alone
    ]
    files = {"a.jpg": FileStat(10, 1000), "sub/b.jpg": FileStat(10, 1000)}
    out = reconcile(Folder(root, "photos"), files, legacy, {"photos": str(root)})
    assert out.renames == {"folder:a.jpg": "folder:photos/a.jpg", "folder:sub/b.jpg": "folder:photos/sub/b.jpg"}
    assert (out.unchanged, out.upserts, out.deletes, out.foreign) == (2, [], [], 1)


def test_a_nested_folders_items_are_not_taken_for_items_from_before_folder_names(tmp_path: Path) -> None:
    """/x/images is registered as `images`; its item folder:images/a.jpg reads like a pre-name item of
    /x (whose file images/a.jpg it is): it stays the nested folder's."""
    outer, inner = Folder(tmp_path, "x"), Folder(tmp_path / "images", "images")
    items = [_item(inner.root, "a.jpg", item_id=inner.item_id("a.jpg"))]
    out = reconcile(
        outer, {"images/a.jpg": FileStat(10, 1000)}, items, {"x": str(outer.root), "images": str(inner.root)}
    )
    assert out.renames == {} and out.foreign == 1 and [rel for rel, _ in out.upserts] == ["images/a.jpg"]


def test_folder_records_carry_the_id_the_path_and_the_file_state(tmp_path: Path) -> None:
    folder = Folder(tmp_path, "pics")
    record = upsert_record(folder, "sub/a.jpg", FileStat(7, 42), seen_at=1.0)
    assert record.source == "folder" and record.event is not None
    assert (record.event.op, record.event.id, record.event.uri) == (
        "upsert",
        "pics/sub/a.jpg",
        str(tmp_path / "sub/a.jpg"),
    )
    assert record.event.metadata == {"path": "sub/a.jpg", "bytes": 7, "mtime_ns": 42}
    assert root_of(record) == tmp_path
    gone = delete_record(folder, "sub/a.jpg", seen_at=1.0)
    assert gone.event is not None and (gone.event.op, gone.event.id) == ("delete", "pics/sub/a.jpg")
    too_long = upsert_record(folder, "x" * 2000 + ".jpg", FileStat(1, 1), seen_at=1.0)
    assert too_long.event is None and too_long.error
