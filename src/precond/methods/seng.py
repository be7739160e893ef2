r"""SENG: sketched empirical natural gradient, layer by layer (Yang, Xu, Wen, Chen, Xu 2022).

For each layer ``l`` let ``U_l`` (``M × P_l``) hold the per-example gradients of the layer on
the curvature batch, scaled so that ``U_lᵀ U_l`` is the empirical Fisher block of the loss as
written (``(1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ`` for a ``mean`` loss). SENG solves with the damped block by
Sherman-Morrison-Woodbury, sketching the ``M × M`` least-squares subproblem:

.. math::

    \Delta W_l = \frac{1}{\lambda}\Big(g_l - U_l^\top (\lambda I + \tilde U_l \tilde U_l^\top)^{-1}
                 \tilde U_l \tilde g_l\Big)

where ``Ũ_l``, ``g̃_l`` keep a random subset of coordinates rescaled so that ``Ũ Ũᵀ`` and
``Ũ g̃`` are unbiased for ``U Uᵀ`` and ``U g``. Without a sketch this is exactly
``(λI + U_lᵀU_l)⁻¹ g_l``. The per-example gradients take one of three forms
(:mod:`precond.methods.per_example`):

* no weight sharing (Linear on ``[N, d]``): ``J_n = g_n ã_nᵀ``, exact rank-one factors; the
  sketch samples ``sketch_size`` rows of each factor when a dimension exceeds it;
* weight sharing with ``P_l ≤ lowrank_threshold`` (the paper's "reasonable dimension"):
  explicit ``J_n``; the sketch samples ``sketch_size²`` coordinates (so that the sketched Gram
  costs about what the factored one does);
* weight sharing with ``P_l > lowrank_threshold``: ``J_n = G_n A_nᵀ`` over the ``S``
  positions, truncated to rank ``truncated_rank`` through the SVD of ``G_n``, then row-sketched
  like the rank-one case;

embeddings keep their per-example gradients as (example, token) pairs (the sketch samples
coordinates of the batch's tokens). ``subsample_size``
builds ``U`` from a random subset of the batch (rescaled by ``√(N/m)``).

**Layers SENG does not precondition.** A layer with fewer than ``min_layer_size`` trained
parameters, or whose damped Gram matrix cannot be factorised, gets no Woodbury solve. Leaving
its plain gradient would mix step scales: preconditioned layers move by about ``g/λ`` outside
the span of their per-example gradients, so a plain-gradient layer would move ``λ`` times less
(or, with the reference implementation's ``g/(1+λ)``, by an unrelated amount). Instead it takes
the step that the same damped empirical-Fisher model would choose along its own gradient,

.. math::

    \Delta W_l = \alpha_l g_l, \qquad
    \alpha_l = \frac{\|g_l\|^2}{g_l^\top (U_l^\top U_l + \lambda I) g_l}
             = \frac{\|g_l\|^2}{\|U_l g_l\|^2 + \lambda \|g_l\|^2},

the exact minimiser of ``½ dᵀ(F_l + λI)d − g_lᵀd`` over ``d = α g_l``. It lies between the
smallest and largest eigenvalues of ``(F_l + λI)⁻¹`` (``1/λ`` when the layer has no curvature,
like the complement of a preconditioned layer) and costs one product with ``U_l``. ``α_l`` is
computed on refresh steps from that step's gradient and kept until the next refresh. A layer
the curvature batch did not reach has ``F_l = 0`` and gets ``g/λ``.

Costs per layer on curvature steps: ``O(M² (d_out + d_in'))`` for rank-one factors (the
sketch caps each dimension at ``sketch_size``), ``O(M² sketch_size²)`` for sketched explicit
gradients, plus the truncation's batched ``eigh``; one batched ``M × M`` Cholesky over all
layers per refresh; ``O(M P_l)`` per step (``O(M P_l r)`` in the low-rank regime).
``damping`` must be positive and ``ema_decay`` 0. With ``damping_scale="gram"`` each layer's
damping is relative, ``λ_l = damping · tr(Ũ_l Ũ_lᵀ)/M`` (the mean squared norm of its
per-example gradients), fixed at each refresh.

References:
    M. Yang, D. Xu, Z. Wen, M. Chen, P. Xu. Sketch-Based Empirical Natural Gradient Methods for
    Deep Learning. Journal of Scientific Computing 92, 2022. https://arxiv.org/abs/2006.05924
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..capture import Layer, LayerStats, stat_dtype
from ..config import PreconditioningConfig
from ..enums import CurvatureType
from ..linalg.solvers import cholesky_ex, gram_diagonal
from ..numerics import finite_flags, is_finite, warn_once
from ..registry import register_method
from ..validation import check_int
from .base import PreconditionedGradientMaker
from .cost import CostModel, Phase, add_patches
from .kfac import grad_parts, layer_has_grad, write_preconditioned
from .natural_gradient import positions
from .per_example import (
    DenseRows,
    FactorRows,
    Rows,
    compact_one_hot,
    example_factors,
    load_rows,
    rows_from_stats,
    truncated_factors,
)
from .smw_ng import (
    block_widths,
    check_gram_config,
    gram_damping,
    rows_cost,
    smw_apply,
    smw_apply_in_place,
    width_in,
)

__all__ = ["SengConfig", "SengGradientMaker"]

_EMP = CurvatureType.FISHER_EMP


@dataclass(kw_only=True)
class SengConfig(PreconditioningConfig):
    """SENG options (``damping > 0`` and ``ema_decay = 0`` required).

    Args:
        subsample_size: Examples of the batch used for the curvature (``None``: all).
        sketch_size: Rows kept per factor (factored forms) or ``sketch_size²`` coordinates
            (explicit per-example gradients) in the sketched Gram matrix; ``None``: no sketch.
        truncated_rank: Rank of the per-example factors of large weight-sharing layers.
        lowrank_threshold: Weight-sharing layers with more parameters than this use truncated
            low-rank factors instead of explicit per-example gradients.
        min_layer_size: Layers with fewer trained parameters are not preconditioned; they take
            the scaled step ``α_l g_l`` of the module docstring.
        damping_scale: ``"absolute"``: ``λ = damping`` for every layer; ``"gram"``: per layer
            ``λ_l = damping · tr(Ũ_l Ũ_lᵀ)/M`` (the mean squared norm of its per-example
            gradients, sketched like its Gram matrix), fixed at each refresh.
    """

    subsample_size: int | None = None
    sketch_size: int | None = 256
    truncated_rank: int = 16
    lowrank_threshold: int = 100_000
    min_layer_size: int = 0
    damping_scale: str = "absolute"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_gram_config(self, "SENG")
        if self.subsample_size is not None:
            check_int("subsample_size", self.subsample_size, minimum=1)
        if self.sketch_size is not None:
            check_int("sketch_size", self.sketch_size, minimum=1)
        check_int("truncated_rank", self.truncated_rank, minimum=1)
        check_int("lowrank_threshold", self.lowrank_threshold, minimum=0)
        check_int("min_layer_size", self.min_layer_size, minimum=0)


@register_method(
    "seng", "SENG: sketched empirical natural gradient per layer via SMW (Yang et al. 2022)"
)
class SengGradientMaker(PreconditionedGradientMaker):
    """SENG gradient maker (see the module docstring for the update, sketch and scaling rule).

    Args:
        model: The model.
        config: :class:`SengConfig`.
    """

    config_class = SengConfig
    config: SengConfig

    def __init__(self, model: torch.nn.Module, config: SengConfig | None = None) -> None:
        super().__init__(model, config)
        self.scaled_layers = {
            layer.name for layer in self.layers if layer.numel < self.config.min_layer_size
        }
        self.rows: dict[str, Rows] = {}
        self.chol: dict[str, Tensor] = {}
        self.alpha: dict[str, Tensor] = {}
        self._pending: dict[str, tuple[Rows, Tensor | None]] | None = None
        self._positions: dict[str, int] = {}
        #: Per layer ``λ_l`` of the installed preconditioner (``damping_scale="gram"``).
        self.lam: dict[str, float] = {}

    def _curvature_tags(self) -> list[CurvatureType]:
        return [_EMP]

    # ---- curvature --------------------------------------------------------------------------
    def update_curvature(self, stats: Mapping[str, LayerStats]) -> None:  # noqa: D102
        live = {n: st for n, st in stats.items() if st.num_calls > 0}
        if not live:
            return
        examples, scale = self._subsample(next(iter(live.values())).batch_size)
        pending: dict[str, tuple[Rows, Tensor | None]] = {}
        for layer in self.layers:
            st = live.get(layer.name)
            if st is None:
                continue
            self._positions[layer.name] = positions(st)
            rows = self._layer_rows(layer, st, examples, scale)
            if rows is None:
                self._warn(layer, "the truncated SVD of its per-example gradients failed")
                continue
            if layer.name in self.scaled_layers:
                pending[layer.name] = (rows, None)
                continue
            if self.config.sketch_size is not None:
                size = self.config.sketch_size
                rows.sketch(size if isinstance(rows, FactorRows) else size * size, self.generator)
            pending[layer.name] = (rows, rows.gram())
        grams = [(n, g) for n, (_, g) in pending.items() if g is not None]
        if grams:
            # one host sync; a Gram matrix is finite exactly when its diagonal is
            finite = finite_flags([gram_diagonal(g) for _, g in grams])
            for (name, _), ok in zip(grams, finite):
                if not ok:
                    del pending[name]
                    self._warn(self._layer(name), "its per-example gradients are not finite")
        self._pending = pending

    def _subsample(self, n: int) -> tuple[Tensor | None, float]:
        m = self.config.subsample_size
        if m is None or m >= n:
            return None, 1.0
        gen = self.generator
        idx = torch.randperm(n, generator=gen, device=gen.device)[:m].sort().values
        return idx.to(self._device()), (n / m) ** 0.5

    def _layer_rows(
        self, layer: Layer, st: LayerStats, examples: Tensor | None, scale: float
    ) -> Rows | None:
        explicit = layer.numel <= self.config.lowrank_threshold
        if compact_one_hot(st) or explicit or self._positions[layer.name] == 1:
            return rows_from_stats(st, _EMP.value, examples, scale)
        a, g = example_factors(st, _EMP.value, examples)
        return truncated_factors(a, g * scale, self.config.truncated_rank)

    def _layer(self, name: str) -> Layer:
        return next(layer for layer in self.layers if layer.name == name)

    def _warn(self, layer: Layer, why: str) -> None:
        warn_once(
            f"seng:{why}:{layer.name}",
            f"SENG: layer {layer.label} keeps its previous preconditioner ({why}).",
        )

    # ---- preconditioner ---------------------------------------------------------------------
    def update_preconditioner(self) -> None:  # noqa: D102
        if self._pending is not None:
            self._commit()
        for layer in self.layers:
            rows = self.rows.get(layer.name)
            if rows is None or layer.name in self.chol:
                continue
            if self._gram_scaled:
                self.lam[layer.name] = gram_damping(self.damping, rows.gram())
            lam = self._lam(layer.name)
            v = layer.grads_matrix()
            v = v.to(stat_dtype(v.dtype))
            gg = v.square().sum()
            quad = rows.dot(v, sketched=False).square().sum() + lam * gg
            self.alpha[layer.name] = torch.where(
                gg > 0, gg / quad.clamp(min=torch.finfo(v.dtype).tiny), 1.0 / lam
            )

    def _commit(self) -> None:
        """Factorise the pending Gram matrices (one batched Cholesky) and install the rows."""
        assert self._pending is not None
        grams = {n: g for n, (_, g) in self._pending.items() if g is not None}
        pending = {n: (rows, g is not None) for n, (rows, g) in self._pending.items()}
        self._pending = None
        names = list(grams)
        factors: dict[str, Tensor] = {}
        new_lam: dict[str, float] = {}
        if names:
            stacked = torch.stack([grams[n] for n in names])
            grams.clear()  # the stacked copy is the only one left
            damping: float | Tensor = self.damping  # λI + UUᵀ
            if self._gram_scaled:
                lams = [gram_damping(self.damping, g) for g in stacked.unbind(0)]
                new_lam.update(zip(names, lams))
                damping = torch.tensor(lams, dtype=stacked.dtype, device=stacked.device)  # λ_l
            # factorised in its damped copy (at a padded order where faster, see damped_buffer)
            chol, info = cholesky_ex(stacked, damping)
            del stacked
            # The Gram matrices are finite (checked on the curvature step), so a factor with a
            # finite diagonal is finite: row i of L has Σ_k L_ik² = (λI + UUᵀ)_ii.
            ok = (info == 0) & is_finite(chol.diagonal(dim1=-2, dim2=-1)).all(-1)
            for i, (name, good) in enumerate(zip(names, ok.tolist())):
                if good:
                    factors[name] = chol[i]
        for name, (rows, factorised) in pending.items():
            if name in factors:
                self.rows[name], self.chol[name] = rows, factors[name]
                widths = block_widths(self._layer(name))
                if isinstance(rows, FactorRows) and widths is not None:
                    rows.prepare(widths)  # sketched factors and columns, off the apply path
                self.alpha.pop(name, None)
                if name in new_lam:
                    self.lam[name] = new_lam[name]
            elif not factorised:
                self.rows[name] = rows
                self.chol.pop(name, None)
            elif name not in self.chol:
                # No factorisation now nor before: the scaled-gradient rule instead.
                self.rows[name] = rows
                self._warn(self._layer(name), "its damped Gram matrix is not positive definite")
            else:
                self._warn(self._layer(name), "its damped Gram matrix is not positive definite")

    def precondition(self) -> None:  # noqa: D102
        if not (self.rows or self.chol):
            return
        solves: list[tuple[Rows, list[Tensor], Tensor, float]] = []
        for layer in self.layers:
            if not layer_has_grad(layer):
                continue
            name = layer.name
            lam = self._lam(name)
            rows = self.rows.get(name)
            parts = grad_parts(layer, None if rows is None else rows.dtype)
            if parts is not None:
                if name in self.chol:
                    assert rows is not None
                    solves.append((rows, parts, self.chol[name], lam))
                elif name in self.alpha:
                    torch._foreach_mul_(parts, self.alpha[name].to(parts[0].dtype))
                else:
                    torch._foreach_div_(parts, lam)  # not reached by the curvature batch
                continue
            v = layer.grads_matrix()
            v = v.to(stat_dtype(v.dtype))
            if name in self.chol:
                out = smw_apply(self.rows[name], self.chol[name], lam, v)
            elif name in self.alpha:
                out = v * self.alpha[name].to(v.dtype)
            else:
                out = v / lam  # the curvature batch did not reach this layer: F_l = 0
            write_preconditioned(layer, out)
        if solves:
            self._solve_all(solves)

    @property
    def _gram_scaled(self) -> bool:
        return self.config.damping_scale == "gram"

    def _lam(self, name: str) -> float:
        """``λ_l`` of a layer (the configured damping unless it is relative to the Gram)."""
        if self._gram_scaled:
            return self.lam.get(name, self.damping)
        return self.damping

    def _solve_all(self, solves: list[tuple[Rows, list[Tensor], Tensor, float]]) -> None:
        """The Woodbury solves of the in-place layers, their ``M × M`` systems batched.

        Layers whose Gram matrices have the same size (one curvature batch) share one pair of
        batched triangular solves instead of a pair each.
        """
        factors = [chol for _, _, chol, _ in solves]
        same = all(f.shape == factors[0].shape and f.dtype == factors[0].dtype for f in factors)
        if len(solves) == 1 or not same:
            for rows, parts, chol, lam in solves:
                smw_apply_in_place(rows, chol, lam, parts)
            return
        stack = _batched_view(factors)
        if stack is None:
            stack = torch.stack(factors)
        u = torch.stack([rows.dot_parts(parts).to(stack.dtype) for rows, parts, _, _ in solves])
        x = torch.linalg.solve_triangular(stack, u.unsqueeze(-1), upper=False)
        x = torch.linalg.solve_triangular(stack.mT, x, upper=True).squeeze(-1)
        for (rows, parts, _, lam), xi in zip(solves, x.unbind(0)):
            rows.combine_into(xi, parts, alpha=-1.0 / lam, beta=1.0 / lam)

    # ---- state and cost ---------------------------------------------------------------------
    def preconditioner_state_dict(self) -> dict[str, Any]:  # noqa: D102
        pending = None
        if self._pending is not None:
            pending = {n: (r.state_dict(), g) for n, (r, g) in self._pending.items()}
        return {
            "rows": {n: r.state_dict() for n, r in self.rows.items()},
            "chol": dict(self.chol),
            "alpha": dict(self.alpha),
            "pending": pending,
            "lam": dict(self.lam),
        }

    def load_preconditioner_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        self.rows = {n: load_rows(r) for n, r in state["rows"].items()}
        self.chol = dict(state["chol"])
        self.alpha = dict(state["alpha"])
        self.lam = dict(state.get("lam", {}))
        pending = state["pending"]
        self._pending = (
            None if pending is None else {n: (load_rows(r), g) for n, (r, g) in pending.items()}
        )

    def cost_model(self) -> CostModel:
        """Unavoidable kernels at the shapes of the last curvature step."""
        cm = CostModel()
        factorised = 0
        m = 0
        pending = workspace = 0
        for layer in self.layers:
            rows = self.rows.get(layer.name)
            if rows is None:
                continue
            groups, d_out, _ = layer.shape
            s = self._positions.get(layer.name, 1)
            if layer.name not in self.chol:
                cm.add(Phase.REFRESH, "matmul", (rows.m, layer.numel, 1))
                cm.add(Phase.APPLY, "elementwise", (layer.numel,))
                cm.state_numel += rows.m * layer.numel
                pending += rows.m * layer.numel
                continue
            m = rows.m
            factorised += 1
            if isinstance(rows, FactorRows) and s > 1:
                cm.add(Phase.CURVATURE, "eigh", (m * groups, min(d_out, s)))
            if isinstance(rows, DenseRows):
                add_patches(cm, layer, m, s)  # the per-example Jacobians' patches
            numel, ws = rows_cost(cm, rows, layer.shape, s, width_in(layer))
            cm.add(Phase.APPLY, "matmul", (m, m, 1))
            cm.state_numel += m * m
            # new rows and Gram matrix beside the stored ones until the refresh factorises them,
            # then the new Cholesky factor beside the Gram matrix and the stored factor (kept
            # if the new one fails)
            pending, workspace = pending + numel + 2 * m * m, max(workspace, ws)
        if factorised:
            cm.add(Phase.REFRESH, "cholesky", (factorised, m))
        cm.transient_numel = pending + workspace
        return cm


def _batched_view(factors: list[Tensor]) -> Tensor | None:
    """``torch.stack(factors)`` as a view when they are consecutive matrices of one buffer.

    The refresh factorises every layer's Gram matrix in one batched Cholesky and stores views
    of its result, so the factors are usually consecutive in one tensor already.
    """
    first = factors[0]
    ptr, offset, step = first.untyped_storage().data_ptr(), first.storage_offset(), first.numel()
    for i, f in enumerate(factors):
        if (
            f.stride() != first.stride()
            or f.untyped_storage().data_ptr() != ptr
            or f.storage_offset() != offset + i * step
        ):
            return None
    return first.as_strided((len(factors), *first.shape), (step, *first.stride()))
