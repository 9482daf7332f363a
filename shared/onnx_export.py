"""ONNX exports of a loaded open_clip model's two towers, built once and cached on disk.

    loaded model ─▶ towers.ImageTower / TextTower ─▶ torch.onnx.export (dynamo) ─▶ <stem>-fp32.onnx
                                                   int8: quantize_dynamic(MatMul, Gemm) ─▶ <stem>-int8.onnx

A file is named by the model, its weights' checksum, the tower, the precision, the onnxruntime version and
`EXPORT_FORMAT` (bumped when this exporter changes what it writes), so a new checkpoint, precision or
runtime never picks up a stale file. Each file is written to a temporary name, fsynced and renamed, then
its manifest (size and sha256) is written the same way. A file whose manifest is missing or does not
match (a crash mid-write, a truncated copy, a flipped bit) is rebuilt, never loaded. Processes that start
together (the indexer and the server) build under one file lock: the second waits and reuses the result.

Measured on 2 cores (ViT-B-32): exporting takes about 20 s per tower, quantising about 4 s; checking a
cached file's sha256 about 0.3 s per 100 MB at each start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from shared.errors import ModelExportError
from shared.towers import ImageTower, TextTower

logger = logging.getLogger(__name__)

EXPORT_FORMAT = 1
Tower = Literal["image", "text"]
OnnxPrecision = Literal["fp32", "int8"]
TOWERS: tuple[Tower, ...] = ("image", "text")


@dataclass(frozen=True)
class ExportKey:
    """What an exported file depends on."""

    model: str
    checksum: str  # the weights' digest (ModelIdentity.checksum)
    precision: OnnxPrecision

    def path(self, cache_dir: Path, tower: Tower, precision: OnnxPrecision | None = None) -> Path:
        import onnxruntime

        name = f"{self._stem}-{tower}-{precision or self.precision}-ort{onnxruntime.__version__}"
        return cache_dir / f"{name}-e{EXPORT_FORMAT}.onnx"

    def lock_path(self, cache_dir: Path) -> Path:
        return cache_dir / f"{self._stem}.lock"

    @property
    def _stem(self) -> str:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", self.model).strip("._") or "model"
        return f"{safe}-{self.checksum}"


def exported_towers(model: Any, key: ExportKey, cache_dir: Path) -> dict[Tower, Path]:
    """The two towers' ONNX files for `key`, from the cache or exported now from `model` (CPU, fp32)."""
    paths = {tower: key.path(cache_dir, tower) for tower in TOWERS}
    if all(is_valid(p) for p in paths.values()):
        return paths
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(key.lock_path(cache_dir)):
        missing = [t for t in TOWERS if not is_valid(paths[t], warn=True)]  # another process may have built them
        if not missing:
            return paths
        steps: list[tuple[Tower, OnnxPrecision]] = [
            (t, "fp32") for t in missing if not is_valid(key.path(cache_dir, t, "fp32"))
        ]
        steps += [(t, "int8") for t in missing if key.precision == "int8"]
        logger.info(
            "building the ONNX export of %s (%s: %s), once, in %s; later starts reuse it",
            key.model,
            key.precision,
            " and ".join(f"{t} tower" for t in missing),
            cache_dir,
        )
        started = time.perf_counter()
        for done, (tower, precision) in enumerate(steps, start=1):
            step_started = time.perf_counter()
            target = key.path(cache_dir, tower, precision)
            with _temporary(target) as tmp:
                if precision == "fp32":
                    _export(model, tower, tmp)
                else:
                    quantize(key.path(cache_dir, tower, "fp32"), tmp)
                publish(tmp, target)
            logger.info(
                "ONNX export %d/%d: %s tower %s in %.1f s (%.0f MB)",
                done,
                len(steps),
                tower,
                precision,
                time.perf_counter() - step_started,
                target.stat().st_size / 1e6,
            )
        logger.info("ONNX export of %s ready in %.1f s", key.model, time.perf_counter() - started)
    return paths


