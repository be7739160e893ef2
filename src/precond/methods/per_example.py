r"""Per-example Jacobians of one layer from its captured statistics (see :mod:`.rows`).

The forms :class:`~precond.methods.rows.DenseRows` and :class:`~precond.methods.rows.FactorRows`
and their products live in :mod:`precond.methods.rows` (re-exported here); this module builds
them from a layer's :class:`~precond.capture.LayerStats`: explicit per-example gradients,
one-hot layers as their (example, token) pairs, rank-one factors without
weight sharing and truncated low-rank factors with it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..capture import LayerStats, stat_dtype
from ..linalg.solvers import eigh_psd
from .rows import DenseRows, FactorRows, PairRows, Rows, load_rows

__all__ = [
    "DenseRows",
    "FactorRows",
    "PairRows",
    "Rows",
    "compact_one_hot",
    "example_factors",
    "load_rows",
    "one_hot_pairs",
    "rows_from_stats",
    "truncated_factors",
]


def compact_one_hot(st: LayerStats) -> bool:
    """Whether a layer has one-hot inputs and no bias column (embeddings)."""
    return st.adapter.one_hot_input and not st.layer.trained[1]


def one_hot_pairs(st: LayerStats, tag: str) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example Jacobians of a one-hot layer, one column per (example, token) pair.

    ``J_kn[:, v] = Σ_s g_kns [i_ns = v]`` is non-zero only on the tokens of example ``n``, so
    it is kept as the ``P ≤ N·S`` pairs ``(n, v)`` that occur: ``O(N·S·d_out)`` memory, where
    every example on every token of the batch takes ``O(N·U·d_out)`` (``U ≤ N·S`` distinct
    tokens: quadratic in the batch). Quantities that sum squares of the Jacobians'
    columns over the examples (a Fisher diagonal, EKFAC's scaling with an identity input
    basis) are sums over the pairs, added into their vocabulary columns with
    :func:`scatter_columns`.

    Args:
        st: Statistics of a layer with one-hot inputs (no bias column).
        tag: Which back-propagated vectors.

    Returns:
        ``(j, examples, tokens)``: ``j`` ``[K, P, d_out]`` and each pair's example and token
        (``[P]`` each, in increasing order of ``(example, token)``); an input with no hot entry
        (index ``-1``) forms pairs whose token is the vocabulary size, a column that
        :func:`scatter_columns` drops.
    """
    idx = st.a_indices()  # [N, S], -1 where no entry is hot
    g = st.g(tag)  # [K, N, S, 1, d_out]
    k, n, s, _, d = g.shape
    vocab = st.adapter.in_features(st.layer.module)
    tok = torch.where(idx < 0, vocab, idx)  # no hot entry: an extra column, dropped later
    example = torch.arange(n, device=idx.device).unsqueeze(1)
    pairs, inv = torch.unique(example * (vocab + 1) + tok, return_inverse=True)
    j = torch.zeros(k, pairs.numel(), d, dtype=stat_dtype(g.dtype), device=g.device)
    j.index_add_(1, inv.reshape(-1), g.reshape(k, n * s, d).to(j.dtype))
    return j, pairs.div(vocab + 1, rounding_mode="floor"), pairs.remainder(vocab + 1)


def scatter_columns(values: Tensor, tokens: Tensor, vocab: int) -> Tensor:
    """``[1, d_out, vocab]`` table whose column ``v`` sums the rows of ``values`` of token ``v``.

    Args:
        values: ``[P, d_out]``, one row per pair of :func:`one_hot_pairs`.
        tokens: The pairs' tokens ``[P]`` (the token ``vocab`` is dropped).
        vocab: Vocabulary size.

    Returns:
        The table ``[1, d_out, vocab]`` (zero on tokens without a pair).
    """
    full = values.new_zeros(values.shape[-1], vocab + 1)
    full.index_add_(1, tokens, values.T)
    return full[:, :vocab].unsqueeze(0)


def rows_from_stats(
    st: LayerStats, tag: str, examples: Tensor | None = None, scale: float = 1.0
) -> Rows:
    """The per-example Jacobians of one layer in their cheapest exact form.

    Layers without weight sharing (``S = 1``) give rank-one :class:`FactorRows`; one-hot layers
    give :class:`PairRows`; other layers give explicit
    :class:`DenseRows`. Only ``K = 1`` (one vector per example, e.g. the empirical Fisher) is
    supported.

    Args:
        st: The layer's statistics.
        tag: Which back-propagated vectors.
        examples: Optional subset of example indices to keep.
        scale: Factor applied to every Jacobian.

    Returns:
        The rows.
    """
    if compact_one_hot(st):
        return _pair_rows(st, tag, examples, scale)
    if examples is None and st.num_positions() > 1:
        # Weight sharing, whole batch: the capture's per-example gradients, which take the
        # bias column from Σ_s g instead of appending a ones column to the (large) inputs.
        j = st.per_example_grads(tag)
        _one_vector(st, j.shape[0])
        j = j[0]
        return DenseRows(j if scale == 1.0 else j.mul_(scale))
    alias = st.alias(tag)
    if alias is not None and alias[1].numel() == 1 and st.num_positions() == 1:
        # Rank-one factors of the recorded gradients themselves, the alias's scalar kept
        # aside (read once per curvature step): no scaled copy of the output gradients.
        a, g = example_factors(st, alias[0], examples)
        coef = scale * float(alias[1])
        return FactorRows(g[:, 0].unsqueeze(-1), a[:, 0].unsqueeze(-1), coef)
    a, g = example_factors(st, tag, examples)
    if scale != 1.0:
        g = g * scale
    if a.shape[1] == 1:
        return FactorRows(g[:, 0].unsqueeze(-1), a[:, 0].unsqueeze(-1))
    return DenseRows(torch.einsum("nsgo,nsgi->ngoi", g, a))


