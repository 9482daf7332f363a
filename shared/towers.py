"""The two towers of a loaded open_clip model as plain modules: what torch runs is what ONNX exports.

    ImageTower(model)(pixels [n, 3, H, W])  ─▶ features [n, dim]   (open_clip's encode_image)
    TextTower(model)(tokens [n, L])         ─▶ features [n, dim]   L <= context length when `trim` is set

A causal text tower pooled at the end-of-text token (open_clip's CLIP and most of its text towers) gives
the same pooled feature whether the padding after the last end-of-text token is there or not: no position
attends to a later one. So `TextTower` takes tokens cut to `trim.length(tokens)` and runs the
transformer on ~8 positions instead of 77. Other text towers (a Hugging Face tower, SigLIP's
bidirectional one, a class-token tower) see every position; they get the padded tokens, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray


@dataclass(frozen=True)
class _CausalText:
    module: Any  # the CLIP model itself, or its TextTransformer
    attn_mask: torch.Tensor
    pool_type: str
    eos_id: int | None


def _causal_text(model: Any) -> _CausalText | None:
    """The text tower's parts if padding can be trimmed exactly: a causal mask, pooled at end-of-text."""
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
    return _CausalText(module, mask, pool_type, eos_id)


class ImageTower(torch.nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Trim:
    """Where a token batch's last end-of-text token is: the positions after it change nothing."""

    pool_type: str  # argmax (the end-of-text token has the largest id) | eos
    eos_id: int | None

    def length(self, tokens: NDArray[np.int64] | torch.Tensor) -> int:
        data = tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else tokens
        if data.shape[0] == 0:
            return int(data.shape[-1])
        ends = data.argmax(axis=-1) if self.pool_type == "argmax" else (data == self.eos_id).argmax(axis=-1)
        return int(ends.max()) + 1


class TextTower(torch.nn.Module):
    """Text features (not normalised) of a token batch, cut to `trim.length(tokens)` when `trim` is set."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self._causal = _causal_text(model)
        self.trim = None if self._causal is None else Trim(self._causal.pool_type, self._causal.eos_id)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        causal = self._causal
        if causal is None:
            return self.model.encode_text(tokens)  # type: ignore[no-any-return]
        length = tokens.shape[1]
        tower = causal.module
        cast = tower.transformer.get_cast_dtype()
        x = tower.token_embedding(tokens).to(cast)
        x = x + tower.positional_embedding[:length].to(cast)
        x = tower.transformer(x, attn_mask=causal.attn_mask[:length, :length])
        x = tower.ln_final(x)
        from open_clip.transformer import text_global_pool  # imported with the model: it takes seconds

        pooled = text_global_pool(x, tokens, causal.pool_type, eos_token_id=causal.eos_id)
        projection = tower.text_projection
        if projection is None:
            return pooled  # type: ignore[no-any-return]
        if isinstance(projection, torch.nn.Linear):
            return projection(pooled)  # type: ignore[no-any-return]
        return pooled @ projection  # type: ignore[no-any-return]
