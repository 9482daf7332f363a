"""Decoding with limits: every image a catalog may hold becomes RGB, and everything else is refused with a reason."""

from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from shared.errors import ImageRejected
from shared.images import decode_image, thumbnail_jpeg

LIMIT = 10_000_000
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kwargs)
    return out.getvalue()


def close_to(pixel: tuple[int, ...], colour: tuple[int, int, int], tol: int = 12) -> bool:
    return all(abs(int(a) - b) <= tol for a, b in zip(pixel, colour, strict=True))


def halves(width: int = 64, height: int = 32) -> Image.Image:
    """Left half red, right half blue."""
    img = Image.new("RGB", (width, height), RED)
    img.paste(BLUE, (width // 2, 0, width, height))
    return img


# -- what becomes RGB -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orientation", "size", "top_left"),
    [(1, (64, 32), RED), (3, (64, 32), BLUE), (6, (32, 64), RED), (8, (32, 64), BLUE)],
)
def test_exif_orientation_is_applied(orientation: int, size: tuple[int, int], top_left: tuple[int, int, int]) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    img = decode_image(encode(halves(), "JPEG", exif=exif, quality=95), max_pixels=LIMIT)
    assert img.mode == "RGB" and img.size == size
    assert close_to(img.getpixel((4, 4)), top_left)  # type: ignore[arg-type]
    assert close_to(img.getpixel((size[0] - 5, size[1] - 5)), BLUE if top_left == RED else RED)  # type: ignore[arg-type]


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = halves().convert("CMYK")
    img = decode_image(encode(cmyk, "JPEG", quality=95), max_pixels=LIMIT)
    assert img.mode == "RGB"
    assert close_to(img.getpixel((4, 4)), RED, tol=30) and close_to(img.getpixel((60, 4)), BLUE, tol=30)  # type: ignore[arg-type]


def test_palette_with_a_transparent_index_is_flattened_on_white() -> None:
    pal = halves().convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
    blue_index = pal.getpixel((60, 4))
    for fmt in ("PNG", "GIF"):
        img = decode_image(encode(pal, fmt, transparency=blue_index), max_pixels=LIMIT)
        assert img.mode == "RGB"
        assert img.getpixel((4, 4)) == RED and img.getpixel((60, 4)) == WHITE, fmt


def test_palette_without_transparency_keeps_its_colours() -> None:
    pal = halves().convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
    img = decode_image(encode(pal, "PNG"), max_pixels=LIMIT)
    assert img.getpixel((4, 4)) == RED and img.getpixel((60, 4)) == BLUE


def test_rgba_and_la_are_flattened_on_white() -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (4, 0, 8, 8))  # fully transparent
    rgba.putpixel((0, 7), (0, 0, 0, 128))  # half transparent black over white
    img = decode_image(encode(rgba, "PNG"), max_pixels=LIMIT)
    assert img.getpixel((0, 0)) == RED and img.getpixel((6, 0)) == WHITE
    assert close_to(img.getpixel((0, 7)), (127, 127, 127), tol=2)  # type: ignore[arg-type]
    la = Image.new("LA", (4, 4), (0, 255))
    la.putpixel((3, 3), (0, 0))
    img = decode_image(encode(la, "PNG"), max_pixels=LIMIT)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (0, 0, 0) and img.getpixel((3, 3)) == WHITE


def test_16_bit_greyscale_is_scaled_not_clipped() -> None:
    wide = Image.fromarray(np.array([[0, 32896, 65535, 16448]], dtype=np.uint16))
    data = encode(wide, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    img = decode_image(data, max_pixels=LIMIT)
    assert img.mode == "RGB"
    assert [img.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255), (64, 64, 64)]


def test_a_dark_16_bit_image_stays_dark() -> None:
    """A 16-bit image whose brightest sample is 200/65535 is nearly black, not a full-range 8-bit image."""
    dark = Image.fromarray(np.array([[0, 100, 200]], dtype=np.uint16))
    img = decode_image(encode(dark, "PNG"), max_pixels=LIMIT)
    assert [img.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (0, 0, 0), (1, 1, 1)]


@pytest.mark.parametrize("mode", ["L", "1", "YCbCr"])
def test_other_modes_become_rgb(mode: str) -> None:
    img = decode_image(encode(halves().convert(mode), "TIFF"), max_pixels=LIMIT)
    assert img.mode == "RGB" and img.size == (64, 32)


def test_an_animation_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    for fmt in ("GIF", "WEBP", "PNG"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
        img = decode_image(data, max_pixels=LIMIT)
        assert img.mode == "RGB" and close_to(img.getpixel((8, 8)), RED), fmt  # type: ignore[arg-type]


# -- what is refused --------------------------------------------------------------------------------------------------


def test_a_truncated_jpeg_is_refused() -> None:
    data = encode(Image.effect_noise((256, 256), 64).convert("RGB"), "JPEG")
    with pytest.raises(ImageRejected, match="truncated"):
        decode_image(data[: len(data) // 2], max_pixels=LIMIT)


def test_a_text_file_named_jpg_is_refused() -> None:
    with pytest.raises(ImageRejected, match="not an image"):
        decode_image(b"Hello, this is a README saved as photo.jpg\n" * 10, max_pixels=LIMIT)


def test_empty_bytes_are_refused() -> None:
    with pytest.raises(ImageRejected, match="not an image"):
        decode_image(b"", max_pixels=LIMIT)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries a single tiny IDAT: a bomb costs nothing to make."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_an_image_over_the_pixel_limit_is_refused_from_its_header() -> None:
    with pytest.raises(ImageRejected, match=r"12000x10000 = 120,000,000 pixels.*CLIPDEX_MAX_PIXELS"):
        decode_image(_png_header_only(12_000, 10_000), max_pixels=64_000_000)


def test_a_decompression_bomb_is_refused_before_decoding() -> None:
    with pytest.raises(ImageRejected, match=r"too large|over the limit"):
        decode_image(_png_header_only(100_000, 100_000), max_pixels=64_000_000)


def test_the_pixel_limit_is_the_callers() -> None:
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    assert decode_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageRejected, match="10,000 pixels, over the limit of 9,999"):
        decode_image(data, max_pixels=9_999)


def test_corrupted_images_are_refused_never_raised_as_something_else() -> None:
    """A bad file must become a dead letter, not crash the batch: only ImageRejected may come out."""
    rng = random.Random(5)
    noise = Image.effect_noise((48, 32), 50).convert("RGB")
    originals = [encode(noise, fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP")]
    outcomes = {"decoded": 0, "rejected": 0}
    for n in range(300):
        data = bytearray(originals[n % len(originals)])
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(1, len(data))]
        try:
            assert decode_image(bytes(data), max_pixels=LIMIT).mode == "RGB"
            outcomes["decoded"] += 1
        except ImageRejected as exc:
            assert str(exc)
            outcomes["rejected"] += 1
    assert min(outcomes.values()) > 30, outcomes


# -- thumbnails ------------------------------------------------------------------------------------------------------


def test_a_thumbnail_is_a_jpeg_within_the_size_keeping_the_aspect() -> None:
    data = thumbnail_jpeg(halves(1000, 500), max_side=128)
    thumb = Image.open(io.BytesIO(data))
    assert thumb.format == "JPEG" and thumb.size == (128, 64)
