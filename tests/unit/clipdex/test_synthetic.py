from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipdex.synthetic import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    class_caption,
    generate,
    render_sample,
    write_folder,
)


def test_same_seed_gives_the_same_pixels_and_captions() -> None:
    first = list(generate(6, seed=7, size=48))
    second = list(generate(6, seed=7, size=48))
    assert [s.caption for s in first] == [s.caption for s in second]
    for a, b in zip(first, second, strict=True):
        assert a.image.tobytes() == b.image.tobytes()


def test_different_seeds_give_different_images() -> None:
    a = [s.image.tobytes() for s in generate(4, seed=1, size=48)]
    b = [s.image.tobytes() for s in generate(4, seed=2, size=48)]
    assert a != b


def test_a_prefix_of_a_longer_run_is_the_shorter_run() -> None:
    short = [s.image.tobytes() for s in generate(3, seed=5, size=32)]
    long = [s.image.tobytes() for s in generate(8, seed=5, size=32)]
    assert long[:3] == short


def test_caption_names_the_requested_colour_and_shape() -> None:
    rng = random.Random(0)
    for colour in COLOURS:
        for shape in SHAPES:
            sample = render_sample(rng, 40, colour=colour, shape=shape)
            assert (sample.colour, sample.shape) == (colour, shape)
            assert f"{colour} {shape}" in sample.caption
            assert sample.image.size == (40, 40) and sample.image.mode == "RGB"


def test_the_shape_colour_is_the_most_common_non_background_colour() -> None:
    rng = random.Random(3)
    for colour, rgb in COLOURS.items():
        sample = render_sample(rng, 96, colour=colour, shape="square")
        pixels = np.asarray(sample.image, dtype=np.int32).reshape(-1, 3)
        distances = {
            name: np.abs(pixels - np.array(ref)).sum(axis=1)
            for name, ref in {**COLOURS, **{f"bg:{k}": v for k, v in BACKGROUNDS.items()}}.items()
        }
        nearest = np.argmin(np.stack(list(distances.values())), axis=0)
        names = list(distances)
        counts = {names[i]: int((nearest == i).sum()) for i in range(len(names)) if not names[i].startswith("bg:")}
        assert max(counts, key=counts.__getitem__) == colour, (colour, rgb, counts)


def test_backgrounds_are_far_from_every_shape_colour() -> None:
    for bg in BACKGROUNDS.values():
        for rgb in COLOURS.values():
            assert sum(abs(a - b) for a, b in zip(bg, rgb, strict=True)) > 120


def test_non_square_sizes_are_honoured() -> None:
    sample = render_sample(random.Random(1), (80, 60))
    assert sample.image.size == (80, 60)


def test_unknown_colour_or_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown colour"):
        render_sample(random.Random(0), colour="mauve")
    with pytest.raises(ValueError, match="unknown shape"):
        render_sample(random.Random(0), shape="hexagon")


def test_class_caption_uses_the_right_article() -> None:
    assert class_caption("red", "circle") == "a red circle"
    assert class_caption("orange", "square") == "an orange square"


def test_write_folder_writes_the_requested_jpegs(tmp_path: Path) -> None:
    written = write_folder(tmp_path / "imgs", 5, seed=11, size=(64, 48))
    assert len(written) == 5
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == sorted(w.path.name for w in written)
    for w in written:
        assert w.path.name == f"{w.colour}-{w.shape}-{w.index:05d}.jpg"
        with Image.open(w.path) as img:
            assert img.format == "JPEG" and img.size == (64, 48)


def test_write_folder_restricts_classes_and_offsets_indexes(tmp_path: Path) -> None:
    written = write_folder(tmp_path, 6, seed=2, size=32, fmt="png", colours=["red"], shapes=["circle"], start=100)
    assert {(w.colour, w.shape) for w in written} == {("red", "circle")}
    assert [w.index for w in written] == list(range(100, 106))
    assert all(w.path.suffix == ".png" and w.path.is_file() for w in written)


def test_write_folder_is_deterministic(tmp_path: Path) -> None:
    a = write_folder(tmp_path / "a", 3, seed=9, size=32, fmt="png")
    b = write_folder(tmp_path / "b", 3, seed=9, size=32, fmt="png")
    assert [x.path.read_bytes() for x in a] == [y.path.read_bytes() for y in b]
