"""Peak memory and time per decode, before and after issue 9, in one run: a 24 MP JPEG and a 64 MP 16-bit PNG.

    before        the decoding clipdex had until issue 9 (kept below as `old_decode`): full-size decode,
                  16-bit samples through a float64 array, EXIF transpose of the full image
    after, full   shared.images.decode_image with no target size (as the CLI's `similar` had)
    after, model  decode_image(min_side=224): what the indexer and search uploads do for ViT-B-32
    after, thumb  decode_image(min_side=256): what a thumbnail does

Each case runs in a fresh process: its peak resident memory (VmHWM, reset just before the decode) minus
its resident memory before, then the median wall time of `--repeat` decodes.

    python bench/bench_decode.py [--repeat 5]

Not part of the test run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as a plain script from anywhere

from shared.errors import ImageRejected  # noqa: E402
from shared.images import decode_image  # noqa: E402

MB = 2**20
MAX_PIXELS = 64_000_000


# -- the baseline: clipdex's decoding before issue 9, verbatim ---------------------------------------------------

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def old_decode(data: bytes, *, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            img: Image.Image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as exc:
            raise ImageRejected("not an image (unrecognised format)") from exc
        width, height = img.size
        if width * height > max_pixels:
            raise ImageRejected("too many pixels")
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
        return _old_to_rgb(img)


def _old_to_rgb(img: Image.Image) -> Image.Image:
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
        if img.mode.startswith("I;16"):
            arr = arr / 257.0
        else:
            peak = float(arr.max()) if arr.size else 0.0
            if peak > 255:
                arr = arr * (255.0 / (65535.0 if peak <= 65535 else peak))
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


# -- inputs -----------------------------------------------------------------------------------------------------


def make_inputs(folder: Path) -> dict[str, Path]:
    """A 6000x4000 photo-like JPEG (quality 90) and an 8000x8000 16-bit grey PNG of gradients and noise."""
    rng = np.random.default_rng(0)
    jpeg = folder / "24mp.jpg"
    y, x = np.mgrid[0:4000, 0:6000]
    rgb = np.stack([(x * 255 // 6000), (y * 255 // 4000), ((x + y) * 255 // 10000)], axis=-1).astype(np.int16)
    rgb += rng.integers(-12, 12, rgb.shape, dtype=np.int16)
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(jpeg, quality=90)
    png = folder / "64mp-16bit.png"
    y, x = np.mgrid[0:8000, 0:8000]
    grey = ((x + y) * 4).astype(np.int32) + rng.integers(0, 64, (8000, 8000), dtype=np.int32)
    Image.fromarray(np.clip(grey, 0, 65535).astype(np.uint16)).save(png, compress_level=1)
    return {"24 MP JPEG": jpeg, "64 MP 16-bit PNG": png}


CASES = {
    "before": lambda data: old_decode(data, max_pixels=MAX_PIXELS),
    "after, full": lambda data: decode_image(data, max_pixels=MAX_PIXELS),
    "after, model (224)": lambda data: decode_image(data, max_pixels=MAX_PIXELS, min_side=224),
    "after, thumbnail (256)": lambda data: decode_image(data, max_pixels=MAX_PIXELS, min_side=256),
}


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(field)


def run_case(case: str, path: Path, repeat: int) -> dict[str, float | str]:
    """In this (fresh) process: peak memory of one decode, then the median time of `repeat`."""
    data = path.read_bytes()
    decode = CASES[case]
    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    img = decode(data)
    peak = _status_bytes("VmHWM") - before
    size = f"{img.size[0]}x{img.size[1]}"
    del img
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        decode(data)
        times.append(time.perf_counter() - started)
    return {"peak_mb": peak / MB, "seconds": statistics.median(times), "size": size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:  # a child process: one case
        print(json.dumps(run_case(args.case, args.input, args.repeat)))
        return 0
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; load average {load}")
    with tempfile.TemporaryDirectory(prefix="clipdex-decode-") as work:
        inputs = make_inputs(Path(work))
        print("| image | path | decoded to | peak memory | time per decode |")
        print("| --- | --- | --- | --- | --- |")
        for name, path in inputs.items():
            for case in CASES:
                out = subprocess.run(
                    [sys.executable, __file__, "--case", case, "--input", str(path), "--repeat", str(args.repeat)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                r = json.loads(out.stdout)
                print(f"| {name} | {case} | {r['size']} | {r['peak_mb']:,.0f} MB | {r['seconds'] * 1000:,.0f} ms |")
    print(f"load average after: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
