"""The diagonal Fisher block of one layer from captured statistics, with bounded workspaces.

:func:`diagonal` equals :func:`precond.curvature.fisher.diagonal` (``Σ_kn J_kn²``): layers
without weight sharing use ``Σ_kn g² (ã²)ᵀ`` over chunks of examples (no per-example
Jacobians, no ones column appended to the inputs); layers with weight sharing square their
per-example Jacobians (formed over chunks of examples by the capture) in place.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..capture import LayerStats, stat_dtype
from ..curvature import fisher
from .per_example import one_hot_jacobians

__all__ = ["DIAG_CHUNK_NUMEL", "diag_chunk", "diagonal", "one_hot_diagonal"]


def diagonal(st: LayerStats, tag: str) -> Tensor:
    """:func:`precond.curvature.fisher.diagonal`, squaring the per-example Jacobians in place.

    With weight sharing the squares of the per-example Jacobians are needed; squaring them in
    place keeps one ``[K, N, P]`` buffer instead of two.
    """
    if st.num_positions() > 1:
        return st.per_example_grads(tag).square_().sum(dim=(0, 1))
    trains_weight, trains_bias = st.layer.trained
    g = st.g(tag)  # [K, N, 1, G, d_out]
    if st.adapter.one_hot_input or not (trains_weight and trains_bias) or g.shape[3] != 1:
        return fisher.diagonal(st, tag)
    # Σ_kn g² (ã²)ᵀ = Σ_chunks (Σ_k g²)ᵀ [x², 1]: matrix products over chunks of examples, the
    # squared inputs written with their ones column into one small buffer (no cached copy of
    # the inputs, no einsum repacking of whole-batch squares).
    dt = stat_dtype(g.dtype)
    x = st.x()[:, 0, 0]  # [N, d_in]
    n, d_in = x.shape
    step = diag_chunk(n, d_in + 1 + g.shape[-1])
    out = torch.empty(g.shape[-1], d_in + 1, dtype=dt, device=x.device)
    a2 = torch.empty(min(n, step), d_in + 1, dtype=dt, device=x.device)
    a2[:, -1] = 1.0
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        buf = a2[: hi - lo]
        torch.square(x[lo:hi].to(dt), out=buf[:, :-1])
        g2 = g[:, lo:hi, 0, 0].to(dt).square()
        g2 = g2[0] if g2.shape[0] == 1 else g2.sum(0)  # [n_chunk, d_out]
        if lo == 0:
            torch.mm(g2.T, buf, out=out)
        else:
            out.addmm_(g2.T, buf)
    return out.unsqueeze(0)


def diag_chunk(n: int, width: int) -> int:
    """Examples per chunk of the diagonal Fisher block of a layer without weight sharing.

    Args:
        n: Examples.
        width: Elements per example: squared inputs, ones column and squared output gradients.

    Returns:
        Examples per chunk (at least 1, at most ``n``).
    """
    most = max(1, DIAG_CHUNK_NUMEL // max(1, width))
    chunks = -(-n // most)
    return max(1, -(-n // chunks))  # equal chunks


#: Elements of squared inputs and output gradients formed at once for a diagonal Fisher block.
DIAG_CHUNK_NUMEL = 1 << 18


def one_hot_diagonal(st: LayerStats, tag: str) -> Tensor:
    """Fisher diagonal of an embedding from its Jacobians on the touched vocabulary only."""
    j, cols = one_hot_jacobians(st, tag)
    part = j.square().sum(dim=(0, 1))  # [1, d_out, U]
    full = part.new_zeros(*part.shape[:-1], st.adapter.in_features(st.layer.module))
    return full.index_copy_(-1, cols, part)