def _pair_rows(st: LayerStats, tag: str, examples: Tensor | None, scale: float) -> PairRows:
    """:class:`PairRows` of a one-hot layer: its pairs with a hot token, of the kept examples."""
    j, example, token = one_hot_pairs(st, tag)
    _one_vector(st, j.shape[0])
    width = st.adapter.in_features(st.layer.module)
    keep = token < width  # inputs without a hot entry have no Jacobian column
    m = st.batch_size
    if examples is not None:
        position = torch.full((m,), -1, dtype=torch.long, device=example.device)
        position[examples] = torch.arange(examples.numel(), device=example.device)
        example = position[example]
        keep &= example >= 0
        m = int(examples.numel())
    kept = keep.nonzero().squeeze(-1)  # one host sync, on curvature steps only
    j = j[0].index_select(0, kept)
    if scale != 1.0:
        j.mul_(scale)
    return PairRows(j, example.index_select(0, kept), token.index_select(0, kept), m, width)


def _one_vector(st: LayerStats, k: int) -> None:
    if k != 1:
        raise ValueError(
            f"Invalid statistics: {k} vectors per example for {st.layer.label}. "
            "Per-example Gram methods need one (the empirical Fisher)."
        )


def example_factors(
    st: LayerStats, tag: str, examples: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Canonical inputs ``[N, S, G, d_in']`` and output gradients ``[N, S, G, d_out]``.

    Args:
        st: The layer's statistics (``K = 1`` vectors under ``tag``).
        tag: Which back-propagated vectors.
        examples: Optional subset of example indices to keep.

    Returns:
        ``(a, g)`` in float32 or better.

    Raises:
        ValueError: If more than one vector per example was recorded.
    """
    a = st.a()
    g = st.g(tag)
    _one_vector(st, g.shape[0])
    dt = stat_dtype(a.dtype)
    a, g = a.to(dt), g[0].to(dt)
    if examples is not None:
        a, g = a.index_select(0, examples), g.index_select(0, examples)
    return a, g


def truncated_factors(a: Tensor, g: Tensor, rank: int) -> FactorRows | None:
    """Rank-``r`` factors of ``J_n = G_n A_nᵀ`` from the truncated SVD of ``G_n``.

    ``G_n`` (``[d_out, S]``) and ``A_n`` (``[d_in', S]``) hold one example's output gradients
    and inputs over its ``S`` positions. Keeping the top ``r`` singular triplets of ``G_n``
    (through ``eigh`` of the smaller of ``G_n G_nᵀ`` and ``G_nᵀ G_n``) gives the best rank-``r``
    approximation ``G_n ≈ G_n V_r V_rᵀ`` and ``J_n ≈ (G_n V_r)(A_n V_r)ᵀ`` (Yang et al. 2022,
    low-rank regime). With ``S ≤ r`` the factors are exact.

    Args:
        a: Inputs ``[N, S, G, d_in']``.
        g: Output gradients ``[N, S, G, d_out]``.
        rank: ``r``.

    Returns:
        The factors, or ``None`` if the eigendecomposition failed.
    """
    s, d_out = g.shape[1], g.shape[3]
    gm = g.permute(0, 2, 3, 1)  # [N, G, d_out, S]
    am = a.permute(0, 2, 3, 1)  # [N, G, d_in', S]
    if s <= rank:
        return FactorRows(gm, am)
    if d_out <= s:
        dec = eigh_psd(gm @ gm.transpose(-1, -2))
        if dec is None:
            return None
        u = dec[1][..., -rank:]  # eigenvalues ascend: the last columns span the top ones
        # J ≈ U_r U_rᵀ G Aᵀ = U_r (A Gᵀ U_r)ᵀ, computed without forming G Aᵀ.
        return FactorRows(u, am @ (gm.transpose(-1, -2) @ u))
    dec = eigh_psd(gm.transpose(-1, -2) @ gm)
    if dec is None:
        return None
    v = dec[1][..., -rank:]
    return FactorRows(gm @ v, am @ v)
