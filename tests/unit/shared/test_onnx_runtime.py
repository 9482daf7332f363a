"""The embedder on ONNX Runtime: the same vectors as torch (fp32), close ones (int8), the same identity, the
runtime and precision settings, tuned sessions, and the inputs a stranger controls."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.config import load_settings
from shared.embedder import Embedder, ModelSpec
from shared.errors import ConfigError, ModelExportError
from shared.onnx_towers import QUERY_THREADS, OnnxTowers, cpu_count
from shared.sqlite.store import SqliteStore
from tests.conftest import TINY_CONFIGS, TINY_MODEL, model_cache

TEXTS = [
    "",
    "a",
    "a photo of a cat",
    "A RED bicycle leaning on a wall, at night, in the rain!",
    "emoji 🚲 and accents: café crème",
    " ".join(["word"] * 40),
    " ".join(["long"] * 200),  # over the 77-token context: cut
]


def tiny(runtime: str = "onnx", precision: str = "fp32", **kwargs: object) -> Embedder:
    return Embedder(ModelSpec(TINY_MODEL, None, TINY_CONFIGS, "cpu", precision, model_cache(), 0, runtime, **kwargs))


def photos(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 4 - 2


@pytest.fixture(scope="module")
def tiny_int8() -> Embedder:
    embedder = tiny(precision="int8")
    embedder.load()
    return embedder


# -- parity ------------------------------------------------------------------------------------------------------


def test_fp32_text_vectors_equal_torch_at_every_sequence_length(
    tiny_embedder: Embedder, tiny_onnx_embedder: Embedder
) -> None:
    assert tiny_onnx_embedder.runtime == "onnx" and tiny_onnx_embedder.precision == "fp32"
    for batch in ([t] for t in TEXTS):  # one at a time: each trimmed to its own length (2 to 77 tokens)
        got = tiny_onnx_embedder.encode_texts(batch)[0]
        want = tiny_embedder.encode_texts(batch)[0]
        assert float(np.abs(got.vector - want.vector).max()) < 1e-4
        assert got.truncated == want.truncated
    together = np.stack([t.vector for t in tiny_onnx_embedder.encode_texts(TEXTS)])  # trimmed to the longest
    want_all = np.stack([t.vector for t in tiny_embedder.encode_texts(TEXTS)])
    assert float(np.abs(together - want_all).max()) < 1e-4


def test_fp32_untrimmed_tokens_give_the_same_features_as_trimmed(tiny_onnx_embedder: Embedder) -> None:
    tokens = tiny_onnx_embedder._tokenizer(TEXTS[:4])
    padded = tiny_onnx_embedder.encode_tokens(tokens, trim=False)  # all 77 positions through the ONNX graph
    trimmed = tiny_onnx_embedder.encode_tokens(tokens, trim=True)
    assert padded.shape == trimmed.shape == (4, 32)
    assert float((padded - trimmed).abs().max()) < 1e-4


def test_fp32_image_vectors_equal_torch_in_any_batch_size(
    tiny_embedder: Embedder, tiny_onnx_embedder: Embedder
) -> None:
    for n in (1, 3, 17):
        pixels = photos(n, seed=n)
        got, want = tiny_onnx_embedder.encode_images(pixels), tiny_embedder.encode_images(pixels)
        assert got.shape == (n, 32) and got.dtype == np.float32 and got.flags["C_CONTIGUOUS"]
        assert float(np.abs(got - want).max()) < 1e-4
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_int8_vectors_keep_a_cosine_of_at_least_0_99_to_fp32(tiny_embedder: Embedder, tiny_int8: Embedder) -> None:
    assert tiny_int8.precision == "int8"
    texts = np.stack([t.vector for t in tiny_int8.encode_texts(TEXTS)])
    want = np.stack([t.vector for t in tiny_embedder.encode_texts(TEXTS)])
    assert (texts * want).sum(axis=1).min() >= 0.99
    pixels = photos(16, seed=3)
    assert (tiny_int8.encode_images(pixels) * tiny_embedder.encode_images(pixels)).sum(axis=1).min() >= 0.99
    assert float(np.abs(texts - want).max()) > 1e-6  # really quantised, not the fp32 graph under another name


def test_int8_files_are_quantised_and_smaller(tiny_onnx_embedder: Embedder, tiny_int8: Embedder) -> None:
    import onnx

    fp32, int8 = tiny_onnx_embedder._onnx.paths, tiny_int8._onnx.paths
    graph = onnx.load(str(int8["image"])).graph
    assert any(node.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for node in graph.node)
    assert int8["image"].stat().st_size < fp32["image"].stat().st_size


# -- identity: what a store may mix ------------------------------------------------------------------------------


def test_every_runtime_and_precision_has_the_models_identity(
    tiny_embedder: Embedder, tiny_onnx_embedder: Embedder, tiny_int8: Embedder, tmp_path: Path
) -> None:
    """One embedding space: a store written by torch is searched and extended by ONNX fp32 or int8."""
    assert tiny_embedder.identity == tiny_onnx_embedder.identity == tiny_int8.identity
    store = SqliteStore(tmp_path / "s.sqlite3")
    try:
        store.bind_model(tiny_embedder.identity)
        store.bind_model(tiny_int8.identity)  # no ModelMismatchError
        store.bind_model(tiny_onnx_embedder.identity)
    finally:
        store.close()


# -- the settings ------------------------------------------------------------------------------------------------


def test_runtime_and_precision_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().runtime == "auto"
    monkeypatch.setenv("CLIPDEX_RUNTIME", "onnx")
    monkeypatch.setenv("CLIPDEX_PRECISION", "int8")
    settings = load_settings()
    assert (settings.runtime, settings.precision) == ("onnx", "int8")
    assert ModelSpec.from_settings(settings).runtime == "onnx"
    monkeypatch.setenv("CLIPDEX_RUNTIME", "tensorrt")
    with pytest.raises(ConfigError, match="CLIPDEX_RUNTIME"):
        load_settings()


def test_auto_runs_onnx_on_the_cpu_and_torch_when_asked() -> None:
    assert tiny("auto").runtime == "onnx"
    assert tiny("torch").runtime == "torch"


def test_int8_on_torch_is_refused_with_what_to_set() -> None:
    with pytest.raises(ConfigError, match=r"CLIPDEX_PRECISION=int8.*CLIPDEX_RUNTIME=onnx"):
        tiny("torch", "int8")


def test_onnx_on_cuda_is_refused_with_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="CLIPDEX_RUNTIME=onnx runs on the CPU"):
        Embedder(ModelSpec(TINY_MODEL, None, TINY_CONFIGS, "cuda", "fp32", runtime="onnx"))


def test_fp16_on_onnx_runs_fp32_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert tiny("onnx", "fp16").precision == "fp32"
    assert "fp32 or int8, not fp16" in caplog.text


def test_auto_falls_back_to_torch_when_the_export_fails(
    tiny_embedder: Embedder, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> None:
        raise ModelExportError("cannot export the image tower to ONNX: an operator it does not know")

    monkeypatch.setattr("shared.onnx_export._export", broken)
    fallback = Embedder(ModelSpec(TINY_MODEL, None, TINY_CONFIGS, "cpu", "auto", tmp_path, runtime="auto"))
    with caplog.at_level(logging.WARNING):
        fallback.load()
    assert fallback.runtime == "torch" and fallback.precision == "fp32"
    assert "falls back to torch" in caplog.text
    np.testing.assert_allclose(
        fallback.encode_texts(["x"])[0].vector, tiny_embedder.encode_texts(["x"])[0].vector, atol=1e-6
    )
    strict = Embedder(ModelSpec(TINY_MODEL, None, TINY_CONFIGS, "cpu", "fp32", tmp_path, runtime="onnx"))
    with pytest.raises(ModelExportError, match="operator it does not know"):
        strict.load()


# -- sessions and memory -----------------------------------------------------------------------------------------


def test_queries_run_on_one_thread_and_batches_on_every_core(tiny_onnx_embedder: Embedder) -> None:
    towers = tiny_onnx_embedder._onnx
    assert isinstance(towers, OnnxTowers)
    assert towers._text.get_session_options().intra_op_num_threads == QUERY_THREADS == 1
    assert towers._image.get_session_options().intra_op_num_threads == cpu_count()
    import onnxruntime as ort

    level = towers._image.get_session_options().graph_optimization_level
    assert level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_the_torch_copy_is_freed_once_the_sessions_run(tiny_onnx_embedder: Embedder) -> None:
    assert tiny_onnx_embedder._model is None
    with pytest.raises(RuntimeError, match="runs on ONNX Runtime"):
        _ = tiny_onnx_embedder.model
    assert tiny_onnx_embedder.image_size == (32, 32) and tiny_onnx_embedder.context_length == 77


def test_close_then_use_loads_again() -> None:
    embedder = tiny()
    first = embedder.encode_texts(["again"])[0].vector
    embedder.close()
    assert not embedder.loaded
    np.testing.assert_array_equal(embedder.encode_texts(["again"])[0].vector, first)
    embedder.close()


# -- hostile input -----------------------------------------------------------------------------------------------


def test_empty_batches_and_odd_texts(tiny_onnx_embedder: Embedder) -> None:
    assert tiny_onnx_embedder.encode_images(torch.zeros(0, 3, 32, 32)).shape == (0, 32)
    assert tiny_onnx_embedder.encode_texts([]) == []
    odd = ["\x00\x01", "​" * 500, "🚲" * 300, "<|endoftext|>" * 50, " "]
    vectors = np.stack([t.vector for t in tiny_onnx_embedder.encode_texts(odd)])
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert tiny_onnx_embedder.encode_text("🚲" * 300).truncated


def test_concurrent_queries_get_the_same_vectors_as_sequential_ones(tiny_onnx_embedder: Embedder) -> None:
    texts = [f"query number {i} " + "word " * (i % 30) for i in range(64)]
    sequential = [tiny_onnx_embedder.encode_texts([t])[0].vector for t in texts]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda t: tiny_onnx_embedder.encode_texts([t])[0].vector, texts))
    for a, b in zip(sequential, concurrent, strict=True):
        np.testing.assert_array_equal(a, b)


# -- another architecture ----------------------------------------------------------------------------------------

BIDIRECTIONAL = {  # SigLIP's text tower shape: no causal mask, pooled at the last token, a projection bias
    "embed_dim": 32,
    "init_logit_bias": -10,
    "custom_text": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8, "pool_type": "avg"},
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 49408,
        "width": 32,
        "heads": 2,
        "layers": 1,
        "no_causal_mask": True,
        "proj_bias": True,
        "pool_type": "last",
    },
}


def test_a_bidirectional_text_tower_exports_at_its_full_context(tmp_path: Path) -> None:
    """Padding cannot be trimmed when every position attends to every other: the ONNX text graph then takes
    the whole context, and still gives torch's vectors."""
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "clipdex-tiny-bidir.json").write_text(json.dumps(BIDIRECTIONAL))

    def load(runtime: str) -> Embedder:
        embedder = Embedder(ModelSpec("clipdex-tiny-bidir", None, configs, "cpu", "fp32", tmp_path, 0, runtime))
        embedder.load()
        return embedder

    reference, onnx = load("torch"), load("onnx")
    assert onnx.runtime == "onnx" and onnx._trim is None
    for batch in (["a"], ["a red circle", " ".join(["word"] * 30)]):
        got = np.stack([t.vector for t in onnx.encode_texts(batch)])
        assert float(np.abs(got - np.stack([t.vector for t in reference.encode_texts(batch)])).max()) < 1e-4
    pixels = photos(3)
    assert float(np.abs(onnx.encode_images(pixels) - reference.encode_images(pixels)).max()) < 1e-4


def test_auto_falls_back_to_a_fresh_torch_model_when_onnx_runtime_cannot_load_the_export(
    tiny_embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuses(self: OnnxTowers, *args: object, **kwargs: object) -> None:
        raise ModelExportError("ONNX Runtime cannot load the exported towers: an opset it does not know")

    monkeypatch.setattr(OnnxTowers, "__init__", refuses)
    fallback = tiny("auto")
    fallback.load()
    assert fallback.runtime == "torch" and fallback._model is not None
    np.testing.assert_allclose(
        fallback.encode_texts(["x"])[0].vector, tiny_embedder.encode_texts(["x"])[0].vector, atol=1e-6
    )
    with pytest.raises(ModelExportError, match="opset it does not know"):
        tiny("onnx").load()
