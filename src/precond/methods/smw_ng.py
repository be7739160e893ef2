r"""Empirical-Fisher natural gradient through the Gram matrix (Ren & Goldfarb 2019).

With ``U`` the ``M × P`` matrix whose rows are the per-example gradients of all preconditioned
layers (concatenated, scaled so that ``UᵀU`` is the empirical Fisher of the loss as written:
``(1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ`` for a ``mean`` loss), the update is

.. math::

    \Delta\theta = (\lambda I + U^\top U)^{-1} g
                 = \frac{1}{\lambda}\big(g - U^\top (\lambda I_M + U U^\top)^{-1} U g\big)

(Sherman-Morrison-Woodbury): only the ``M × M`` Gram matrix ``U Uᵀ = Σ_l U_l U_lᵀ`` is
factorised, never a ``P × P`` matrix. The Gram matrix of a layer without weight sharing is
``(G Gᵀ) ⊙ (Ã Ãᵀ)`` from its inputs and output gradients, so its per-example gradients are
never materialised; layers with weight-sharing positions use explicit per-example gradients,
embeddings their (example, token) pairs (:class:`~precond.methods.rows.PairRows`).

On curvature steps the per-example gradients (in the compact forms of
:mod:`precond.methods.per_example`) and the Gram matrix are computed; on refresh steps the
Cholesky factor of ``λI + UUᵀ`` (a host-synchronising check falls back to the previous
preconditioner if it fails); every step applies the formula above to the current gradient with
the stored ``U`` (two products with ``U`` and one triangular solve pair). ``damping`` must be
positive and ``ema_decay`` 0 (the Gram matrix belongs to one batch). With
``damping_scale="gram"`` the damping is relative: ``λ = damping · tr(UUᵀ)/M`` (the mean squared
norm of the per-example gradients), fixed at each refresh, so that one value suits problems
whose gradients differ in scale.

Costs: ``O(M² (d_in' + d_out))`` per layer for the Gram matrix (``O(M² P_l)`` with weight
sharing), ``O(M³)`` per refresh, ``O(M P)`` per step; memory ``O(M (d_in' + d_out))`` per layer
(``O(M P_l)`` with weight sharing) plus ``M²``.

References:
    Y. Ren, D. Goldfarb. Efficient Subsampled Gauss-Newton and Natural Gradient Methods for
    Training Neural Networks. arXiv 2019. https://arxiv.org/abs/1906.02353
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..capture import Layer, LayerStats, per_example_workspace, stat_dtype
from ..config import PreconditioningConfig
from ..enums import CurvatureType
from ..linalg.solvers import cholesky_ex, gram_diagonal
from ..numerics import all_sums_finite, is_finite, warn_once
from ..registry import register_method
from ..validation import check_float, invalid
from .base import PreconditionedGradientMaker
from .cost import CostModel, Phase, add_patches
from .kfac import grad_parts, layer_has_grad, write_preconditioned
from .natural_gradient import positions
from .per_example import DenseRows, FactorRows, PairRows, Rows, load_rows, rows_from_stats
from .rows import PAIR_CHUNK_NUMEL

__all__ = [
    "SmwEmpNaturalGradientConfig",
    "SmwEmpNaturalGradientMaker",
    "DAMPING_SCALES",
    "block_widths",
    "check_gram_config",
    "gram_damping",
    "rows_cost",
    "width_in",
]

_EMP = CurvatureType.FISHER_EMP


def check_gram_config(config: PreconditioningConfig, method: str) -> None:
    """Validate the options every per-batch Gram (SMW) method shares.

    Args:
        config: The config.
        method: The method's name for the messages.

    Raises:
        ValueError: If ``damping`` is not positive or ``ema_decay`` is not 0.
    """
    check_float("damping", config.damping, minimum=0.0, strict_min=True)
    scale = getattr(config, "damping_scale", "absolute")
    if scale not in DAMPING_SCALES:
        raise invalid("damping_scale", scale, f"Supported: {DAMPING_SCALES}")
    if config.ema_decay != 0.0:
        raise invalid(
            "ema_decay",
            config.ema_decay,
            f"{method} solves with the current batch's Gram matrix; ema_decay must be 0",
        )


#: How ``damping`` sets the ``λ`` added to a Gram matrix: ``absolute`` (``λ = damping``) or
#: ``gram`` (``λ = damping · tr(UUᵀ)/M``, see :func:`gram_damping`).
DAMPING_SCALES = ("absolute", "gram")


def gram_damping(damping: float, gram: Tensor) -> float:
    """``λ = damping · tr(UUᵀ)/M``: the damping relative to the Gram matrix's scale.

    ``tr(UUᵀ)/M`` is the mean squared norm of the per-example gradients (``tr(F)/M`` for the
    empirical Fisher ``F = UᵀU``), so ``damping`` is a fraction of the curvature's own size
    and one value fits losses and models whose gradients differ by orders of magnitude. A
    Gram matrix with a zero or non-finite trace falls back to ``λ = damping``. Reads the trace
    on the host (refresh steps only).

    Args:
        damping: The configured damping (a relative factor).
        gram: ``U Uᵀ`` (``[M, M]``).

    Returns:
        ``λ``.
    """
    mean = float(gram.diagonal().sum()) / max(1, gram.shape[-1])
    if not math.isfinite(mean) or mean <= 0.0:
        return damping
    return damping * mean


@dataclass(kw_only=True)
class SmwEmpNaturalGradientConfig(PreconditioningConfig):
    """SMW-NG options: the common ones, with ``damping > 0`` and ``ema_decay = 0``.

    Args:
        damping_scale: ``"absolute"``: ``λ = damping``; ``"gram"``: ``λ = damping · tr(UUᵀ)/M``
            (the mean squared norm of the per-example gradients of the curvature batch),
            fixed at each refresh (:func:`gram_damping`).
    """

    damping_scale: str = "absolute"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_gram_config(self, "SMW-NG")


def cholesky_or_none(gram: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """Cholesky factors of ``gram + λI`` (batched) and which of them succeeded.

    For a finite ``gram`` (the callers check it), a factor whose diagonal is finite is finite:
    row ``i`` of ``L`` has ``Σ_k L_ik² = gram_ii + λ``, so only the diagonal is checked.

    Args:
        gram: ``[..., M, M]``, finite.
        damping: ``λ > 0``.

    Returns:
        ``(L, ok)`` with ``ok`` a boolean tensor over the batch dimensions.
    """
    factor, info = cholesky_ex(gram, damping)  # padded where faster (damped_buffer)
    ok = (info == 0) & is_finite(factor.diagonal(dim1=-2, dim2=-1)).all(-1)
    return factor, ok


def cholesky_solve_vector(chol: Tensor, b: Tensor) -> Tensor:
    """``(L Lᵀ)⁻¹ b`` by two triangular solves, for a vector ``b`` (``[M]``).

    The same values as ``torch.cholesky_solve``, without its host-synchronising check of the
    result, which would stall every step on an accelerator (and costs a round trip on a CPU).

    Args:
        chol: Lower Cholesky factor ``L`` (``[M, M]``).
        b: Right-hand side ``[M]``.

    Returns:
        The solution ``[M]``.
    """
    y = torch.linalg.solve_triangular(chol, b.unsqueeze(-1).to(chol.dtype), upper=False)
    return torch.linalg.solve_triangular(chol.mT, y, upper=True).squeeze(-1)


def smw_apply(rows: Rows, chol: Tensor, damping: float, v: Tensor) -> Tensor:
    """``(λI + UᵀU)⁻¹ v = (v − Uᵀ (λI + UUᵀ)⁻¹ U v) / λ`` for one layer's rows.

    Args:
        rows: ``U``.
        chol: Cholesky factor of ``λI + UUᵀ`` (``[M, M]``).
        damping: ``λ``.
        v: Canonical ``[G, d_out, d_in']``.

    Returns:
        The solution, canonical.
    """
    x = cholesky_solve_vector(chol, rows.dot(v))
    return (v - rows.combine(x)) / damping


def smw_apply_in_place(rows: Rows, chol: Tensor, damping: float, parts: list[Tensor]) -> None:
    """:func:`smw_apply` written into ``V`` given as column blocks (views of the gradients).

    Args:
        rows: ``U``.
        chol: Cholesky factor of ``λI + UUᵀ``.
        damping: ``λ``.
        parts: Column blocks of canonical ``V`` (:func:`precond.methods.kfac.grad_parts`).
    """
    x = cholesky_solve_vector(chol, rows.dot_parts(parts))
    rows.combine_into(x, parts, alpha=-1.0 / damping, beta=1.0 / damping)


@register_method(
    "smw_ng",
    "SMW-NG: empirical-Fisher natural gradient via the N×N Gram matrix (Ren & Goldfarb 2019)",
)
class SmwEmpNaturalGradientMaker(PreconditionedGradientMaker):
    """SMW-NG gradient maker (see the module docstring for the update and references).

    Args:
        model: The model.
        config: :class:`SmwEmpNaturalGradientConfig`.
    """

    config_class = SmwEmpNaturalGradientConfig
    config: SmwEmpNaturalGradientConfig

    def __init__(
        self, model: torch.nn.Module, config: SmwEmpNaturalGradientConfig | None = None
    ) -> None:
        super().__init__(model, config)
        self.rows: dict[str, Rows] = {}
        self.chol: Tensor | None = None
        self._pending: dict[str, Rows] | None = None
        self._pending_gram: Tensor | None = None
        self._positions: dict[str, int] = {}
        #: ``λ`` of the installed factorisation (``damping_scale="gram"``).
        self.lam: float | None = None

    def _curvature_tags(self) -> list[CurvatureType]:
        return [_EMP]

    def _lam(self) -> float:
        """``λ`` of the installed factorisation."""
        if self.config.damping_scale == "gram" and self.lam is not None:
            return self.lam
        return self.damping

    def update_curvature(self, stats: Mapping[str, LayerStats]) -> None:  # noqa: D102
        rows: dict[str, Rows] = {}
        for name, st in stats.items():
            if st.num_calls == 0:
                continue
            rows[name] = rows_from_stats(st, _EMP.value)
            self._positions[name] = positions(st)
        if not rows:
            return
        gram: Tensor | None = None
        for r in rows.values():  # accumulated: one M × M buffer, not one per layer
            gram = r.gram() if gram is None else r.gram_into(gram)
        assert gram is not None
        # one host sync; a Gram matrix (a sum of them here) is finite exactly when its
        # diagonal is
        if not all_sums_finite([gram_diagonal(gram)]):
            warn_once(
                "smw_ng:stats",
                "SMW-NG: non-finite per-example gradients; curvature update skipped.",
            )
            return
        self._pending, self._pending_gram = rows, gram

    def update_preconditioner(self) -> None:  # noqa: D102
        if self._pending is None or self._pending_gram is None:
            return  # the stored factorisation belongs to the latest statistics already
        lam = self.damping
        if self.config.damping_scale == "gram":
            lam = gram_damping(self.damping, self._pending_gram)
        factor, ok = cholesky_or_none(self._pending_gram, lam)
        if not bool(ok):
            warn_once(
                "smw_ng:refresh",
                "SMW-NG: could not factorise the damped Gram matrix; keeping the previous "
                "preconditioner (plain gradient if there is none).",
            )
        else:
            self.rows, self.chol, self.lam = self._pending, factor, lam
        self._pending, self._pending_gram = None, None

    def precondition(self) -> None:  # noqa: D102
        if self.chol is None:
            return
        live = [layer for layer in self.layers if layer_has_grad(layer)]
        if not live:
            return
        # Column blocks of each layer's gradient: views of p.grad (written in place) where the
        # layout allows, else a canonical copy written back at the end.
        grads: dict[str, list[Tensor]] = {}
        copied: set[str] = set()
        for layer in live:
            rows = self.rows.get(layer.name)
            dtype = None if rows is None else rows.dtype
            parts = grad_parts(layer, dtype)
            if parts is None:
                v = layer.grads_matrix()
                parts = [v.to(stat_dtype(v.dtype))]
                copied.add(layer.name)
            grads[layer.name] = parts
        u: Tensor | None = None
        for name, parts in grads.items():
            rows = self.rows.get(name)
            if rows is not None:
                un = rows.dot_parts(parts)
                u = un if u is None else u.add_(un)
        if u is None:
            return
        x = cholesky_solve_vector(self.chol, u)
        lam = self._lam()
        for layer in live:
            parts = grads[layer.name]
            rows = self.rows.get(layer.name)
            if rows is None:
                # A layer absent from the curvature batch has no empirical Fisher: (λI)⁻¹ g.
                torch._foreach_div_(parts, lam)
            else:
                rows.combine_into(x, parts, alpha=-1.0 / lam, beta=1.0 / lam)
            if layer.name in copied:
                write_preconditioned(layer, parts[0])

    def preconditioner_state_dict(self) -> dict[str, Any]:  # noqa: D102
        pending = None
        if self._pending is not None:
            pending = {n: r.state_dict() for n, r in self._pending.items()}
        return {
            "rows": {n: r.state_dict() for n, r in self.rows.items()},
            "chol": self.chol,
            "pending": pending,
            "pending_gram": self._pending_gram,
            "lam": self.lam,
        }

    def load_preconditioner_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        self.rows = {n: load_rows(r) for n, r in state["rows"].items()}
        self.chol = state["chol"]
        pending = state["pending"]
        self._pending = None if pending is None else {n: load_rows(r) for n, r in pending.items()}
        self._pending_gram = state["pending_gram"]
        self.lam = state.get("lam")

    def cost_model(self) -> CostModel:
        """Unavoidable kernels at the shapes of the last curvature step."""
        cm = CostModel()
        m = 0
        pending = workspace = 0
        for layer in self.layers:
            rows = self.rows.get(layer.name)
            if rows is None:
                continue
            m = rows.m
            s = self._positions.get(layer.name, 1)
            if isinstance(rows, DenseRows):
                add_patches(cm, layer, m, s)  # the per-example Jacobians' patches
            numel, ws = rows_cost(cm, rows, layer.shape, s, width_in(layer))
            pending, workspace = pending + numel, max(workspace, ws)
        if m:
            cm.add(Phase.REFRESH, "cholesky", (1, m))
            cm.add(Phase.APPLY, "matmul", (m, m, 1))
            cm.state_numel += m * m
            # new rows and Gram matrix beside the stored ones until the refresh factorises them,
            # then the new Cholesky factor beside the Gram matrix and the stored factor (kept
            # if the new one fails)
            cm.transient_numel = pending + 2 * m * m + workspace
        return cm


def rows_cost(
    cm: CostModel, rows: Rows, shape: tuple[int, int, int], s: int, width_in: int | None = None
) -> tuple[int, int]:
    """Add the Gram (curvature), product (apply) kernels and state of one layer's rows.

    Args:
        cm: The cost model to extend.
        rows: The layer's rows (their form decides the kernels).
        shape: Canonical ``(G, d_out, d_in')``.
        s: Weight-sharing positions per example.
        width_in: Input width per group without the bias column (``d_in'`` if ``None``).

    Returns:
        ``(rows, workspace)``: elements of the stored rows (with their sketched copies), which a
        curvature step holds twice (the new rows are computed while the stored ones must stay
        usable: if the new Gram matrix cannot be factorised, they are kept), and of the chunk
        workspace of the per-example Jacobians.
    """
    groups, d_out, d_in = shape
    m = rows.m
    if isinstance(rows, FactorRows):
        r = int(rows.g.shape[-1])
        so, si = rows.sketch_dims()
        cm.add(Phase.CURVATURE, "bmm", (groups, m * r, so, m * r))
        cm.add(Phase.CURVATURE, "bmm", (groups, m * r, si, m * r))
        cm.add(Phase.APPLY, "bmm", (groups, m * r, so, si))
        cm.add(Phase.APPLY, "bmm", (groups, d_out, m * r, d_in))
        if rows.out_rows is not None or rows.in_rows is not None:
            # the sketch restricts the gradient to its sampled rows and columns
            cm.add(Phase.APPLY, "elementwise", (groups * so * si,))
        numel = m * groups * r * (d_out + d_in)
        if rows.out_rows is not None or rows.in_rows is not None:
            # the sketched factors, used on every step (the output side carries the scale)
            numel += m * groups * r * (so + (si if rows.in_rows is not None else 0))
        cm.state_numel += numel
        return numel, 0
    if isinstance(rows, PairRows):
        return _pair_cost(cm, rows)
    assert isinstance(rows, DenseRows)
    width = rows.j[0].numel()
    if s > 1:
        cm.add(Phase.CURVATURE, "bmm", (m * groups, d_out, s, d_in))
    sketched = width if rows.coords is None else int(rows.coords.numel())
    cm.add(Phase.CURVATURE, "matmul", (m, sketched, m))
    cm.add(Phase.APPLY, "matmul", (m, sketched, 1))
    cm.add(Phase.APPLY, "matmul", (1, m, width))
    if rows.coords is not None:
        cm.add(Phase.APPLY, "elementwise", (sketched,))  # the gradient's sampled coordinates
    numel = m * width + (0 if rows.coords is None else m * sketched)
    cm.state_numel += numel
    workspace = 0
    if s > 1:
        # the inputs at the shared positions (im2col patches) are formed a chunk at a time
        d = d_in if width_in is None else width_in
        workspace = per_example_workspace(m, s, groups, d, width)
    return numel, workspace


def _pair_cost(cm: CostModel, rows: PairRows) -> tuple[int, int]:
    """:func:`rows_cost` of an embedding's (example, token) pairs.

    The Gram matrix sums the inner products of the ``L`` couples of pairs that share a token
    (gathered, multiplied, reduced and added by example: about four passes over ``L × d_out``
    elements); a product with ``V`` gathers it at the pairs' tokens, a combination scatters the
    weighted pairs into it.
    """
    m, (p, d) = rows.m, rows.j.shape
    touched = int(rows.touched()[0].numel()) * d
    couples = rows.couples()
    cm.add(Phase.CURVATURE, "elementwise", (4 * couples * d + m * m,))
    cm.add(Phase.APPLY, "elementwise", (2 * p * d,))  # gather and multiply
    cm.add(Phase.APPLY, "elementwise", (2 * p * d + d * rows.width,))  # weigh, scale and scatter
    # the pairs with their examples and tokens (two int64 each: four elements)
    numel = p * (d + 4) + (0 if rows.coords is None else touched)
    cm.state_numel += numel
    # the couples' indices (two int64 each), and two chunks of gathered products
    return numel, 4 * couples + 2 * min(couples * d, PAIR_CHUNK_NUMEL)


def block_widths(layer: Layer) -> list[int] | None:
    """Widths of the column blocks of the layer's gradient (weight columns, then the bias).

    The blocks :func:`precond.methods.kfac.grad_parts` returns; ``None`` without an adapter.
    """
    w = width_in(layer)
    if w is None:
        return None
    return ([w] if layer.trained[0] else []) + ([1] if layer.trained[1] else [])


def width_in(layer: Layer) -> int | None:
    """Input width per group without the bias column (``None`` without an adapter)."""
    if layer.adapter is None:
        return None
    return layer.adapter.in_features(layer.module) * int(layer.trained[0])
