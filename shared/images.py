"""Image decoding with limits: bytes in, an RGB PIL image out, or ImageRejected saying why.

    bytes ─▶ Image.open(formats=FORMATS)  header only; Pillow's bomb limit is max_pixels
          ─▶ pixel check                   refused here, before any pixel is decoded
          ─▶ JPEG draft                    DCT scaling: decode at 1/2, 1/4 or 1/8 straight from the file
          ─▶ budget.hold(estimate)         wait until this process's decode memory has room
          ─▶ load ─▶ 8 bits ─▶ reduce ─▶ RGB ─▶ EXIF orientation

Only the formats clipdex lists are opened: a container such as ICO is decoded by Pillow inside
`Image.open`, before any limit of ours could look at it. Pillow's own decompression-bomb limit is set to
`max_pixels` as well, so a frame or entry over twice the limit is refused from its header whatever the
format. With `min_side`, big images are decoded reduced (their shorter side kept at least twice
`min_side`, so the caller's own resampling keeps its quality): a 24 MP JPEG decodes at 1/4 or 1/8 scale.
16-bit and 32-bit samples become 8 bits strip by strip (no full-size float copy). Alpha is flattened on
white; an animation gives its first frame, a TIFF its first page.

Concurrent decodes of one process share a `DecodeBudget` (CLIPDEX_DECODE_MEMORY_MB): each holds an
estimate of its peak memory, from the header, while it decodes.
"""

from __future__ import annotations

import functools
import io
import logging
import threading
import warnings
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL import _imaging as pillow_core  # the C core, whose allocator settings Image does not re-export

from shared.errors import ImageRejected

logger = logging.getLogger(__name__)

# What a catalog holds. Not ICO, ICNS, MPO-as-such, PSD, EPS, fonts...: formats whose plugins decode (or
# shell out) while opening, or that no catalog needs. AVIF is added where this Pillow can read it.
FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP", "AVIF")

REDUCING_GAP = 2  # decode to at least twice the size asked for: the later resampling then matches a full decode

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_NOT_REDUCIBLE = _WIDE_MODES | {"P", "1"}  # Image.reduce refuses these; they become 8-bit first
_STRIP_PIXELS = 1 << 18  # wide samples are converted this many pixels at a time (1 MB of float32)
# Pillow allocates a big image in blocks of 16 MB by default. glibc serves those from its heap once its
# mmap threshold has adapted upward, and keeps them in the decoding thread's arena after they are freed,
# so the process stays as big as its worst moment (three 64 MP decodes taking turns left 361 MB resident;
# with 64 MB blocks, 195 MB: one decode's worth). Blocks over 32 MB, glibc's largest threshold, are
# always mmapped and go back to the system when freed.
_PILLOW_BLOCK_SIZE = 64 * 2**20
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# -- the memory budget -------------------------------------------------------------------------------------------


