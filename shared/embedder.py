"""The CLIP embedder: any open_clip model, images and texts in, L2-normalised float32 vectors out.

    open_clip factory ─▶ torch model (CPU, fp32) ─▶ weights checksum (the identity)
        runtime torch: the model itself, on CUDA (fp16 by default) or the CPU
        runtime onnx:  onnx_export.exported_towers (cached) ─▶ onnx_towers.OnnxTowers; the torch copy is freed

Loading goes through open_clip's own factory, so a hub tag (what users get by default: ViT-B-32
laion2b_s34b_b79k), a local checkpoint, or a config registered from CLIPDEX_MODEL_CONFIGS all work the same.
The model loads lazily on first use and is released with `close()`.

Both runtimes run the same tower modules (shared/towers.py). Text encoding trims the padding after the
end-of-text token before the transformer: with CLIP's causal mask no position attends to a later one, so
the pooled end-of-text feature is identical and the transformer runs on ~8 tokens instead of 77.

Identity: the runtime and the precision are not part of a model's identity. fp32 on ONNX Runtime is torch's
fp32 to within 1e-6; fp16 (CUDA) and int8 (ONNX Runtime, dynamic quantisation of the linear layers) are
approximations of the same space (cosine >= 0.99 per vector), whose vectors mix in one store and whose
queries search a store written at another precision with the same retrieval quality (tests/integration/
test_onnx_shapes.py measures it on the shapes model). So a store built on a GPU in fp16 is searched by a
CPU server in int8, and switching CLIPDEX_RUNTIME or CLIPDEX_PRECISION never needs a re-index.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import importlib.util
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from shared.config import Settings
from shared.errors import CheckpointNotFound, ConfigError, ModelDownloadError, ModelExportError, UnknownModelError
from shared.onnx_export import Tower
from shared.towers import ImageTower, TextTower, Trim
from shared.types import Embedding, ModelIdentity

logger = logging.getLogger(__name__)

_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_RANDOM_SEED = 0  # random weights are seeded, so every process builds the same "random" model


@dataclass(frozen=True)
class ModelSpec:
    name: str
    pretrained: str | None  # None: random weights
    configs_dir: Path | None
    device: str  # auto | cpu | cuda
    precision: str  # auto | fp32 | fp16 | bf16 | int8
    cache_dir: Path | None = None
    query_cache_size: int = 1024
    runtime: str = "auto"  # auto | torch | onnx

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelSpec:
        return cls(
            name=settings.model,
            pretrained=None if settings.random_weights else settings.pretrained,
            configs_dir=settings.model_configs,
            device=settings.device,
            precision=settings.precision,
            cache_dir=settings.model_cache_dir,
            query_cache_size=settings.query_cache_size,
            runtime=settings.runtime,
        )

    @property
    def export_dir(self) -> Path:
        """Where ONNX exports are cached: beside the downloaded weights when CLIPDEX_MODEL_CACHE_DIR is set."""
        root = self.cache_dir if self.cache_dir is not None else Path.home() / ".cache" / "clipdex"
        return root.expanduser() / "onnx"


@dataclass(frozen=True)
class TextEmbedding:
    vector: Embedding  # [dim]
    truncated: bool  # the text was longer than the model's context and was cut


def onnxruntime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        logger.warning("CLIPDEX_DEVICE=cuda but no CUDA device is available; using the CPU")
        return torch.device("cpu")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_runtime(requested: str, device: torch.device) -> str:
    """`auto`: ONNX Runtime on the CPU when it is installed, torch on CUDA."""
    if requested == "onnx":
        if device.type != "cpu":
            raise ConfigError("CLIPDEX_RUNTIME=onnx runs on the CPU: set CLIPDEX_DEVICE=cpu (or auto)")
        if not onnxruntime_installed():
            raise ConfigError("CLIPDEX_RUNTIME=onnx needs the onnxruntime package (pip install onnxruntime)")
        return "onnx"
    if requested == "torch":
        return "torch"
    return "onnx" if device.type == "cpu" and onnxruntime_installed() else "torch"


def resolve_precision(precision: str, device: torch.device, runtime: str) -> str:
    """The precision that runs: fp32 | fp16 | bf16 | int8."""
    if runtime == "onnx":
        if precision in ("fp16", "bf16"):
            logger.warning("ONNX Runtime on the CPU runs fp32 or int8, not %s; using fp32", precision)
            return "fp32"
        return "int8" if precision == "int8" else "fp32"
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "int8":
        if device.type == "cpu":
            raise ConfigError("CLIPDEX_PRECISION=int8 runs on ONNX Runtime: set CLIPDEX_RUNTIME=onnx (or auto)")
        logger.warning("int8 is a CPU precision (ONNX Runtime); using fp16 on CUDA")
        return "fp16"
    if device.type == "cpu" and precision == "fp16":
        logger.warning("fp16 is slow or unsupported on the CPU; using fp32")
        return "fp32"
    return precision


_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}


def register_model_configs(configs_dir: Path | None) -> None:
    if configs_dir is None:
        return
    if not configs_dir.is_dir():
        raise UnknownModelError(f"CLIPDEX_MODEL_CONFIGS={configs_dir} is not a directory")
    import open_clip  # imported when a model loads: it takes seconds, and most commands never need it

    if str(configs_dir) not in {str(p) for p in open_clip.factory._MODEL_CONFIG_PATHS}:
        open_clip.add_model_config(configs_dir)


def weights_checksum(model: torch.nn.Module) -> str:
    """A digest of every parameter and buffer, in name order, as float32 bytes."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class Embedder:
    """Thread-safe after `load()`; torch encoding runs under torch.inference_mode."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._lock = threading.Lock()
        self._model: Any = None  # the torch model (runtime torch only)
        self._onnx: Any = None  # OnnxTowers (runtime onnx only)
        self._image: ImageTower | None = None
        self._text: TextTower | None = None
        self._trim: Trim | None = None
        self._image_size: tuple[int, int] = (0, 0)
        self._preprocess: Callable[[Image.Image], torch.Tensor] | None = None
        self._tokenizer: Any = None
        self._identity: ModelIdentity | None = None
        self._cache: OrderedDict[str, TextEmbedding] = OrderedDict()
        self._cache_lock = threading.Lock()
        device = torch.device("cpu") if spec.runtime == "onnx" and spec.device == "auto" else None
        self.device = device or resolve_device(spec.device)
        self.runtime = resolve_runtime(spec.runtime, self.device)
        self.precision = resolve_precision(spec.precision, self.device, self.runtime)
        self.dtype = _TORCH_DTYPES[self.precision]

    @classmethod
    def from_settings(cls, settings: Settings) -> Embedder:
        return cls(ModelSpec.from_settings(settings))

    # -- lifecycle -------------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._model is not None or self._onnx is not None

    def load(self) -> None:
        with self._lock:
            if not self.loaded:
                self._load()

    def _load(self) -> None:
        import open_clip  # imported when a model loads: it takes seconds, and most commands never need it

        spec = self.spec
        register_model_configs(spec.configs_dir)
        known = open_clip.list_models()
        if spec.name not in known and not spec.name.startswith(("hf-hub:", "local-dir:")):
            raise UnknownModelError(
                f"unknown open_clip model {spec.name!r} (CLIPDEX_MODEL). `clipdex models` lists the "
                "available architectures; add your own config with CLIPDEX_MODEL_CONFIGS."
            )
        pretrained = self._check_pretrained(spec)
        logger.info("loading CLIP model %s (%s) on %s", spec.name, pretrained or "random weights", self.device)
        model, preprocess = self._create_model(pretrained)
        checksum = weights_checksum(model)
        dim = int(model.text_projection.shape[-1]) if _has_text_projection(model) else _probe_dim(model)
        size = model.visual.image_size
        self._image_size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self._preprocess = preprocess
        self._tokenizer = open_clip.get_tokenizer(spec.name)
        self._trim = TextTower(model).trim
        if self.runtime == "onnx":
            paths = self._export(model, checksum)
            if paths is not None:
                del model  # before the sessions load: the peak holds one copy of the weights, not two
                _release_memory()
                # rare: ONNX Runtime cannot load the export, and auto falls back to a fresh torch model
                model = None if self._open_sessions(paths) else self._create_model(pretrained)[0]
        if self.runtime == "torch":
            model = model.to(self.device, self.dtype)
            self._image, self._text, self._model = ImageTower(model), TextTower(model), model
        self._identity = ModelIdentity(spec.name, pretrained or "none", dim, checksum)
        logger.info(
            "model ready: dim=%d checksum=%s runtime=%s precision=%s", dim, checksum[:12], self.runtime, self.precision
        )

    def _create_model(self, pretrained: str | None) -> tuple[Any, Callable[[Image.Image], torch.Tensor]]:
        """open_clip's model (CPU, fp32, eval mode) and its evaluation transform."""
        import open_clip

        spec = self.spec
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_RANDOM_SEED)
                model, _, preprocess = open_clip.create_model_and_transforms(
                    spec.name,
                    pretrained=pretrained,
                    device="cpu",
                    cache_dir=str(spec.cache_dir) if spec.cache_dir else None,
                )
        except (OSError, RuntimeError, ValueError) as exc:
            if pretrained and not _is_local(pretrained):
                raise ModelDownloadError(
                    f"could not get the weights {spec.name}/{pretrained} from the model hub ({exc}). "
                    "Offline? Download the checkpoint once and set CLIPDEX_PRETRAINED to its path."
                ) from exc
            raise
        return model.eval(), preprocess

    def _export(self, model: Any, checksum: str) -> dict[Tower, Path] | None:
        """The ONNX files (cached, or exported now); None when `auto` falls back to torch."""
        from shared.onnx_export import ExportKey, exported_towers

        key = ExportKey(self.spec.name, checksum, "int8" if self.precision == "int8" else "fp32")
        try:
            return exported_towers(model, key, self.spec.export_dir)
        except OSError as exc:
            self._fall_back(ModelExportError(f"cannot write the ONNX export to {self.spec.export_dir}: {exc}"))
        except ModelExportError as exc:
            self._fall_back(exc)
        return None

    def _open_sessions(self, paths: dict[Tower, Path]) -> bool:
        from shared.onnx_towers import OnnxTowers

        try:
            self._onnx = OnnxTowers(paths)
        except ModelExportError as exc:
            self._fall_back(exc)
            return False
        return True

    def _fall_back(self, exc: ModelExportError) -> None:
        """CLIPDEX_RUNTIME=onnx: raise. auto: say why, and run on torch."""
        if self.spec.runtime == "onnx":
            raise exc
        logger.warning("%s; CLIPDEX_RUNTIME=auto falls back to torch", exc)
        self.runtime, self.precision = "torch", resolve_precision(self.spec.precision, self.device, "torch")
        self.dtype = _TORCH_DTYPES[self.precision]

    @staticmethod
    def _check_pretrained(spec: ModelSpec) -> str | None:
        if spec.pretrained is None:
            logger.warning(
                "*** CLIPDEX_PRETRAINED=none: model %s has RANDOM WEIGHTS. Search results are meaningless; "
                "use this for tests and benchmarks only. ***",
                spec.name,
            )
            return None
        if _is_local(spec.pretrained):
            path = Path(spec.pretrained).expanduser()
            if not path.is_file():
                raise CheckpointNotFound(f"checkpoint file not found: {path} (CLIPDEX_PRETRAINED)")
            return str(path)
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(spec.name)
        if tags and spec.pretrained not in tags:
            raise UnknownModelError(
                f"model {spec.name} has no pretrained tag {spec.pretrained!r} (CLIPDEX_PRETRAINED); "
                f"known tags: {', '.join(tags)}; or give a checkpoint path"
            )
        return spec.pretrained

    def close(self) -> None:
        with self._lock:
            self._model = self._onnx = self._image = self._text = None
            self._cache.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @property
    def model(self) -> Any:
        """The torch model (runtime torch only: with ONNX Runtime the torch copy is freed after the export)."""
        self.load()
        if self._model is None:
            raise RuntimeError(f"{self.spec.name} runs on ONNX Runtime: there is no torch model to return")
        return self._model

    @property
    def identity(self) -> ModelIdentity:
        self.load()
        assert self._identity is not None
        return self._identity

    @property
    def image_size(self) -> tuple[int, int]:
        self.load()
        return self._image_size

    @property
    def context_length(self) -> int:
        self.load()
        return int(self._tokenizer.context_length)

    # -- images ----------------------------------------------------------------------------------------

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """open_clip's own evaluation transform for this model: [3, H, W] float32. Thread-safe."""
        self.load()
        assert self._preprocess is not None
        return self._preprocess(image)

    def encode_images(self, images: torch.Tensor | Sequence[Image.Image]) -> Embedding:
        """A preprocessed batch [n, 3, H, W] (or PIL images) to [n, dim] normalised float32."""
        batch = images if isinstance(images, torch.Tensor) else torch.stack([self.preprocess(i) for i in images])
        if batch.shape[0] == 0:
            return np.zeros((0, self.identity.dim), np.float32)
        self.load()
        if self._onnx is not None:
            return _normalised_np(self._onnx.encode_images(batch.numpy()))
        assert self._image is not None
        with torch.inference_mode():
            pixels = batch.to(self.device, self.dtype, non_blocking=True)
            return _normalised(self._image(pixels))

    # -- texts -----------------------------------------------------------------------------------------

    def encode_text(self, text: str) -> TextEmbedding:
        """One query, with an LRU cache of recent ones."""
        with self._cache_lock:
            hit = self._cache.get(text)
            if hit is not None:
                self._cache.move_to_end(text)
                return hit
        result = self.encode_texts([text])[0]
        if self.spec.query_cache_size:
            with self._cache_lock:
                self._cache[text] = result
                while len(self._cache) > self.spec.query_cache_size:
                    self._cache.popitem(last=False)
        return result

    def encode_texts(self, texts: Sequence[str]) -> list[TextEmbedding]:
        self.load()
        tokens = self._tokenizer(list(texts))
        truncated = [self._is_truncated(t) for t in texts]
        if self._onnx is not None:
            vectors = _normalised_np(self._encode_tokens_onnx(tokens, trim=True))
        else:
            with torch.inference_mode():
                vectors = _normalised(self.encode_tokens(tokens, trim=True))
        return [TextEmbedding(v, t) for v, t in zip(vectors, truncated, strict=True)]

    def _is_truncated(self, text: str) -> bool:
        encode = getattr(self._tokenizer, "encode", None)
        if encode is None:
            return False
        return len(encode(text)) + 2 > self.context_length  # + start and end tokens

    def encode_tokens(self, tokens: torch.Tensor, *, trim: bool) -> torch.Tensor:
        """Text features (not normalised) of a token batch; `trim=False` runs every padded position."""
        self.load()
        if self._onnx is not None:
            return torch.from_numpy(self._encode_tokens_onnx(tokens, trim=trim))
        assert self._text is not None
        if not trim:
            return self.model.encode_text(tokens.to(self.device))  # type: ignore[no-any-return]
        length = self._trim.length(tokens) if self._trim is not None else tokens.shape[-1]
        return self._text(tokens[:, :length].to(self.device))  # type: ignore[no-any-return]

    def _encode_tokens_onnx(self, tokens: torch.Tensor, *, trim: bool) -> np.ndarray[Any, np.dtype[np.float32]]:
        data = tokens.cpu().numpy().astype(np.int64, copy=False)
        if trim and self._trim is not None:
            data = data[:, : self._trim.length(data)]
        return self._onnx.encode_tokens(data)  # type: ignore[no-any-return]


