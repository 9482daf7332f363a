"""The committed tiny CLIP loads through open_clip like any user model and knows colours and shapes."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipdex.synthetic import COLOURS, SHAPES, class_caption, write_folder
from tests.conftest import SHAPES_MODELS

MODELS = SHAPES_MODELS
WEIGHTS = MODELS / "clipdex-shapes.safetensors"
CLASSES = [(colour, shape) for colour in COLOURS for shape in SHAPES]


@pytest.fixture(scope="module")
def shapes_model() -> tuple[Any, Any, Any]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        open_clip.add_model_config(MODELS)
        model, _, preprocess = open_clip.create_model_and_transforms("clipdex-shapes", pretrained=str(WEIGHTS))
    model.eval()
    return model, preprocess, open_clip.get_tokenizer("clipdex-shapes")


def test_checksum_file_matches_the_weights() -> None:
    recorded = (MODELS / "clipdex-shapes.sha256").read_text().split()[0]
    assert hashlib.sha256(WEIGHTS.read_bytes()).hexdigest() == recorded


def test_weights_are_small_and_load_as_fp32(shapes_model: tuple[Any, Any, Any]) -> None:
    model, _, _ = shapes_model
    assert WEIGHTS.stat().st_size <= 10_000_000
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_zero_shot_colour_and_shape_on_held_out_jpegs(shapes_model: tuple[Any, Any, Any], tmp_path: Path) -> None:
    model, preprocess, tokenizer = shapes_model
    # Two images of every class from a seed the training script never used, through JPEG files.
    written = []
    for i, (colour, shape) in enumerate(CLASSES):
        written += write_folder(tmp_path, 2, seed=900_000 + i, size=128, colours=[colour], shapes=[shape], start=2 * i)
    labels = torch.tensor([CLASSES.index((w.colour, w.shape)) for w in written])
    pixels = []
    for w in written:
        with Image.open(w.path) as img:
            pixels.append(preprocess(img.convert("RGB")))

    with torch.inference_mode():
        images = F.normalize(model.encode_image(torch.stack(pixels)), dim=-1)
        texts = F.normalize(model.encode_text(tokenizer([class_caption(c, s) for c, s in CLASSES])), dim=-1)
    predicted = (images @ texts.T).argmax(dim=1)
    accuracy = (predicted == labels).float().mean().item()
    assert accuracy >= 0.85, f"zero-shot colour+shape accuracy {accuracy:.3f} on {len(labels)} images"

    red_circle = texts[CLASSES.index(("red", "circle"))]
    best = (images @ red_circle).topk(2).indices
    assert [CLASSES[int(labels[i])] for i in best] == [("red", "circle")] * 2
