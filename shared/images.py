"""Image decoding with limits: bytes in, an RGB PIL image out, or ImageRejected saying why.

The pixel limit is checked from the header, before any pixel is decoded, so a decompression bomb costs
no memory. EXIF orientation is applied; CMYK, palette, LA, 16-bit and alpha images become RGB (alpha is
flattened on white); an animation gives its first frame.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shared.errors import ImageRejected

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode `data` to an RGB image, refusing anything that is not a whole image within the limit."""
    with warnings.catch_warnings():
        # Our own limit below replaces Pillow's bomb warning; Pillow's hard error still applies.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # Pillow warns about damaged metadata of untrusted files (a TIFF tag larger than the file):
        # the outcome, an image or ImageRejected, says all there is; the warning is log noise per file,
        # and an exception where warnings are errors (the test suite).
        warnings.simplefilter("ignore", UserWarning)
        try:
            img: Image.Image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as exc:
            raise ImageRejected("not an image (unrecognised format)") from exc
        except Image.DecompressionBombError as exc:
            raise ImageRejected(f"image too large: {exc}") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageRejected(f"corrupt image header: {exc}") from exc
        width, height = img.size
        if width * height > max_pixels:
            raise ImageRejected(
                f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
                f"{max_pixels:,} (CLIPDEX_MAX_PIXELS)"
            )
        try:
            img.seek(0)  # first frame of an animation
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageRejected(f"corrupt or truncated image: {exc}") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in _WIDE_MODES:
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):  # known 16-bit: scale, however dark the image is
            arr = arr / 257.0
        else:
            peak = float(arr.max()) if arr.size else 0.0
            if peak > 255:  # wider samples of unknown depth: scale to 8 bits rather than clip
                arr = arr * (255.0 / (65535.0 if peak <= 65535 else peak))
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def thumbnail_jpeg(img: Image.Image, max_side: int = 256, quality: int = 85) -> bytes:
    """A JPEG of at most `max_side` pixels on its longer side."""
    thumb = img.copy()
    thumb.thumbnail((max_side, max_side))
    out = io.BytesIO()
    thumb.save(out, format="JPEG", quality=quality)
    return out.getvalue()
