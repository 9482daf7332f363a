"""Decoding with limits: every image a catalog may hold becomes RGB, and everything else is refused with a reason."""

from __future__ import annotations

import io
import random
import struct
import threading
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from bench.hostile_images import flat_png, ico_holding
from shared.errors import ImageRejected
from shared.images import FORMATS, DecodeBudget, decode_budget, decode_image, thumbnail_jpeg

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


# -- hostile images: formats, containers, memory (issue 9) ---------------------------------------------------------


def test_only_the_listed_formats_are_decoded() -> None:
    """An ICO is a container whose entries Pillow decodes inside Image.open: clipdex does not list it."""
    assert "ICO" not in FORMATS and {"JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"} <= set(FORMATS)
    icon = encode(halves(32, 32), "ICO")
    assert Image.open(io.BytesIO(icon)).format == "ICO"  # Pillow itself would open it
    with pytest.raises(ImageRejected, match="not an image in a supported format"):
        decode_image(icon, max_pixels=LIMIT)


def test_a_container_entry_over_the_limit_is_refused_by_pillow_before_it_is_decoded() -> None:
    """Even where a container format is allowed, Pillow's own bomb limit is clipdex's pixel limit, so an
    entry over it is refused from its header, before its pixels are inflated."""
    bomb = ico_holding(flat_png(6_000, 6_000))  # 36 MP behind a 256x256 directory entry
    assert len(bomb) < 200_000
    with pytest.raises(ImageRejected, match=r"over the limit of 10,000,000 pixels") as err:
        decode_image(bomb, max_pixels=LIMIT, formats=("ICO",))
    assert isinstance(err.value.__cause__, Image.DecompressionBombError)


def test_a_16_bit_image_is_converted_without_a_full_size_float_copy() -> None:
    """numpy reports its allocations to tracemalloc: the old path made float64 copies (8 bytes a pixel)."""
    wide = np.tile(np.arange(2_000, dtype=np.uint16) * 32, (1_500, 1))
    data = encode(Image.fromarray(wide), "PNG")
    tracemalloc.start()
    try:
        img = decode_image(data, max_pixels=LIMIT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert img.size == (2_000, 1_500) and img.mode == "RGB"
    assert img.getpixel((1_999, 0)) == (round(1_999 * 32 / 257),) * 3
    assert peak < 2_000 * 1_500, f"{peak:,} bytes of numpy arrays for a 3 MP image"


def photo(width: int, height: int) -> Image.Image:
    """Smooth gradients and a few hard edges, like a photo rather than noise."""
    base = Image.linear_gradient("L").resize((width, height))
    img = Image.merge("RGB", (base, base.transpose(Image.Transpose.ROTATE_180), Image.new("L", (width, height), 90)))
    img.paste(RED, (width // 5, height // 5, width // 2, height // 2))
    img.paste(BLUE, (width // 2, height // 2, width * 4 // 5, height * 4 // 5))
    return img


@pytest.mark.parametrize(("fmt", "size"), [("JPEG", (4_000, 3_000)), ("PNG", (3_000, 2_000))])
def test_a_big_image_is_decoded_reduced_toward_the_size_asked_for(fmt: str, size: tuple[int, int]) -> None:
    data = encode(photo(*size), fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    img = decode_image(data, max_pixels=64_000_000, min_side=224)
    assert 2 * 224 <= min(img.size) < 4 * 224, img.size  # twice the model's side: resampling keeps its quality
    assert abs(img.size[0] / img.size[1] - size[0] / size[1]) < 0.01
    full = decode_image(data, max_pixels=64_000_000)
    assert full.size == size
    # What the model sees (its input is a bicubic resize to 224) hardly differs.
    seen = [
        np.asarray(i.resize((224 * size[0] // size[1], 224), Image.Resampling.BICUBIC), np.int16) for i in (img, full)
    ]
    assert np.abs(seen[0] - seen[1]).mean() < 2.0


def test_a_reduced_decode_still_applies_the_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img = decode_image(encode(halves(2_000, 1_000), "JPEG", exif=exif, quality=95), max_pixels=LIMIT, min_side=224)
    assert img.size[1] > img.size[0] and min(img.size) >= 448
    assert close_to(img.getpixel((4, 4)), RED) and close_to(img.getpixel((img.size[0] - 5, img.size[1] - 5)), BLUE)  # type: ignore[arg-type]


def test_small_images_are_not_reduced() -> None:
    data = encode(halves(600, 500), "PNG")
    assert decode_image(data, max_pixels=LIMIT, min_side=224).size == (600, 500)


# -- the decode memory budget ---------------------------------------------------------------------------------------


def test_a_decode_waits_for_room_in_the_budget() -> None:
    budget = DecodeBudget(8 * 2**20)
    data = encode(halves(1_000, 1_000), "PNG")
    done: list[Image.Image] = []
    with budget.hold(budget.capacity):  # everything taken, as by other decodes
        worker = threading.Thread(target=lambda: done.append(decode_image(data, max_pixels=LIMIT, budget=budget)))
        worker.start()
        worker.join(0.3)
        assert worker.is_alive() and not done
    worker.join(10)
    assert done and done[0].size == (1_000, 1_000)
    assert budget.in_use == 0
    assert budget.high_water >= 1_000 * 1_000 * 4  # it held at least the RGB pixels it decoded


def test_a_decode_bigger_than_the_whole_budget_runs_alone_rather_than_never() -> None:
    budget = DecodeBudget(2**20)
    img = decode_image(encode(halves(1_000, 1_000), "PNG"), max_pixels=LIMIT, budget=budget)
    assert img.size == (1_000, 1_000) and budget.in_use == 0 and budget.high_water == budget.capacity


def test_the_budget_serves_waiters_in_order() -> None:
    budget = DecodeBudget(100)
    order: list[str] = []
    first = budget.hold(100)
    first.__enter__()

    def take(name: str, nbytes: int) -> None:
        with budget.hold(nbytes):
            order.append(name)

    big = threading.Thread(target=take, args=("big", 100))
    big.start()
    time.sleep(0.1)
    small = threading.Thread(target=take, args=("small", 10))
    small.start()
    time.sleep(0.1)
    assert order == []  # the small one does not overtake the big one that waits before it
    first.__exit__(None, None, None)
    big.join(5)
    small.join(5)
    assert order == ["big", "small"]


def test_one_budget_per_process_for_one_setting() -> None:
    assert decode_budget(512) is decode_budget(512)
    assert decode_budget(512).capacity == 512 * 2**20


def test_a_big_palette_image_keeps_its_colours_when_reduced() -> None:
    pal = halves(2_000, 1_200).convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
    img = decode_image(encode(pal, "PNG"), max_pixels=LIMIT, min_side=224)
    assert min(img.size) < 1_200 and img.mode == "RGB"
    assert close_to(img.getpixel((4, 4)), RED) and close_to(img.getpixel((img.size[0] - 5, 4)), BLUE)  # type: ignore[arg-type]
