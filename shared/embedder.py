"""The CLIP embedder: any open_clip model, images and texts in, L2-normalised float32 vectors out.

Loading goes through open_clip's own factory, so a hub tag (what users get by default: ViT-B-32
laion2b_s34b_b79k), a local checkpoint, or a config registered from CLIPDEX_MODEL_CONFIGS all work the same.
The model loads lazily on first use and is released with `close()`.

Text encoding trims the padding after the end-of-text token before the transformer: with CLIP's causal
mask no position attends to a later one, so the pooled end-of-text feature is identical and the
transformer runs on ~8 tokens instead of 77.
"""

from __future__ import annotations

import hashlib
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
from shared.errors import CheckpointNotFound, ModelDownloadError, UnknownModelError
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
    precision: str  # auto | fp32 | fp16 | bf16
    cache_dir: Path | None = None
    query_cache_size: int = 1024

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
        )


@dataclass(frozen=True)
class TextEmbedding:
    vector: Embedding  # [dim]
    truncated: bool  # the text was longer than the model's context and was cut


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        logger.warning("CLIPDEX_DEVICE=cuda but no CUDA device is available; using the CPU")
        return torch.device("cpu")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and precision == "fp16":
        logger.warning("fp16 is slow or unsupported on the CPU; using fp32")
        return torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


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
    """Thread-safe after `load()`; encoding runs under torch.inference_mode."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._lock = threading.Lock()
        self._model: Any = None
        self._preprocess: Callable[[Image.Image], torch.Tensor] | None = None
        self._tokenizer: Any = None
        self._identity: ModelIdentity | None = None
        self._cache: OrderedDict[str, TextEmbedding] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.device = resolve_device(spec.device)
        self.dtype = resolve_dtype(spec.precision, self.device)

    @classmethod
    def from_settings(cls, settings: Settings) -> Embedder:
        return cls(ModelSpec.from_settings(settings))

    # -- lifecycle -------------------------------------------------------------------------------------

    def load(self) -> None:
        with self._lock:
            if self._model is None:
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
        model.eval()
        checksum = weights_checksum(model)
        model = model.to(self.device, self.dtype)
        dim = int(model.text_projection.shape[-1]) if _has_text_projection(model) else _probe_dim(model)
        self._model = model
        self._preprocess = preprocess
        self._tokenizer = open_clip.get_tokenizer(spec.name)
        self._identity = ModelIdentity(spec.name, pretrained or "none", dim, checksum)
        logger.info("model ready: dim=%d checksum=%s dtype=%s", dim, checksum[:12], self.dtype)

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
            self._model = None
            self._cache.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @property
    def model(self) -> Any:
        if self._model is None:
            self.load()
        return self._model

    @property
    def identity(self) -> ModelIdentity:
        self.load()
        assert self._identity is not None
        return self._identity

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.model.visual.image_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

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
        with torch.inference_mode():
            pixels = batch.to(self.device, self.dtype, non_blocking=True)
            features = self.model.encode_image(pixels)
            return _normalised(features)

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
        with torch.inference_mode():
            features = self.encode_tokens(tokens.to(self.device), trim=True)
            vectors = _normalised(features)
        return [TextEmbedding(v, t) for v, t in zip(vectors, truncated, strict=True)]

    def _is_truncated(self, text: str) -> bool:
        encode = getattr(self._tokenizer, "encode", None)
        if encode is None:
            return False
        return len(encode(text)) + 2 > self.context_length  # + start and end tokens

    def encode_tokens(self, tokens: torch.Tensor, *, trim: bool) -> torch.Tensor:
        """Text features (not normalised) of a token batch; `trim=False` is open_clip's own encode_text."""
        model = self.model
        tower = _causal_text_tower(model)
        if not trim or tower is None:
            return model.encode_text(tokens)  # type: ignore[no-any-return]
        pool_type, eos_id = tower.pool_type, tower.eos_id
        ends = (
            tokens.argmax(dim=-1)
            if pool_type == "argmax"
            else torch.eq(tokens, eos_id or 0).to(torch.int32).argmax(dim=-1)
        )
        length = int(ends.max().item()) + 1
        tokens = tokens[:, :length]
        cast = tower.module.transformer.get_cast_dtype()
        x = tower.module.token_embedding(tokens).to(cast)
        x = x + tower.module.positional_embedding[:length].to(cast)
        x = tower.module.transformer(x, attn_mask=tower.attn_mask[:length, :length])
        x = tower.module.ln_final(x)
        from open_clip.transformer import text_global_pool

        pooled = text_global_pool(x, tokens, pool_type, eos_token_id=eos_id)
        projection = tower.module.text_projection
        if projection is None:
            return pooled  # type: ignore[no-any-return]
        if isinstance(projection, torch.nn.Linear):
            return projection(pooled)  # type: ignore[no-any-return]
        return pooled @ projection  # type: ignore[no-any-return]


@dataclass(frozen=True)
class _TextTower:
    module: Any  # the CLIP model itself, or its TextTransformer
    attn_mask: torch.Tensor
    pool_type: str
    eos_id: int | None


def _causal_text_tower(model: Any) -> _TextTower | None:
    """The text tower if padding can be trimmed exactly: a causal mask, pooled at the end-of-text token."""
    if hasattr(model, "token_embedding"):  # open_clip.CLIP keeps the tower's parts on the model
        module, pool_type, eos_id = model, model.text_pool_type, getattr(model, "text_eos_id", None)
    else:
        module = getattr(model, "text", None)
        if module is None or not hasattr(module, "token_embedding"):
            return None  # e.g. a Hugging Face text tower
        if getattr(module, "cls_emb", None) is not None or getattr(module, "use_pad_mask", False):
            return None
        pool_type, eos_id = module.pool_type, getattr(module, "eos_id", None)
    mask = getattr(module, "attn_mask", None)
    if mask is None or pool_type not in ("argmax", "eos") or (pool_type == "eos" and eos_id is None):
        return None
    return _TextTower(module, mask, pool_type, eos_id)


def _normalised(features: torch.Tensor) -> Embedding:
    out = F.normalize(features.float(), dim=-1).cpu().numpy()
    return np.ascontiguousarray(out, dtype=np.float32)


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
