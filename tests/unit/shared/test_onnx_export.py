"""The ONNX export cache: built once with a log line and progress, keyed by what the file depends on,
written atomically, and a damaged or half-written file rebuilt instead of trusted.

The real exporter runs once per test session (the `tiny_onnx_embedder` fixture); here `_export` copies its
result, so these tests exercise the cache around it in milliseconds."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared import onnx_export
from shared.embedder import Embedder, ModelSpec
from shared.errors import ModelExportError
from shared.onnx_export import ExportKey, exported_towers, is_valid
from tests.conftest import TINY_CONFIGS, TINY_MODEL


class CountingExport:
    """Stands in for torch.onnx.export: copies the session's real export of the tiny model."""

    def __init__(self, real: dict[str, Path]) -> None:
        self.real = real
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, model: Any, tower: str, path: Path) -> None:
        with self._lock:
            self.calls.append(tower)
        shutil.copyfile(self.real[tower], path)


@pytest.fixture
def export(tiny_onnx_embedder: Embedder, monkeypatch: pytest.MonkeyPatch) -> CountingExport:
    fake = CountingExport(tiny_onnx_embedder._onnx.paths)
    monkeypatch.setattr(onnx_export, "_export", fake)
    return fake


KEY = ExportKey(TINY_MODEL, "0123456789abcdef0123456789abcdef", "fp32")


def embedder(cache: Path, precision: str = "fp32") -> Embedder:
    return Embedder(ModelSpec(TINY_MODEL, None, TINY_CONFIGS, "cpu", precision, cache, 0, "onnx"))


def test_built_once_with_a_log_line_and_progress_then_reused(
    export: CountingExport, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="shared.onnx_export"):
        paths = exported_towers(None, KEY, tmp_path)
    assert sorted(export.calls) == ["image", "text"]
    assert "building the ONNX export of clipdex-tiny (fp32" in caplog.text
    assert "ONNX export 1/2" in caplog.text and "ONNX export 2/2" in caplog.text
    assert all(is_valid(p) for p in paths.values())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="shared.onnx_export"):
        assert exported_towers(None, KEY, tmp_path) == paths
    assert sorted(export.calls) == ["image", "text"] and "building" not in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == sorted(
        [p.name for p in paths.values()] + [p.with_suffix(".json").name for p in paths.values()]
    )  # no temporary file left behind


def test_the_key_names_weights_precision_and_onnxruntime_version(
    export: CountingExport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime

    first = exported_towers(None, KEY, tmp_path)["image"]
    other_weights = ExportKey(TINY_MODEL, "f" * 32, "fp32").path(tmp_path, "image")
    int8 = ExportKey(TINY_MODEL, KEY.checksum, "int8").path(tmp_path, "image")
    monkeypatch.setattr(onnxruntime, "__version__", "9.9.9")
    newer_runtime = KEY.path(tmp_path, "image")
    assert len({first, other_weights, int8, newer_runtime}) == 4
    assert KEY.checksum in first.name and "fp32" in first.name and "ort9.9.9" in newer_runtime.name
    assert ExportKey("hf-hub:org/Model ../x", "a" * 32, "fp32").path(tmp_path, "text").parent == tmp_path


def test_int8_reuses_the_cached_fp32_export_and_quantises_it(export: CountingExport, tmp_path: Path) -> None:
    exported_towers(None, KEY, tmp_path)
    int8 = exported_towers(None, ExportKey(TINY_MODEL, KEY.checksum, "int8"), tmp_path)
    assert sorted(export.calls) == ["image", "text"]  # no second export: only the quantisation ran
    assert all("-int8-" in p.name and is_valid(p) for p in int8.values())


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "no manifest", "bad manifest"])
def test_a_damaged_cache_file_is_rebuilt_not_trusted(
    damage: str, tiny_onnx_embedder: Embedder, export: CountingExport, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = embedder(tmp_path)
    want = good.encode_texts(["a red circle"])[0].vector
    text = good._onnx.paths["text"]
    data = bytearray(text.read_bytes())
    if damage == "flip a byte":
        data[len(data) // 2] ^= 0x40
        text.write_bytes(bytes(data))
    elif damage == "truncate":
        text.write_bytes(bytes(data[: len(data) // 3]))
    elif damage == "no manifest":
        text.with_suffix(".json").unlink()
    else:
        text.with_suffix(".json").write_text("{not json")
    assert not is_valid(text)
    export.calls.clear()
    with caplog.at_level(logging.WARNING):
        again = embedder(tmp_path)
        np.testing.assert_array_equal(again.encode_texts(["a red circle"])[0].vector, want)
    assert export.calls == ["text"] and is_valid(text)
    assert "rebuilding it" in caplog.text


def test_a_failed_build_leaves_nothing_that_looks_built(
    export: CountingExport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def dies_half_way(model: Any, tower: str, path: Path) -> None:
        path.write_bytes(b"half an onnx file")
        raise ModelExportError(f"cannot export the {tower} tower to ONNX: killed")

    monkeypatch.setattr(onnx_export, "_export", dies_half_way)
    with pytest.raises(ModelExportError, match="killed"):
        exported_towers(None, KEY, tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_processes_starting_together_build_once(export: CountingExport, tmp_path: Path) -> None:
    """Two builders at once (an indexer and a server starting together): the lock makes the second wait."""
    results: list[dict[str, Path]] = []
    threads = [threading.Thread(target=lambda: results.append(exported_towers(None, KEY, tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(export.calls) == ["image", "text"]
    assert len(results) == 3 and all(r == results[0] for r in results)


def test_an_unwritable_cache_says_where(tiny_onnx_embedder: Embedder, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ModelExportError, match="cannot write the ONNX export to"):
        embedder(blocker).load()


def test_the_cache_is_under_the_model_cache_dir_or_the_users_cache(tmp_path: Path) -> None:
    assert ModelSpec(TINY_MODEL, None, None, "cpu", "fp32", tmp_path).export_dir == tmp_path / "onnx"
    assert ModelSpec(TINY_MODEL, None, None, "cpu", "fp32").export_dir == Path.home() / ".cache" / "clipdex" / "onnx"
