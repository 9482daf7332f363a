"""ONNX Runtime on the trained shapes model: fp32 is torch's vectors, int8 finds the same images.

The store rule this proves (shared/embedder.py, "Identity"): int8 and fp32 are one embedding space. A
store whose images were embedded at one precision is searched with text embedded at the other, or holds
vectors of both, with retrieval precision within 0.02 of fp32 throughout."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from clipdex.synthetic import COLOURS, SHAPES, class_caption, render_sample
from shared.embedder import Embedder, ModelSpec
from shared.types import Embedding
from tests.conftest import SHAPES_MODELS, model_cache

MODELS = SHAPES_MODELS
CLASSES = [(colour, shape) for colour in COLOURS for shape in SHAPES]
PER_CLASS = 6


def shapes(runtime: str, precision: str) -> Embedder:
    weights = str(MODELS / "clipdex-shapes.safetensors")
    spec = ModelSpec("clipdex-shapes", weights, MODELS, "cpu", precision, model_cache(), 0, runtime)
    embedder = Embedder(spec)
    embedder.load()
    return embedder


@pytest.fixture(scope="module")
def embedders() -> dict[str, Embedder]:
    return {"torch": shapes("torch", "fp32"), "fp32": shapes("onnx", "fp32"), "int8": shapes("onnx", "int8")}


@pytest.fixture(scope="module")
def held_out(embedders: dict[str, Embedder]) -> tuple[torch.Tensor, np.ndarray]:
    """Images of every class from seeds the training never used, through the product's preprocessing."""
    rng = random.Random(424_242)
    pixels, labels = [], []
    for label, (colour, shape) in enumerate(CLASSES):
        for _ in range(PER_CLASS):
            sample = render_sample(rng, size=rng.choice([48, 96, (120, 80)]), colour=colour, shape=shape)
            pixels.append(embedders["torch"].preprocess(sample.image))
            labels.append(label)
    return torch.stack(pixels), np.array(labels)


def text_p_at_5(texts: Embedding, images: Embedding, labels: np.ndarray) -> float:
    """Per class caption: the share of its 5 best images that are of that class."""
    top = np.argsort(-(texts @ images.T), axis=1)[:, :5]
    return float((labels[top] == np.arange(len(CLASSES))[:, None]).mean())


def image_p_at_5(queries: Embedding, images: Embedding, labels: np.ndarray) -> float:
    """Per image: the share of its 5 nearest other images that are of its class."""
    similarity = queries @ images.T
    np.fill_diagonal(similarity, -np.inf)
    top = np.argsort(-similarity, axis=1)[:, :5]
    return float((labels[top] == labels[:, None]).mean())


def test_fp32_onnx_equals_torch_on_the_trained_model(
    embedders: dict[str, Embedder], held_out: tuple[torch.Tensor, np.ndarray]
) -> None:
    pixels, _ = held_out
    got, want = embedders["fp32"].encode_images(pixels), embedders["torch"].encode_images(pixels)
    assert float(np.abs(got - want).max()) < 1e-4
    captions = [class_caption(c, s) for c, s in CLASSES] + ["a", "a " + "very " * 40 + "red circle"]  # 3 to 32 tokens
    for caption in captions:
        got = embedders["fp32"].encode_text(caption).vector
        assert float(np.abs(got - embedders["torch"].encode_text(caption).vector).max()) < 1e-4


def test_int8_keeps_every_vector_within_0_99_cosine(
    embedders: dict[str, Embedder], held_out: tuple[torch.Tensor, np.ndarray]
) -> None:
    pixels, _ = held_out
    images = (embedders["int8"].encode_images(pixels) * embedders["fp32"].encode_images(pixels)).sum(axis=1)
    captions = [class_caption(c, s) for c, s in CLASSES]
    texts = [float(embedders["int8"].encode_text(c).vector @ embedders["fp32"].encode_text(c).vector) for c in captions]
    assert images.min() >= 0.99 and min(texts) >= 0.99


def test_int8_retrieval_is_within_0_02_of_fp32_also_against_a_store_of_the_other_precision(
    embedders: dict[str, Embedder], held_out: tuple[torch.Tensor, np.ndarray]
) -> None:
    pixels, labels = held_out
    captions = [class_caption(c, s) for c, s in CLASSES]
    images = {p: embedders[p].encode_images(pixels) for p in ("fp32", "int8")}
    texts = {p: np.stack([t.vector for t in embedders[p].encode_texts(captions)]) for p in ("fp32", "int8")}
    mixed = np.where((np.arange(len(labels)) % 2 == 0)[:, None], images["fp32"], images["int8"])  # half and half

    base_text, base_image = (
        text_p_at_5(texts["fp32"], images["fp32"], labels),
        image_p_at_5(images["fp32"], images["fp32"], labels),
    )
    assert base_text >= 0.8 and base_image >= 0.8  # the model does retrieve: the comparison means something
    cases = {
        "int8 throughout": (texts["int8"], images["int8"], images["int8"]),
        "int8 queries, fp32 store": (texts["int8"], images["fp32"], images["int8"]),
        "fp32 queries, int8 store": (texts["fp32"], images["int8"], images["fp32"]),
        "a store of both": (texts["int8"], mixed, mixed),
    }
    for case, (text_q, store, image_q) in cases.items():
        assert abs(text_p_at_5(text_q, store, labels) - base_text) <= 0.02, case
        assert abs(image_p_at_5(image_q, store, labels) - base_image) <= 0.02, case