def _export(model: Any, tower: Tower, path: Path) -> None:
    """One tower of a CPU fp32 open_clip model to an ONNX file with a dynamic batch axis (and length)."""
    batch = torch.export.Dim("batch", min=1, max=65_536)
    module: torch.nn.Module
    if tower == "image":
        module = ImageTower(model)
        size = model.visual.image_size
        height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        example = torch.zeros(2, 3, height, width)
        names, shapes = ["pixels"], ({0: batch},)
    else:
        module = TextTower(model)
        context = int(getattr(model, "context_length", 0) or model.text.context_length)
        length = min(8, context)
        example = torch.full((2, length), 1, dtype=torch.long)
        example[:, -1] = 2  # an end-of-text position for the pooling; the values only shape the trace
        dims: dict[int, Any] = {0: batch}
        if module.trim is not None:  # trimmed padding: any length up to the context
            dims[1] = torch.export.Dim("length", min=2, max=context)
        else:  # the tower sees every position: always the whole context
            example = torch.full((2, context), 1, dtype=torch.long)
        names, shapes = ["tokens"], (dims,)
    try:
        with warnings.catch_warnings(), _quiet("onnx_ir", "onnxscript", "torch.onnx", "torch.export"):
            warnings.simplefilter("ignore")  # the exporter's own notes on torch internals, not ours to act on
            torch.onnx.export(
                module.eval(),
                (example,),
                str(path),
                input_names=names,
                output_names=["features"],
                dynamic_shapes=shapes,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except Exception as exc:
        raise ModelExportError(f"cannot export the {tower} tower to ONNX: {type(exc).__name__}: {exc}") from exc


def quantize(source: Path, target: Path) -> None:
    """Dynamic int8 quantisation of the linear layers (MatMul, Gemm); activations are quantised per batch.

    Unsigned 8-bit weights: on this AVX2 CPU (no VNNI) they kept ViT-B-32 closest to fp32 (minimum
    cosine 0.9998 image, 0.9992 text, random weights) at the speed of signed ones, whose u8 x s8
    multiply-add can saturate (0.9953 image; 0.9970 text with reduce_range)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    quiet = _QuietQuantizer()  # it logs a line per tensor, and advice, to the root logger
    root.addFilter(quiet)
    try:
        quantize_dynamic(
            source,
            target,
            weight_type=QuantType.QUInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
        )
    except Exception as exc:
        raise ModelExportError(f"cannot quantise {source.name} to int8: {type(exc).__name__}: {exc}") from exc
    finally:
        root.removeFilter(quiet)


# -- the cache's files ---------------------------------------------------------------------------------------


def is_valid(path: Path, *, warn: bool = False) -> bool:
    """The file exists and matches its manifest; a mismatch is logged (when `warn`) and means rebuild."""
    manifest = _manifest_path(path)
    if not path.exists():
        return False
    try:
        recorded = json.loads(manifest.read_text())
        size, digest = int(recorded["bytes"]), str(recorded["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        if warn:
            logger.warning("ONNX cache file %s has no valid manifest (an interrupted build?); rebuilding it", path)
        return False
    if path.stat().st_size != size or _sha256(path) != digest:
        if warn:
            logger.warning("ONNX cache file %s does not match its recorded checksum; rebuilding it", path)
        return False
    return True


def publish(tmp: Path, target: Path) -> None:
    """Move a finished file into place atomically, then record its size and digest beside it."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    manifest = {"bytes": tmp.stat().st_size, "sha256": _sha256(tmp), "torch": torch.__version__}
    _manifest_path(target).unlink(missing_ok=True)  # readers see "not built" until both are in place
    os.replace(tmp, target)
    with _temporary(_manifest_path(target)) as mtmp:
        mtmp.write_text(json.dumps(manifest))
        with open(mtmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(mtmp, _manifest_path(target))
    _fsync_dir(target.parent)


def _manifest_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextlib.contextmanager
def _temporary(target: Path) -> Iterator[Path]:
    """A temporary name beside `target` (same file system, so the rename is atomic), removed on failure."""
    tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp{target.suffix}")
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: two processes may both build; the atomic renames keep it correct
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """The exporter's libraries log every graph pass at INFO: keep their warnings only, while it runs."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class _QuietQuantizer(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "onnxruntime" not in record.pathname
