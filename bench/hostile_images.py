"""Hostile image files that cost little to send and much to decode: for the tests and the benchmarks.

Each is a whole, valid file of zeros, so zlib squeezes it about a thousandfold:
- `flat_png(8000, 8000, depth=16)`: 124 KB that decode to 64 MP of 16-bit samples.
- `ico_holding(flat_png(12000, 12000, colour_type=6))`: 0.56 MB, an ICO whose one entry is a
  144 MP RGBA PNG. Pillow decodes an ICO's entry inside `Image.open`, before a caller sees its size.
"""

from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def flat_png(width: int, height: int, *, depth: int = 8, colour_type: int = 0) -> bytes:
    """A PNG of zeros: colour_type 0 grey, 2 RGB, 4 grey + alpha, 6 RGBA; depth 8 or 16."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\0" * (1 + width * channels * depth // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def ico_holding(png: bytes) -> bytes:
    """An ICO whose one entry is `png` (its directory says 256x256; Pillow believes the PNG)."""
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png


def sixteen_bit_bomb() -> bytes:
    """The issue's 16-bit PNG: 8000x8000 grey, 16 bits a sample (64 MP, exactly the default pixel limit)."""
    return flat_png(8000, 8000, depth=16)


def ico_bomb() -> bytes:
    """The issue's ICO: one 12000x12000 RGBA PNG entry (144 MP), 0.56 MB."""
    return ico_holding(flat_png(12000, 12000, colour_type=6))
