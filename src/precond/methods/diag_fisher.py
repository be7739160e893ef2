"""The diagonal Fisher block of one layer from captured statistics, with bounded workspaces.

:func:`diagonal` equals :func:`precond.curvature.fisher.diagonal` (``Σ_kn J_kn²``): layers
without weight sharing use ``Σ_kn g² (ã²)ᵀ`` over chunks of examples (no per-example
Jacobians, no ones column appended to the inputs); layers with weight sharing square their
per-example Jacobians (formed over chunks of examples by the capture) in place.

:func:`fisher_pass_with_backward` runs a one-vector Fisher pass (sampled labels) beside the
loss's own backward, segment by segment (:mod:`._twin_backward`), handing over each layer's
statistics as soon as its output gradients are complete, so that the block can be formed and
the layer's inputs and output gradients dropped before the loss's backward reaches the wide
lower layers.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping

import torch
from torch import Tensor

from ..capture import HookCounter, Layer, LayerStats, per_example_workspace, stat_dtype
from ..curvature import fisher
from ..linalg.blocks import DiagBlock
from ._twin_backward import UncutGraphs, twin_backward_edges
from .per_example import one_hot_pairs, scatter_columns

__all__ = [
    "DIAG_CHUNK_NUMEL",
    "diag_chunk",
    "diag_denominators",
    "diagonal",
    "fisher_pass_with_backward",
    "one_hot_diagonal",
    "positive_damping",
    "worth_forming_early",
]


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
    x = st.x()
    n, d_in, d_out = x.shape[0], x.shape[-1], g.shape[-1]
    x = x.reshape(n, d_in)  # [N, 1, 1, d_in] as [N, d_in]: a view
    step = diag_chunk(n, d_in + 1 + d_out)
    out = torch.empty(d_out, d_in + 1, dtype=dt, device=x.device)
    a2 = torch.empty(min(n, step), d_in + 1, dtype=dt, device=x.device)
    a2.select(1, d_in).fill_(1.0)
    if step >= n and g.shape[0] == 1:
        # one chunk, one vector per example (the Monte-Carlo and empirical Fisher): the same
        # products without the chunks' slices and selections
        torch.square(x.to(dt), out=a2[:, :d_in])
        torch.mm(g.reshape(n, d_out).to(dt).square().T, a2, out=out)
        return out.unsqueeze(0)
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
    """Fisher diagonal of an embedding: squared Jacobian columns summed per token."""
    j, _, tokens = one_hot_pairs(st, tag)
    sq = j.square_()  # ours: squared in place
    values = sq[0] if sq.shape[0] == 1 else sq.sum(0)
    return scatter_columns(values, tokens, st.adapter.in_features(st.layer.module))


def fisher_pass_with_backward(
    loss: Tensor,
    logits: Tensor,
    vector: Tensor,
    stats: Mapping[str, LayerStats],
    tag: str,
    on_layer: Callable[[str, LayerStats], None],
    *,
    uncut: UncutGraphs | None = None,
    key: Hashable | None = None,
) -> bool:
    """``loss.backward()`` and the output gradients of back-propagating ``vector``, interleaved.

    The output gradients of every recorded layer call are stored under ``tag`` (as
    :meth:`~precond.capture.Recorder.backprop` with one vector stores them: ``[1, *output]``);
    when all calls of a layer have theirs while the loss's backward still runs (the layer lies
    above the last cut), ``on_layer(name, stats)`` runs and may drop them. The layers of the
    last segment are left to the caller (the graph is freed by then). The gradients are those
    of the two passes run one after the other, bit for bit.

    Args:
        loss: Scalar loss (its backward writes the parameters' ``.grad``).
        logits: The tensor ``vector`` is the output gradient of.
        vector: Output gradient of ``logits`` (one vector).
        stats: This step's statistics, recording.
        tag: Tag of the recorded output gradients.
        on_layer: Called once per layer whose output gradients are complete before the
            loss's backward ends.
        uncut: Signatures found without a cut (:class:`~._twin_backward.UncutGraphs`).
        key: This graph's signature.

    Returns:
        Whether it ran; ``False`` (nothing done) when the graph has no cut that pays below the
        logits (then the caller runs the two passes one after the other).
    """
    index = [
        (name, call)
        for name, st in stats.items()
        for call, edge in enumerate(st.output_edges)
        if edge is not None
    ]
    edges = [stats[name].output_edges[call] for name, call in index]
    delivered: set[int] = set()
    remaining: dict[str, int] = {}
    for name, _ in index:
        remaining[name] = remaining.get(name, 0) + 1

    def deliver(j: int, gy: Tensor | None, early: bool = False) -> None:
        delivered.add(j)
        name, call = index[j]
        st = stats[name]
        st.set_grad(tag, call, None if gy is None else gy.unsqueeze(0))
        remaining[name] -= 1
        if remaining[name] == 0 and early:
            on_layer(name, st)

    def on_segment(found: dict[int, Tensor | None], last: bool) -> None:
        for j in sorted(found):
            deliver(j, found.pop(j), early=not last)

    out = twin_backward_edges(
        loss, logits, vector, edges=edges, on_segment=on_segment, uncut=uncut, key=key
    )
    if out is None:
        return False
    HookCounter.grad_calls += len(edges)
    for j in range(len(index)):
        if j not in delivered:
            deliver(j, None)  # not reached by the pass (as backprop records it)
    return True


def diag_denominators(layer: Layer, block: DiagBlock) -> list[Tensor]:
    """``values + damping`` of a layer's diagonal block, one tensor per trained parameter.

    One contiguous pass over the values, in their canonical ``[G, d_out, d_in']`` layout,
    and each parameter's part as a view of it with the parameter's shape (a weight's rows are
    contiguous, a bias is a column), so that applying the block is an in-place division of
    the gradients. (Per-parameter contiguous copies cost an allocation and a strided pass per
    parameter: 12 operators against 3 at mlp512.)

    Args:
        layer: The layer.
        block: Its diagonal block (values in canonical ``[G, d_out, d_in']`` layout).

    Returns:
        The damped diagonals, aligned with ``layer.params``.
    """
    assert block.values is not None
    damped = torch.add(block.values, block.damping)
    return [v.reshape(p.shape) for p, v in zip(layer.params, layer.from_matrix(damped))]


def positive_damping(damping: float, values: Tensor) -> float:
    """``damping``, or a tiny multiple of the mean of ``values`` when ``damping`` is 0.

    Element-wise curvature can be exactly zero (a coordinate no example moved); dividing by it
    undamped would give ``0 / 0``. Called on refresh steps only (it synchronises).

    Args:
        damping: The configured damping.
        values: Non-negative curvature values.

    Returns:
        A positive damping.
    """
    if damping > 0.0:
        return damping
    return max(1e-7 * float(values.mean()), 1e-30)


def worth_forming_early(layer: Layer, st: LayerStats, tag: str) -> bool:
    """Whether forming a layer's block during the Fisher pass lowers the step's peak memory.

    When it frees at least half of what forming the block allocates: its per-example
    workspace is transient and allocated while the loss's backward is not at its peak yet,
    while what it frees (the layer's inputs and output gradients) would be held through that
    peak. (cnn_small, live peaks in MB at B = 32 / 128 / 512: two passes one after the other
    9.6 / 37.3 / 148.4; twin, always early 11.3 / 33.4 / 132.3; this rule 9.3 / 33.4 / 132.3.)

    Args:
        layer: The layer.
        st: Its statistics (output gradients under ``tag`` recorded).
        tag: Tag of the output gradients.

    Returns:
        Whether to form the block now.
    """
    n, s = st.batch_size, st.num_positions()
    groups, d_out, d_in = layer.shape
    p = groups * d_out * d_in
    held = sum(x.numel() for x in st.raw_inputs)
    held += sum(g.numel() for g in st.raw_grads.get(tag, []) if g is not None)
    if s > 1 and layer.adapter is not None and not layer.adapter.one_hot_input:
        width = layer.adapter.in_features(layer.module)
        need = n * p + per_example_workspace(n, s, groups, width, p)
    else:
        need = diag_chunk(n, d_in + d_out) * (d_in + d_out) + p
    return 2 * held >= need