class DecodeBudget:
    """Bytes that the decodes running in one process may hold together; a decode waits for its share.

    First come, first served: a big decode waiting is not overtaken by small ones (it would starve). A
    decode bigger than the whole budget waits until it has the budget to itself, rather than never running.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("a decode budget needs a positive capacity")
        self.capacity = capacity
        self.in_use = 0
        self.high_water = 0  # the most ever held at once: for tests and benchmarks
        self._changed = threading.Condition()
        self._queue: deque[object] = deque()

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        nbytes = max(0, min(nbytes, self.capacity))
        ticket = object()
        with self._changed:
            self._queue.append(ticket)
            try:
                self._changed.wait_for(lambda: self._queue[0] is ticket and self.in_use + nbytes <= self.capacity)
            finally:
                self._queue.remove(ticket)
                self._changed.notify_all()
            self.in_use += nbytes
            self.high_water = max(self.high_water, self.in_use)
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= nbytes
                self._changed.notify_all()


@functools.cache
def decode_budget(megabytes: int) -> DecodeBudget:
    """The process's budget for CLIPDEX_DECODE_MEMORY_MB = `megabytes`.

    One per process, not one per caller: HTTP uploads, thumbnails and the indexer's decode pool of one
    process (`clipdex run` has all three) draw on the same memory."""
    return DecodeBudget(megabytes * 2**20)


# -- decoding --------------------------------------------------------------------------------------------------------


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    min_side: int | None = None,
    budget: DecodeBudget | None = None,
    formats: tuple[str, ...] = FORMATS,
) -> Image.Image:
    """Decode `data` to an RGB image, refusing anything that is not a whole image within the limit.

    min_side: the size the caller needs (the model's input side, a thumbnail's side); a bigger image is
        decoded reduced, its shorter side kept at least REDUCING_GAP times this. None: full size.
    budget: the process's decode memory; the decode waits for room for its estimated peak.
    """
    # Process-wide, but every caller in a process passes the same CLIPDEX_MAX_PIXELS. Pillow refuses a
    # frame over twice this from its header (a warning between once and twice, caught below); clipdex's
    # own check refuses anything over it, before decoding, for every listed format.
    Image.MAX_IMAGE_PIXELS = max_pixels
    _configure_pillow()
    with warnings.catch_warnings():
        # Pillow warns about damaged metadata of untrusted files (a TIFF tag larger than the file): the
        # outcome, an image or ImageRejected, says all there is; the warning is log noise per file.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = _open(data, max_pixels, formats)
        try:
            img.seek(0)  # first frame of an animation, first page of a TIFF
            full_pixels = img.size[0] * img.size[1]
            if min_side is not None and img.format in ("JPEG", "MPO"):
                img.draft(None, _at_least(img.size, min_side * REDUCING_GAP))
            cost = _decode_cost(img, min_side, full_pixels)
            if budget is None:
                return _decode(img, min_side)
            with budget.hold(cost):
                return _decode(img, min_side)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombWarning) as exc:
            raise ImageRejected(f"corrupt or truncated image: {exc}") from exc


def _open(data: bytes, max_pixels: int, formats: tuple[str, ...]) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data), formats=_available(formats))
    except UnidentifiedImageError as exc:
        raise ImageRejected(f"not an image in a supported format ({', '.join(_available(formats))})") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(f"image too large: over the limit of {max_pixels:,} pixels (CLIPDEX_MAX_PIXELS)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected(f"corrupt image header: {exc}") from exc
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRejected(
            f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} (CLIPDEX_MAX_PIXELS)"
        )
    return img


@functools.cache
def _configure_pillow() -> None:
    pillow_core.set_block_size(_PILLOW_BLOCK_SIZE)


@functools.cache
def _available(formats: tuple[str, ...]) -> tuple[str, ...]:
    """`formats` that this Pillow can open (Image.open raises KeyError on an unregistered one)."""
    Image.init()
    return tuple(f for f in formats if f in Image.OPEN)


def _decode(img: Image.Image, min_side: int | None) -> Image.Image:
    img.load()
    orientation = _orientation(img)  # after load: a PNG may carry its EXIF after the pixels
    if min_side is not None:
        factor = min(img.size) // (min_side * REDUCING_GAP)
        if factor >= 2:
            if img.mode in _NOT_REDUCIBLE:
                img = _to_8_bits(img) if img.mode != "P" else to_rgb(img)
            img = img.reduce(factor)
    img = to_rgb(img)
    method = _ORIENTATION.get(orientation)
    return img.transpose(method) if method is not None else img


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # damaged EXIF of an untrusted file: show the image as stored
        return 1
    return value if isinstance(value, int) else 1


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_MODES or img.mode == "1":
        return _to_8_bits(img).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _to_8_bits(img: Image.Image) -> Image.Image:
    """An "L" image of a grey `img` (wide, "1" or "L"). Wide samples are scaled, strip by
    strip in float32: 16-bit ones by 1/257 however dark the image (a 16-bit image whose brightest sample
    is 200 is nearly black, not full range); wider ones of unknown depth to 8 bits rather than clipped."""
    if img.mode not in _WIDE_MODES:
        return img.convert("L")
    if img.mode.startswith("I;16"):
        scale = 1 / 257
    else:
        _, high = img.getextrema()
        peak = float(high)  # type: ignore[arg-type]
        scale = 1.0 if peak <= 255 else 255.0 / (65535.0 if peak <= 65535 else peak)
    width, height = img.size
    out = Image.new("L", img.size)
    rows = max(1, _STRIP_PIXELS // max(1, width))
    for top in range(0, height, rows):
        box = (0, top, width, min(height, top + rows))
        strip = np.asarray(img.crop(box), dtype=np.float32)
        np.multiply(strip, np.float32(scale), out=strip)
        np.clip(np.rint(strip, out=strip), 0, 255, out=strip)
        out.paste(Image.fromarray(strip.astype(np.uint8), "L"), box)
    return out


def _at_least(size: tuple[int, int], side: int) -> tuple[int, int]:
    """The smallest size of `size`'s aspect whose shorter side is `side` (no bigger than `size`)."""
    short = min(size)
    if short <= side:
        return size
    return (max(1, -(-size[0] * side // short)), max(1, -(-size[1] * side // short)))


# Bytes a pixel takes in Pillow's memory (RGB is stored in 4).
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def _decode_cost(img: Image.Image, min_side: int | None, file_pixels: int) -> int:
    """An estimate, from the header, of the most memory decoding `img` holds at once (after any draft):
    the decoded pixels, the 8-bit copy of wide or palette samples, the RGB (and alpha-flattening) copies
    of the possibly reduced image, and what the decoder itself keeps (a progressive JPEG's coefficients
    at full size, libwebp's own canvas)."""
    width, height = img.size
    pixels = width * height
    cost = pixels * _BYTES_PER_PIXEL.get(img.mode, 4)
    out_pixels = pixels
    if min_side is not None:
        factor = min(img.size) // (min_side * REDUCING_GAP)
        if factor >= 2:
            out_pixels = pixels // (factor * factor)
            if img.mode in _NOT_REDUCIBLE:  # the copy reduce works on: 8-bit grey, or RGB from a palette
                cost += pixels * (9 if img.mode == "P" else 1)
    elif img.mode in _WIDE_MODES:
        cost += pixels
    cost += out_pixels * 13  # RGBA + RGB + mask while flattening alpha, then the transposed copy
    if img.format in ("JPEG", "MPO") and (img.info.get("progressive") or img.info.get("progression")):
        cost += file_pixels * 6
    elif img.format == "WEBP":
        cost += pixels * 4
    return cost


def thumbnail_jpeg(img: Image.Image, max_side: int = 256, quality: int = 85) -> bytes:
    """A JPEG of at most `max_side` pixels on its longer side (decode with min_side=max_side first)."""
    thumb = img.copy()
    thumb.thumbnail((max_side, max_side))
    out = io.BytesIO()
    thumb.save(out, format="JPEG", quality=quality)
    return out.getvalue()
