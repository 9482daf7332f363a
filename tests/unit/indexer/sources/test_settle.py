"""When a changing file is settled enough to read."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from indexer.sources.settle import FileStat, Settler, looks_complete


def _image(path: Path, fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 10, 10)).save(out, format=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.getvalue())
    return out.getvalue()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_file_is_released_only_after_holding_still(tmp_path: Path) -> None:
    clock = Clock()
    settler = Settler(tmp_path, settle_s=1.0, quick_s=0.1, clock=clock, wall=clock)
    path = tmp_path / "a.bin"  # a format with no recognisable ending: the full settle time applies
    path.write_bytes(b"x" * 100)
    settler.observe("a.bin")
    clock.now = 0.5
    assert settler.due() == []
    with open(path, "ab") as fh:  # still growing: the clock restarts
        fh.write(b"y" * 100)
    clock.now = 1.2
    assert settler.due() == []
    clock.now = 2.1
    assert settler.due() == []
    clock.now = 2.3
    (released,) = settler.due()
    assert released.rel == "a.bin" and released.stat == FileStat.of(path)
    assert settler.due() == [] and len(settler) == 0


def test_a_whole_image_is_released_sooner_than_a_partial_one(tmp_path: Path) -> None:
    clock = Clock()
    settler = Settler(tmp_path, settle_s=1.0, quick_s=0.1, clock=clock, wall=clock)
    data = _image(tmp_path / "whole.jpg")
    (tmp_path / "partial.jpg").write_bytes(data[: len(data) // 2])
    settler.observe("whole.jpg")
    settler.observe("partial.jpg")
    clock.now = 0.15
    assert [s.rel for s in settler.due()] == ["whole.jpg"]
    clock.now = 1.05  # a partial file that stops growing is still released, to be dead-lettered
    assert [s.rel for s in settler.due()] == ["partial.jpg"]


def test_a_deleted_file_is_released_as_gone(tmp_path: Path) -> None:
    clock = Clock()
    settler = Settler(tmp_path, settle_s=0.5, clock=clock, wall=clock)
    settler.observe("vanished.jpg")
    clock.now = 0.6
    (released,) = settler.due()
    assert released.stat is None


def test_an_event_after_release_tracks_the_file_again(tmp_path: Path) -> None:
    clock = Clock()
    settler = Settler(tmp_path, settle_s=0.5, clock=clock, wall=clock)
    _image(tmp_path / "a.jpg")
    settler.observe("a.jpg")
    clock.now = 0.6
    assert len(settler.due()) == 1
    settler.observe("a.jpg")
    assert len(settler) == 1


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP"])
def test_whole_images_look_complete_and_cut_ones_do_not(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"a.{fmt.lower()}"
    data = _image(path, fmt)
    assert looks_complete(path, len(data))
    path.write_bytes(data[:-5])
    assert not looks_complete(path, len(data) - 5)


def test_unknown_formats_never_look_complete(tmp_path: Path) -> None:
    path = tmp_path / "a.tiff"
    data = _image(path, "TIFF")
    assert not looks_complete(path, len(data))
    assert not looks_complete(tmp_path / "missing.jpg", 100)
    assert os.path.exists(path)
