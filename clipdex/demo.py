"""`clipdex demo [DIR]`: the main job, offline, on generated images with the bundled shapes model.

The model (`clipdex/models/`: a tiny CLIP trained for this project, see its README) and the image
renderer (`clipdex.synthetic`) ship inside this package, so the demo runs from an installed wheel or the
Docker image as well as from a clone.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from clipdex import synthetic
from clipdex.run import cmd_run, server_flags
from shared.config import Settings
from shared.errors import ConfigError

MODEL_DIR = Path(__file__).resolve().parent / "models"  # a configs directory (CLIPDEX_MODEL_CONFIGS) too
MODEL = "clipdex-shapes"
CHECKPOINT = MODEL_DIR / f"{MODEL}.safetensors"

logger = logging.getLogger(__name__)


def register(sub: Any) -> None:  # argparse's _SubParsersAction is private
    demo = sub.add_parser(
        "demo",
        help="offline demo: generate shape images and run the main job on them with the bundled shapes model",
        description="Writes generated images (coloured circles, squares, triangles and crosses) to DIR/images "
        "and runs `clipdex run` on them with the small shapes model bundled with clipdex. That model knows "
        "only shapes and colours; the default model for real photos is ViT-B-32 (laion2b).",
    )
    demo.add_argument("dir", type=Path, nargs="?", default=Path("clipdex-demo"), metavar="DIR")
    demo.add_argument(
        "--count", type=int, default=192, help="images to generate, spread evenly over 32 classes (default: 192)"
    )
    server_flags(demo)
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    if not CHECKPOINT.is_file():
        raise ConfigError(f"the demo model is missing ({CHECKPOINT}): reinstall clipdex")
    images = args.dir / "images"
    if not images.is_dir() or not any(images.iterdir()):
        written = write_images(images, args.count)
        logger.info("wrote %d demo images to %s", written, images)
    url = f"http://{settings.host}:{settings.port}"
    print(
        f"clipdex demo: generated images in {images}, searched with the bundled shapes model.\n"
        "  This model knows ONLY shapes (circle, square, triangle, cross) and colours; for real photos use\n"
        "  the default model, ViT-B-32 (laion2b_s34b_b79k).\n"
        f"  Try:  curl '{url}/search?query=a+red+circle&top_k=5'\n"
        f"        clipdex --data-dir {args.dir / 'data'} status\n"
        f"  MCP:  {url}/mcp   API docs: {url}/docs   Ctrl-C to stop.",
        file=sys.stderr,
    )
    args.dir = images
    return cmd_run(args, demo_settings(settings, args.dir.parent / "data"))


def demo_settings(settings: Settings, data_dir: Path) -> Settings:
    """`settings` with the bundled model and the demo's own store."""
    return settings.model_copy(
        update={"data_dir": data_dir, "model": MODEL, "pretrained": str(CHECKPOINT), "model_configs": MODEL_DIR}
    )


def write_images(folder: Path, count: int) -> int:
    """About `count` images, the same number of each colour and shape, so every query has answers."""
    classes = [(colour, shape) for colour in synthetic.COLOURS for shape in synthetic.SHAPES]
    per_class = max(1, count // len(classes))
    for i, (colour, shape) in enumerate(classes):
        synthetic.write_folder(
            folder, per_class, seed=2026 + i, size=(320, 240), colours=[colour], shapes=[shape], start=i * per_class
        )
    return per_class * len(classes)
