"""Adapter for normalisation layers as scale-and-shift maps ``y = γ ⊙ x̂ + β``.

BatchNorm (1d/2d/3d), LayerNorm, GroupNorm and RMSNorm all apply a per-unit scale and shift to a
normalised input ``x̂``. Each unit is one group of the canonical form with ``d_in = d_out = 1``;
``x̂`` is recomputed from the layer input with the layer's own statistics (batch statistics in
training mode, running statistics in evaluation mode), so no division by ``γ`` is needed.

In training mode BatchNorm couples the examples of a batch; the per-example gradients captured
here are the per-example terms ``Σ_s g[n,s] x̂[n,s]`` of the exact batch gradient.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .base import Adapter, register_adapter

__all__ = ["NormAdapter"]

_RMSNorm: type[nn.Module] | None = getattr(nn, "RMSNorm", None)


class NormAdapter(Adapter):
    """Scale-and-shift layers: one group per unit, scalar normalised input."""

    module_types = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)
    elementwise = True

    def _units(self, module: Any) -> int:
        w = self.weight(module)
        b = self.bias(module)
        ref = w if w is not None else b
        assert ref is not None
        return int(ref.numel())

    per_example_inputs = False  # batch statistics mix the examples

    def groups(self, module: Any) -> int:  # noqa: D102
        return self._units(module)

    def in_features(self, module: Any) -> int:  # noqa: D102
        return 1

    def out_features(self, module: Any) -> int:  # noqa: D102
        return 1

    def _normalize(self, module: Any, x: Tensor) -> Tensor:
        if isinstance(module, _BatchNorm):
            use_batch_stats = module.training or module.running_mean is None
            return F.batch_norm(
                x,
                None if use_batch_stats else module.running_mean,
                None if use_batch_stats else module.running_var,
                training=use_batch_stats,
                eps=module.eps,
            )
        if isinstance(module, nn.LayerNorm):
            return F.layer_norm(x, module.normalized_shape, eps=module.eps)
        if isinstance(module, nn.GroupNorm):
            return F.group_norm(x, module.num_groups, eps=module.eps)
        if _RMSNorm is not None and isinstance(module, _RMSNorm):
            rms: Any = module
            return F.rms_norm(x, rms.normalized_shape, eps=rms.eps)
        raise TypeError(f"NormAdapter cannot normalise {type(module).__name__}")

    def _channel_last(self, module: Any, t: Tensor) -> Tensor:
        """``[N, ...]`` with units somewhere to ``[N, S, U, 1]``."""
        units = self._units(module)
        if isinstance(module, _BatchNorm | nn.GroupNorm):
            if t.dim() == 1:
                t = t.unsqueeze(0)
            # [N, C, *spatial] -> [N, S, C]
            t = t.reshape(t.shape[0], t.shape[1], -1).transpose(1, 2)
        else:  # LayerNorm/RMSNorm normalise (and scale) the trailing dims
            if t.dim() == len(module.normalized_shape):
                t = t.unsqueeze(0)
            t = t.reshape(t.shape[0], -1, units)
        return t.unsqueeze(-1)

    def inputs(self, module: Any, x: Tensor) -> Tensor:  # noqa: D102
        return self._channel_last(module, self._normalize(module, x))

    def output_grads(self, module: Any, gy: Tensor) -> Tensor:  # noqa: D102
        return self._channel_last(module, gy)

    def weight_to_matrix(self, module: Any, w: Tensor) -> Tensor:  # noqa: D102
        weight = self.weight(module)
        assert weight is not None
        lead = w.shape[: w.dim() - weight.dim()]
        return w.reshape(*lead, self._units(module), 1, 1)

    def matrix_to_weight(self, module: Any, m: Tensor) -> Tensor:  # noqa: D102
        weight = self.weight(module)
        assert weight is not None
        return m.reshape(*m.shape[:-3], *weight.shape)


_NORM = NormAdapter()
for _cls in (_BatchNorm, nn.LayerNorm, nn.GroupNorm):
    register_adapter(_cls, _NORM)
if _RMSNorm is not None:
    register_adapter(_RMSNorm, _NORM)
