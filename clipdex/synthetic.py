"""Synthetic images of coloured shapes, with captions: the data the demo model knows.

Everything is drawn from one `random.Random`, so a seed fixes every pixel. The tiny CLIP in
`clipdex/models` was trained on these images (see `scripts/train_tiny_clip.py`); the demo, the
end-to-end tests and the benchmarks render their folders with `write_folder`.

Each image holds one main shape in one of `COLOURS`, on a muted, near-neutral background that is never
mistaken for a shape colour. Size, position, rotation, background, blur and noise vary; about a third of
the images also hold a much smaller distractor shape of another colour. The caption names only the main
shape. In a non-square image the shapes stay inside the central square, the part CLIP's centre crop keeps.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RGB = tuple[int, int, int]

# Hues far apart, full saturation: no two are close, and none is close to a background.
COLOURS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 165, 45),
    "blue": (30, 70, 225),
    "yellow": (245, 220, 30),
    "orange": (250, 135, 15),
    "purple": (135, 40, 185),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

# Saturation below 0.2 and brightness between 80 and 185: far from every colour above.
BACKGROUNDS: dict[str, RGB] = {
    "grey": (128, 128, 128),
    "light grey": (178, 178, 178),
    "dark grey": (82, 82, 82),
    "beige": (184, 172, 148),
    "slate": (100, 112, 128),
    "sage": (126, 140, 120),
}

_TEMPLATES_PLAIN = (
    "{a} {colour} {shape}",
    "{colour} {shape}",
    "a photo of {a} {colour} {shape}",
    "a picture of {a} {colour} {shape}",
    "an image of {a} {colour} {shape}",
    "{a} {colour} {shape} on {a_bg} {background} background",
    "a photo of {a} {colour} {shape} on {a_bg} {background} background",
)
_TEMPLATES_SIZED = (
    "{a} {size} {colour} {shape}",
    "{a} {size} {colour} {shape} on {a_bg} {background} background",
    "a photo of {a} {size} {colour} {shape}",
)

_MIN_MAIN, _MAX_MIN, _MAX_MAIN = 0.35, 0.45, 0.72  # main shape side / image side; "small" below _MAX_MIN
_MIN_LARGE = 0.6  # "large" above this
_DISTRACTOR_P = 0.3
_MAX_ROTATION = 20.0  # degrees; more would turn a square into a diamond


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    colour: str
    shape: str
    caption: str
    background: str


@dataclass(frozen=True)
class WrittenSample:
    path: Path
    index: int
    colour: str
    shape: str
    caption: str


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def class_caption(colour: str, shape: str) -> str:
    """The plain query for one class, e.g. "a red circle", "an orange square"."""
    return f"{article(colour)} {colour} {shape}"


def render_sample(
    rng: random.Random,
    size: int | tuple[int, int] = 64,
    colour: str | None = None,
    shape: str | None = None,
) -> Sample:
    """Draw one image (`size` is a side or (width, height)); colour and shape are random unless given."""
    width, height = (size, size) if isinstance(size, int) else size
    if colour is None:
        colour = rng.choice(list(COLOURS))
    elif colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; known: {', '.join(COLOURS)}")
    if shape is None:
        shape = rng.choice(SHAPES)
    elif shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    background = rng.choice(list(BACKGROUNDS))

    side = min(width, height)
    x0, y0 = (width - side) / 2, (height - side) / 2
    margin = 0.03 * side
    image = Image.new("RGB", (width, height), _jitter(rng, BACKGROUNDS[background], 8))
    draw = ImageDraw.Draw(image)

    rel = rng.uniform(_MIN_MAIN, _MAX_MAIN)
    extent = rel * side
    cx = x0 + rng.uniform(margin + extent / 2, side - margin - extent / 2)
    cy = y0 + rng.uniform(margin + extent / 2, side - margin - extent / 2)
    _draw_shape(
        draw,
        shape,
        cx,
        cy,
        extent,
        rng.uniform(-_MAX_ROTATION, _MAX_ROTATION),
        _jitter(rng, COLOURS[colour], 12),
    )

    if rng.random() < _DISTRACTOR_P:
        _draw_distractor(rng, draw, colour, (x0, y0, side, margin), (cx, cy, extent))

    blur = rng.uniform(0.0, 1.0) * side / 64
    if blur > 0.25:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    sigma = rng.uniform(0.0, 10.0)
    if sigma > 1.0:
        noise = np.random.default_rng(rng.getrandbits(64)).normal(0.0, sigma, (height, width, 3))
        pixels = np.asarray(image, dtype=np.float32) + noise
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")

    size_word = "small" if rel < _MAX_MIN else "large" if rel > _MIN_LARGE else None
    caption = _caption(rng, colour, shape, size_word, background)
    return Sample(image=image, colour=colour, shape=shape, caption=caption, background=background)


def generate(
    n: int,
    seed: int,
    size: int | tuple[int, int] = 64,
    *,
    colours: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
) -> Iterator[Sample]:
    """`n` samples from `seed`; the first k of generate(n, s) are generate(k, s)."""
    rng = random.Random(seed)
    for _ in range(n):
        colour = rng.choice(list(colours)) if colours else None
        shape = rng.choice(list(shapes)) if shapes else None
        yield render_sample(rng, size, colour=colour, shape=shape)


def write_folder(
    root: Path,
    n: int,
    seed: int,
    *,
    size: int | tuple[int, int] = 128,
    fmt: Literal["jpg", "png"] = "jpg",
    colours: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    start: int = 0,
) -> list[WrittenSample]:
    """Write `n` images to `root` as `<colour>-<shape>-<index:05d>.<fmt>`, indexes from `start`."""
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for index, sample in enumerate(generate(n, seed, size, colours=colours, shapes=shapes), start=start):
        path = root / f"{sample.colour}-{sample.shape}-{index:05d}.{fmt}"
        if fmt == "jpg":
            sample.image.save(path, format="JPEG", quality=90)
        else:
            sample.image.save(path, format="PNG")
        written.append(WrittenSample(path, index, sample.colour, sample.shape, sample.caption))
    return written


def _jitter(rng: random.Random, rgb: RGB, amount: int) -> RGB:
    r, g, b = (min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)
    return (r, g, b)


def _draw_distractor(
    rng: random.Random,
    draw: ImageDraw.ImageDraw,
    main_colour: str,
    area: tuple[float, float, float, float],
    main: tuple[float, float, float],
) -> None:
    x0, y0, side, margin = area
    cx, cy, extent = main
    colour = rng.choice([c for c in COLOURS if c != main_colour])
    shape = rng.choice(SHAPES)
    small = rng.uniform(0.12, 0.2) * side
    for _ in range(10):  # somewhere that does not touch the main shape, or nowhere
        dx = x0 + rng.uniform(margin + small / 2, side - margin - small / 2)
        dy = y0 + rng.uniform(margin + small / 2, side - margin - small / 2)
        gap = (extent + small) / 2 + margin
        if abs(dx - cx) > gap or abs(dy - cy) > gap:
            _draw_shape(draw, shape, dx, dy, small, rng.uniform(-_MAX_ROTATION, _MAX_ROTATION), COLOURS[colour])
            return


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, extent: float, angle: float, fill: RGB
) -> None:
    r = extent / 2
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        return
    if shape == "square":
        unit = [(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]
    elif shape == "triangle":
        h = math.sqrt(3) / 2  # equilateral, centred on its bounding box
        unit = [(0.0, -h), (1.0, h), (-1.0, h)]
    elif shape == "cross":
        t = 1 / 3
        unit = [(-t, -1.0), (t, -1.0), (t, -t), (1.0, -t), (1.0, t), (t, t), (t, 1.0), (-t, 1.0),
                (-t, t), (-1.0, t), (-1.0, -t), (-t, -t)]  # fmt: skip
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    points = [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in unit]
    draw.polygon(points, fill=fill)


def _caption(rng: random.Random, colour: str, shape: str, size_word: str | None, background: str) -> str:
    templates = _TEMPLATES_PLAIN + (_TEMPLATES_SIZED if size_word else ())
    template = rng.choice(templates)
    a = article(size_word) if size_word and "{size}" in template else article(colour)
    return template.format(
        a=a, colour=colour, shape=shape, size=size_word, a_bg=article(background), background=background
    )
