"""Adapter for ``nn.Linear``: inputs of any rank; extra dimensions are weight sharing."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .base import Adapter, register_adapter

__all__ = ["LinearAdapter"]


class LinearAdapter(Adapter):
    """``y = x W^T + b`` on ``x`` of shape ``[N, *, d_in]``: ``G = 1``, ``S = prod(*)``."""

    module_types = (nn.Linear,)

    def groups(self, module: Any) -> int:  # noqa: D102
        return 1

    def in_features(self, module: Any) -> int:  # noqa: D102
        return int(module.in_features)

    def out_features(self, module: Any) -> int:  # noqa: D102
        return int(module.out_features)

    def inputs(self, module: Any, x: Tensor) -> Tensor:  # noqa: D102
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return x.reshape(x.shape[0], -1, 1, x.shape[-1])

    def output_grads(self, module: Any, gy: Tensor) -> Tensor:  # noqa: D102
        # gy: [..., N, *, d_out] with any number of leading vector dims is impossible to tell
        # apart from weight-sharing dims, so callers pass one vector at a time or stack after.
        if gy.dim() == 1:
            gy = gy.unsqueeze(0)
        return gy.reshape(gy.shape[0], -1, 1, gy.shape[-1])

    def weight_to_matrix(self, module: Any, w: Tensor) -> Tensor:  # noqa: D102
        return w.unsqueeze(-3)

    def matrix_to_weight(self, module: Any, m: Tensor) -> Tensor:  # noqa: D102
        return m.squeeze(-3)


register_adapter(nn.Linear, LinearAdapter())
