"""Adapter for ``nn.Embedding``: a Linear map on one-hot inputs.

``y = W[i] = W^T e_i``: the canonical weight is ``W̃ = W^T`` (``[D, V]``) and the canonical input
is the one-hot vector ``e_i`` (``d_in = V``). Kronecker input factors of an embedding are
therefore diagonal (token frequencies), and curvature code asks for :meth:`input_indices`
instead of materialising one-hot inputs where it can. Inputs equal to ``padding_idx`` are
all-zero (that row receives no gradient).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Adapter, register_adapter

__all__ = ["EmbeddingAdapter"]


class EmbeddingAdapter(Adapter):
    """Embeddings: ``G = 1``, ``d_in = num_embeddings``, ``d_out = embedding_dim``."""

    module_types = (nn.Embedding,)
    one_hot_input = True

    def check(self, module: Any) -> str | None:  # noqa: D102
        if getattr(module, "sparse", False):
            return "sparse gradients (sparse=True) are not supported"
        return None

    def bias(self, module: Any) -> nn.Parameter | None:  # noqa: D102
        return None

    def groups(self, module: Any) -> int:  # noqa: D102
        return 1

    def in_features(self, module: Any) -> int:  # noqa: D102
        return int(module.num_embeddings)

    def out_features(self, module: Any) -> int:  # noqa: D102
        return int(module.embedding_dim)

    def input_indices(self, module: Any, x: Tensor) -> Tensor:  # noqa: D102
        if x.dim() == 0:
            x = x.reshape(1, 1)
        elif x.dim() == 1:
            x = x.unsqueeze(0)
        idx = x.reshape(x.shape[0], -1)
        if module.padding_idx is not None:
            pad = idx == int(module.padding_idx)
            idx = torch.where(pad, torch.full_like(idx, -1), idx)
        return idx

    def inputs(self, module: Any, x: Tensor) -> Tensor:  # noqa: D102
        idx = self.input_indices(module, x)
        hot = F.one_hot(idx.clamp(min=0), int(module.num_embeddings))
        hot = hot * (idx >= 0).unsqueeze(-1)
        return hot.to(module.weight.dtype).unsqueeze(-2)

    def output_grads(self, module: Any, gy: Tensor) -> Tensor:  # noqa: D102
        if gy.dim() == 1:
            gy = gy.unsqueeze(0)
        return gy.reshape(gy.shape[0], -1, 1, gy.shape[-1])

    def weight_to_matrix(self, module: Any, w: Tensor) -> Tensor:  # noqa: D102
        return w.transpose(-1, -2).unsqueeze(-3)

    def matrix_to_weight(self, module: Any, m: Tensor) -> Tensor:  # noqa: D102
        return m.squeeze(-3).transpose(-1, -2)


register_adapter(nn.Embedding, EmbeddingAdapter())
