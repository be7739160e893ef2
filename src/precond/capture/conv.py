"""Adapter for ``nn.Conv1d`` and ``nn.Conv2d``: any stride, padding (mode), dilation and groups.

Inputs are unfolded into patches (im2col): position ``s`` of example ``n`` is one output pixel,
and group ``g`` sees the ``C_in/G · k`` entries of its channels in its receptive field.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Adapter, register_adapter

__all__ = ["ConvAdapter"]


class ConvAdapter(Adapter):
    """Convolutions as grouped affine maps on unfolded patches."""

    module_types = (nn.Conv1d, nn.Conv2d)
    expands_inputs = True

    def check(self, module: Any) -> str | None:  # noqa: D102
        if getattr(module, "transposed", False):
            return "transposed convolutions are not supported"
        return None

    def groups(self, module: Any) -> int:  # noqa: D102
        return int(module.groups)

    def _kernel_numel(self, module: Any) -> int:
        n = 1
        for k in module.kernel_size:
            n *= int(k)
        return n

    def in_features(self, module: Any) -> int:  # noqa: D102
        return int(module.in_channels) // int(module.groups) * self._kernel_numel(module)

    def out_features(self, module: Any) -> int:  # noqa: D102
        return int(module.out_channels) // int(module.groups)

    def _as_2d(self, module: Any) -> tuple[tuple[int, int], ...]:
        if isinstance(module, nn.Conv1d):
            return (
                (1, int(module.kernel_size[0])),
                (1, int(module.stride[0])),
                (1, int(module.dilation[0])),
            )
        k, s, d = module.kernel_size, module.stride, module.dilation
        return (
            (int(k[0]), int(k[1])),
            (int(s[0]), int(s[1])),
            (int(d[0]), int(d[1])),
        )

    def inputs(self, module: Any, x: Tensor) -> Tensor:  # noqa: D102
        conv1d = isinstance(module, nn.Conv1d)
        spatial = 1 if conv1d else 2
        if x.dim() == spatial + 1:  # unbatched input
            x = x.unsqueeze(0)
        # Explicit padding covers every padding mode and the string paddings ('same', 'valid').
        pad = tuple(module._reversed_padding_repeated_twice)
        if any(pad):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, pad, mode=mode)
        if conv1d:
            x = x.unsqueeze(-2)
        kernel, stride, dilation = self._as_2d(module)
        cols = _unfold(x, kernel, stride, dilation)
        n, _, s = cols.shape
        g = self.groups(module)
        return cols.view(n, g, -1, s).permute(0, 3, 1, 2)

    def output_grads(self, module: Any, gy: Tensor) -> Tensor:  # noqa: D102
        spatial = 1 if isinstance(module, nn.Conv1d) else 2
        if gy.dim() == spatial + 1:
            gy = gy.unsqueeze(0)
        n, c = gy.shape[:2]
        g = self.groups(module)
        return gy.reshape(n, g, c // g, -1).permute(0, 3, 1, 2)

    def weight_to_matrix(self, module: Any, w: Tensor) -> Tensor:  # noqa: D102
        lead = w.shape[: w.dim() - module.weight.dim()]
        g = self.groups(module)
        return w.reshape(*lead, g, self.out_features(module), self.in_features(module))

    def matrix_to_weight(self, module: Any, m: Tensor) -> Tensor:  # noqa: D102
        return m.reshape(*m.shape[:-3], *module.weight.shape)


_CONV = ConvAdapter()
register_adapter(nn.Conv1d, _CONV)
register_adapter(nn.Conv2d, _CONV)


def _unfold(
    x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> Tensor:
    """``F.unfold`` of a padded ``[N, C, H, W]`` input: ``[N, C·kh·kw, L]`` (same values).

    The patches are a strided view of the input (``[N, C, kh, kw, H_out, W_out]``); one
    reshape copies them out, several times faster on a CPU than ``F.unfold``'s im2col kernel.
    """
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    ho = (h - dh * (kh - 1) - 1) // sh + 1
    wo = (w - dw * (kw - 1) - 1) // sw + 1
    if ho <= 0 or wo <= 0:
        return F.unfold(x, kernel_size=kernel, dilation=dilation, stride=stride)
    s0, s1, s2, s3 = x.stride()
    patches = x.as_strided(
        (n, c, kh, kw, ho, wo), (s0, s1, dh * s2, dw * s3, sh * s2, sw * s3), x.storage_offset()
    )
    return patches.reshape(n, c * kh * kw, ho * wo)
