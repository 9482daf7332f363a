"""The CLIP embedder against open_clip itself: same preprocessing, same text features with padding trimmed,
normalised float32 outputs, a query cache, a stable identity, and errors that say what to do."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from shared.embedder import Embedder, ModelSpec, weights_checksum
from shared.errors import CheckpointNotFound, ModelDownloadError, UnknownModelError
from tests.conftest import TINY_CONFIGS, TINY_MODEL

TEXTS = [
    "a",
    "a photo of a cat",
    "A RED bicycle leaning on a wall, at night, in the rain!",
    "",
    "emoji 🚲 and accents: café crème",
    " ".join(["word"] * 40),
    " ".join(["long"] * 200),  # over the 77-token context: cut
]


def spec(name: str = TINY_MODEL, pretrained: str | None = None, **kwargs: Any) -> ModelSpec:
    return ModelSpec(name, pretrained, TINY_CONFIGS, "cpu", "fp32", **{"runtime": "torch", **kwargs})


@pytest.fixture(scope="module")
def reference() -> tuple[Any, Any, Any]:
    """open_clip's own model, val transform and tokenizer for the tiny config (seeded as the embedder is)."""
    open_clip.add_model_config(TINY_CONFIGS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms(TINY_MODEL, pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer(TINY_MODEL)


def photo(width: int = 97, height: int = 61, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


# -- preprocessing and encoding ----------------------------------------------------------------------------------


def test_preprocessing_is_exactly_open_clips_val_transform(tiny_embedder: Embedder, reference: Any) -> None:
    _, preprocess, _ = reference
    for img in (photo(), photo(20, 300, seed=1), photo(32, 32, seed=2)):
        ours = tiny_embedder.preprocess(img)
        assert ours.shape == (3, 32, 32) and ours.dtype == torch.float32
        assert torch.equal(ours, preprocess(img))


def test_trimmed_text_encoding_equals_open_clips_encode_text(tiny_embedder: Embedder, reference: Any) -> None:
    model, _, tokenizer = reference
    tokens = tokenizer(TEXTS)
    with torch.inference_mode():
        padded = model.encode_text(tokens)
        trimmed = tiny_embedder.encode_tokens(tokens, trim=True)
        shorter = tiny_embedder.encode_tokens(tokenizer(TEXTS[:3]), trim=True)  # trimmed to a shorter length
    assert trimmed.shape == padded.shape
    assert float((trimmed - padded).abs().max()) < 1e-4
    assert float((shorter - padded[:3]).abs().max()) < 1e-4
    vectors = np.stack([t.vector for t in tiny_embedder.encode_texts(TEXTS)])
    np.testing.assert_allclose(vectors, F.normalize(padded, dim=-1).numpy(), atol=1e-5)


def test_image_encoding_equals_open_clips(tiny_embedder: Embedder, reference: Any) -> None:
    model, preprocess, _ = reference
    images = [photo(seed=s) for s in range(3)]
    with torch.inference_mode():
        want = F.normalize(model.encode_image(torch.stack([preprocess(i) for i in images])), dim=-1).numpy()
    np.testing.assert_allclose(tiny_embedder.encode_images(images), want, atol=1e-5)


def test_outputs_are_normalised_float32_of_shape_n_by_dim(tiny_embedder: Embedder) -> None:
    dim = tiny_embedder.identity.dim
    batch = torch.stack([tiny_embedder.preprocess(photo(seed=s)) for s in range(5)])
    for out in (
        tiny_embedder.encode_images(batch),
        tiny_embedder.encode_images([photo(seed=s) for s in range(5)]),
        np.stack([t.vector for t in tiny_embedder.encode_texts(TEXTS[:5])]),
    ):
        assert out.dtype == np.float32 and out.shape == (5, dim) and out.flags["C_CONTIGUOUS"]
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert tiny_embedder.encode_images(torch.zeros(0, 3, 32, 32)).shape == (0, dim)


def test_the_same_image_as_tensor_or_pil_gives_the_same_vector(tiny_embedder: Embedder) -> None:
    img = photo(seed=9)
    np.testing.assert_array_equal(
        tiny_embedder.encode_images([img]), tiny_embedder.encode_images(tiny_embedder.preprocess(img)[None])
    )


# -- the query cache and truncation ------------------------------------------------------------------------------


def test_recent_queries_come_from_the_cache(tiny_embedder: Embedder, monkeypatch: pytest.MonkeyPatch) -> None:
    embedder = Embedder(spec(query_cache_size=2))
    calls: list[str] = []
    original = embedder.encode_texts

    def counting(texts: Any) -> Any:
        calls.extend(texts)
        return original(texts)

    monkeypatch.setattr(embedder, "encode_texts", counting)
    first = embedder.encode_text("red car")
    assert embedder.encode_text("red car") is first
    embedder.encode_text("blue boat")
    embedder.encode_text("red car")  # refreshes it: "blue boat" is now the least recent
    embedder.encode_text("green tree")  # evicts "blue boat"
    embedder.encode_text("red car")
    embedder.encode_text("blue boat")
    assert calls == ["red car", "blue boat", "green tree", "blue boat"]
    np.testing.assert_array_equal(first.vector, tiny_embedder.encode_texts(["red car"])[0].vector)


def test_a_zero_cache_size_disables_the_cache() -> None:
    embedder = Embedder(spec(query_cache_size=0))
    assert embedder.encode_text("x") is not embedder.encode_text("x")


def test_a_query_over_the_context_length_is_flagged_truncated(tiny_embedder: Embedder) -> None:
    fits = " ".join(["a"] * 75)  # 75 tokens + start + end = 77
    cut = " ".join(["a"] * 76)
    flags = [t.truncated for t in tiny_embedder.encode_texts(["a cat", fits, cut, TEXTS[-1]])]
    assert flags == [False, False, True, True]
    assert tiny_embedder.encode_text(cut).truncated


# -- identity ----------------------------------------------------------------------------------------------------


def test_random_weights_have_a_stable_identity_across_loads(tiny_embedder: Embedder) -> None:
    again = Embedder(spec())
    try:
        assert again.identity == tiny_embedder.identity
        assert again.identity.name == TINY_MODEL and again.identity.pretrained == "none"
        assert again.identity.dim == 32 and len(again.identity.checksum) == 32
        np.testing.assert_array_equal(
            again.encode_texts(["same"])[0].vector, tiny_embedder.encode_texts(["same"])[0].vector
        )
    finally:
        again.close()


def test_a_local_checkpoint_loads_and_its_weights_make_its_identity(tiny_embedder: Embedder, tmp_path: Path) -> None:
    state = {k: v.clone().contiguous() for k, v in tiny_embedder.model.state_dict().items()}
    state["logit_scale"] = state["logit_scale"] + 1.0  # different weights, same architecture
    path = tmp_path / "tiny.safetensors"
    save_file(state, str(path))
    loaded = Embedder(spec(pretrained=str(path)))
    try:
        ident = loaded.identity
        assert ident.pretrained == str(path) and ident.dim == 32
        assert ident.checksum == weights_checksum(loaded.model) != tiny_embedder.identity.checksum
    finally:
        loaded.close()


# -- errors ------------------------------------------------------------------------------------------------------


def test_an_unknown_model_name_says_how_to_list_the_models() -> None:
    with pytest.raises(UnknownModelError, match=r"'ViT-Q-99'.*CLIPDEX_MODEL.*`clipdex models`"):
        Embedder(spec("ViT-Q-99")).load()


def test_an_unknown_pretrained_tag_lists_the_known_ones() -> None:
    with pytest.raises(UnknownModelError, match=r"no pretrained tag 'laion9b'.*laion2b_s34b_b79k"):
        Embedder(ModelSpec("ViT-B-32", "laion9b", None, "cpu", "fp32")).load()


def test_a_missing_checkpoint_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "weights.safetensors"
    with pytest.raises(CheckpointNotFound, match=str(missing)):
        Embedder(spec(pretrained=str(missing))).load()


def test_a_missing_configs_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="CLIPDEX_MODEL_CONFIGS"):
        Embedder(ModelSpec(TINY_MODEL, None, tmp_path / "nope", "cpu", "fp32")).load()


def test_a_hub_tag_that_cannot_download_says_to_use_a_local_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: set the module's flag too, so this never waits
    # on the network's retries (about 45 s when the hub is unreachable).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(ModelDownloadError, match=r"laion2b_s34b_b79k.*CLIPDEX_PRETRAINED to its path") as err:
        Embedder(ModelSpec("ViT-B-32", "laion2b_s34b_b79k", None, "cpu", "fp32")).load()
    assert time.monotonic() - started < 10
    assert not err.value.retriable


def test_the_test_run_itself_is_offline() -> None:
    """An accidental download anywhere in the suite must fail at once, not retry for a minute."""
    assert huggingface_hub.constants.HF_HUB_OFFLINE


# -- ViT-B-32 (slow: a real-size model, random weights) --------------------------------------------------------------


@pytest.mark.slow
def test_vit_b_32_trimmed_text_encoding_equals_padded() -> None:
    embedder = Embedder(ModelSpec("ViT-B-32", None, None, "cpu", "fp32"))
    try:
        assert embedder.identity.dim == 512
        tokens = embedder._tokenizer(TEXTS)
        with torch.inference_mode():
            padded = embedder.encode_tokens(tokens, trim=False)
            trimmed = embedder.encode_tokens(tokens, trim=True)
        assert float((trimmed - padded).abs().max()) < 1e-4
        vectors = np.stack([t.vector for t in embedder.encode_texts(TEXTS)])
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    finally:
        embedder.close()