def _release_memory() -> None:
    """Give freed model memory back to the OS: glibc keeps freed small blocks in its arenas otherwise
    (measured: the server kept ~400 MB of a freed ViT-B-32 without this)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _normalised(features: torch.Tensor) -> Embedding:
    out = F.normalize(features.float(), dim=-1).cpu().numpy()
    return np.ascontiguousarray(out, dtype=np.float32)


def _normalised_np(features: np.ndarray[Any, np.dtype[np.float32]]) -> Embedding:
    norms = np.linalg.norm(features, axis=-1, keepdims=True)
    return np.ascontiguousarray(features / np.maximum(norms, 1e-12), dtype=np.float32)


def _is_local(pretrained: str) -> bool:
    return pretrained.endswith(_CHECKPOINT_SUFFIXES) or "/" in pretrained or pretrained.startswith(("~", "."))


def _has_text_projection(model: Any) -> bool:
    proj = getattr(model, "text_projection", None)
    return isinstance(proj, torch.Tensor) and proj.ndim == 2


def _probe_dim(model: Any) -> int:
    with torch.inference_mode():
        size = model.visual.image_size
        h, w = (size, size) if isinstance(size, int) else size
        param = next(model.parameters())
        dummy = torch.zeros(1, 3, h, w, device=param.device, dtype=param.dtype)
        return int(model.encode_image(dummy).shape[-1])
