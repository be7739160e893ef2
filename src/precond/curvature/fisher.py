"""Fisher-type curvature of one layer, in every representation, from captured statistics.

All functions take a :class:`~precond.capture.LayerStats` and the tag under which the
back-propagated vectors were recorded (``"fisher_mc"``, ``"fisher_exact"``, ``"ggn"``,
``"fisher_emp"``); the vectors already carry the loss's reduction factor (see
:mod:`precond.curvature.loss`), so every result is the curvature of the loss as written:

* per-example Jacobians ``J_kn = Σ_s g_kns ã_nsᵀ`` (``[K, N, G, d_out, d_in']``);
* layer-wise: ``Σ_kn vec(J_kn) vec(J_kn)ᵀ`` (``[P, P]`` in canonical order);
* unit-wise: the ``d_in' × d_in'`` blocks of each output unit (``[G, d_out, d_in', d_in']``);
* diagonal: ``Σ_kn J_kn²`` (``[G, d_out, d_in']``);
* Kronecker factors (K-FAC): ``A = (1/(N·S)) Σ_ns ã ãᵀ`` and ``B = Σ_kns g gᵀ`` for
  ``expand``; ``A = (1/N) Σ_n ā_n ā_nᵀ`` with ``ā_n`` the mean over positions and
  ``B = Σ_kn (Σ_s g)(Σ_s g)ᵀ`` for ``reduce`` (Eschenhagen et al. 2023). ``B ⊗ A`` equals the
  layer block for one datum without weight sharing and for deep linear networks with MSE;
* eigenbasis scaling (EKFAC): ``Σ_kn (Q_Bᵀ J_kn Q_A)²``.

Statistics are computed in float32 or better whatever the model's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..capture import LayerStats, stat_dtype
from ..enums import WeightSharing
from ..linalg.solvers import gram_diagonal

__all__ = [
    "diagonal",
    "kfe_scale",
    "kron_factor_check",
    "kron_input_factor",
    "kron_output_factor",
    "layer_matrix",
    "per_example",
    "unit_matrices",
]


def kron_factor_check(factor: Tensor) -> Tensor:
    """The entries of a Kronecker factor that decide whether it is finite.

    A dense factor ``[G, n, n]`` is a Gram matrix: its diagonal
    (:func:`~precond.linalg.solvers.gram_diagonal`). A diagonal factor ``[G, n]`` (one-hot
    inputs) is its own diagonal: all of it.
    """
    return factor if factor.dim() < 3 else gram_diagonal(factor)


def per_example(st: LayerStats, tag: str) -> Tensor:
    """Per-example, per-vector Jacobians ``[K, N, G, d_out, d_in']``.

    Args:
        st: The layer's statistics.
        tag: Which back-propagated vectors.

    Returns:
        The Jacobians (float32 or better).
    """
    return st.per_example_grads(tag)


def layer_matrix(st: LayerStats, tag: str) -> Tensor:
    """The layer-wise block ``[P, P]`` (canonical order ``(g, o, i)``).

    Args:
        st: The layer's statistics.
        tag: Which back-propagated vectors.

    Returns:
        ``Σ_kn vec(J) vec(J)ᵀ``.
    """
    j = per_example(st, tag)
    flat = j.reshape(j.shape[0] * j.shape[1], -1)
    return flat.T @ flat


def unit_matrices(st: LayerStats, tag: str) -> Tensor:
    """Unit-wise blocks ``[G, d_out, d_in', d_in']`` (one per output unit).

    Args:
        st: The layer's statistics.
        tag: Which back-propagated vectors.

    Returns:
        ``Σ_kn J[g,o,:] J[g,o,:]ᵀ``.
    """
    j = per_example(st, tag)
    return torch.einsum("kngoi,kngoj->goij", j, j)


def diagonal(st: LayerStats, tag: str) -> Tensor:
    """The diagonal ``[G, d_out, d_in']``.

    Without weight sharing (``S = 1``) this avoids materialising per-example Jacobians:
    ``Σ_kn (g ãᵀ)² = Σ_kn g² (ã²)ᵀ``.

    Args:
        st: The layer's statistics.
        tag: Which back-propagated vectors.

    Returns:
        ``Σ_kn J²``.
    """
    g = st.g(tag)
    if g.shape[2] == 1:
        a = st.a()
        dt = stat_dtype(a.dtype)
        a2 = a[:, 0].to(dt).square()
        g2 = g[:, :, 0].to(dt).square()
        return torch.einsum("kngo,ngi->goi", g2, a2)
    return per_example(st, tag).square().sum(dim=(0, 1))


def _sharing(st: LayerStats, sharing: WeightSharing) -> WeightSharing:
    # One-hot inputs (embeddings) always use expand: their reduced input factor would be a
    # dense V×V matrix.
    return WeightSharing.EXPAND if st.adapter.one_hot_input else sharing


def kron_input_factor(st: LayerStats, sharing: WeightSharing = WeightSharing.EXPAND) -> Tensor:
    """K-FAC input factor ``A``: ``[G, d_in', d_in']``, or ``[G, d_in']`` for one-hot inputs.

    Args:
        st: The layer's statistics.
        sharing: ``expand`` or ``reduce``.

    Returns:
        ``A``.
    """
    sharing = _sharing(st, sharing)
    if st.adapter.one_hot_input and not st.layer.trained[1]:
        idx = st.a_indices().reshape(-1)
        width = st.adapter.in_features(st.layer.module)
        dt = stat_dtype(st.layer.params[0].dtype)
        counts = torch.zeros(width, dtype=dt, device=idx.device)
        valid = idx >= 0
        counts.index_add_(0, idx.clamp(min=0), valid.to(dt))
        return (counts / idx.numel()).unsqueeze(0)
    trains_weight, trains_bias = st.layer.trained
    if not trains_weight:
        dt = stat_dtype(st.layer.params[0].dtype)
        return torch.ones(st.layer.shape[0], 1, 1, dtype=dt, device=st.layer.params[0].device)
    if sharing is WeightSharing.REDUCE:
        x = st.x()
        dt = stat_dtype(x.dtype)
        chunks = iter([x.to(dt).mean(dim=1, keepdim=True)])  # [N, 1, G, d]
        count = x.shape[0]
    else:
        # A sum over rows: formed a chunk of examples at a time (a convolution's im2col
        # patches of the whole batch never exist at once).
        chunks = st.input_chunks()
        count = st.batch_size * st.num_positions()
    out: Tensor | None = None
    mean: Tensor | None = None
    for xc in chunks:
        dt = stat_dtype(xc.dtype)
        xc = xc.to(dt)
        _, _, g, d = xc.shape
        if out is None:
            out = xc.new_empty(g, d + int(trains_bias), d + int(trains_bias))
            mean = xc.new_zeros(g, d)
            _sum_outer(xc, out[:, :d, :d], 1.0 / count)
        else:
            _sum_outer(xc, out[:, :d, :d], 1.0 / count, beta=1.0)
        if trains_bias:
            assert mean is not None
            mean.add_(xc.sum(dim=(0, 1)), alpha=1.0 / count)
    assert out is not None and mean is not None
    if not trains_bias:
        return out
    # The bias column of ã is all ones: its block is assembled from column sums instead of
    # concatenating a ones column to the (possibly large) inputs.
    d = mean.shape[-1]
    out[:, :d, d] = mean
    out[:, d, :d] = mean
    out[:, d, d] = 1.0
    return out


def _sum_outer(x: Tensor, out: Tensor, alpha: float, beta: float = 0.0) -> None:
    """``out[g] = β out[g] + α Σ_{i,s} x[i,s,g] x[i,s,g]ᵀ`` for ``x`` ``[I, S, G, d]``, any strides.

    ``out`` (``[G, d, d]``, may be a slice of a larger matrix) is overwritten (``β = 0``) or
    accumulated into (``β = 1``). Rows that can be
    viewed as one ``[I·S, d]`` matrix per group give one GEMM; otherwise (e.g. the transposed
    im2col patches of a convolution, ``[d, S]`` per example) the products of the examples are
    accumulated by ``addbmm`` straight from that layout, without copying the rows out.
    """
    i, s, g, d = x.shape
    try:
        rows: Tensor | None = x.view(i * s, g, d)
    except RuntimeError:
        rows = None
    if rows is None and g == 1 and s >= 32:
        xs = x[:, :, 0, :]  # [I, S, d]
        out[0].addbmm_(xs.transpose(1, 2), xs, beta=beta, alpha=alpha)
        return
    if rows is None:
        rows = x.reshape(i * s, g, d)
    r = rows.transpose(0, 1)  # [G, M, d]
    out.baddbmm_(r.transpose(1, 2), r, beta=beta, alpha=alpha)


def kron_output_factor(
    st: LayerStats, tag: str, sharing: WeightSharing = WeightSharing.EXPAND
) -> Tensor:
    """K-FAC output-gradient factor ``B``: ``[G, d_out, d_out]``.

    Args:
        st: The layer's statistics.
        tag: Which back-propagated vectors.
        sharing: ``expand`` or ``reduce``.

    Returns:
        ``B``.
    """
    sharing = _sharing(st, sharing)
    g = st.g(tag)
    dt = stat_dtype(g.dtype)
    k, n, s, groups, d = g.shape
    if sharing is WeightSharing.REDUCE:
        gs = g.to(dt).sum(dim=2, keepdim=True).reshape(k * n, 1, groups, d)
    else:
        gs = g.to(dt).reshape(k * n, s, groups, d)
    out = gs.new_empty(groups, d, d)
    _sum_outer(gs, out, 1.0)
    return out


def kfe_scale(st: LayerStats, tag: str, rotate: object) -> Tensor:
    """EKFAC scaling: second moments of per-example Jacobians in a Kronecker eigenbasis.

    Args:
        st: The layer's statistics.
        tag: Which back-propagated vectors.
        rotate: ``V ↦ Q_Bᵀ V Q_A`` (e.g. :meth:`precond.linalg.blocks.KfeBlock.rotate`).

    Returns:
        ``Σ_kn (Q_Bᵀ J_kn Q_A)²`` of shape ``[G, d_out, d_in']``.
    """
    assert callable(rotate)
    j = per_example(st, tag)
    return rotate(j).square().sum(dim=(0, 1))
