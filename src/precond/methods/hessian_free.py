r"""Hessian-free optimisation: truncated conjugate gradient on the damped GGN (Martens 2010).

On curvature steps conjugate gradient solves

.. math::

    (C + λ I)\, x = g, \qquad C = G \text{ (GGN, default) or } H \text{ (Hessian)},

with matrix-free products on the current batch (``cg_max_iters`` products at most, stopping at
a relative residual ``cg_tol``), started from ``warm_start_decay · x_prev`` (Martens' ζ; 0 starts
from zero). The solution is what ``p.grad`` receives, so SGD with learning rate 1 takes the HF
step ``θ ← θ − x``. CG stops early at directions of non-positive curvature (possible with the
Hessian); a solution that is not a descent direction (``gᵀx ≤ 0``) or not finite is rejected and
the previous one kept.

Damping (``adapt_damping=True``): Levenberg-Marquardt as in Martens §4.1: the reduction ratio
``ρ`` of the loss change to the change predicted by the undamped quadratic model
``−c gᵀx + c²/2 xᵀCx`` (``c`` the step length actually taken along ``−x``) multiplies ``λ`` by
``damping_growth`` (3/2) when ``ρ < 1/4`` and divides it when ``ρ > 3/4``. Martens evaluates the
new loss on the same mini-batch right away; here it is the loss of the next curvature step (see
:class:`~precond.methods.second_order.DampingAdapter`), exact for full-batch training with SGD
and ``curvature_upd_interval=1``, a heuristic otherwise. ``damping`` is the initial ``λ``.

Amortisation ("stored inverse action"): the solve ``x = (C + λI)^{-1} g`` is an exact curvature
pair, from which :class:`~precond.methods.second_order.SecantInverse` builds a symmetric
positive definite operator ``M`` with ``M g = x`` (memoryless BFGS). Every step writes
``p.grad ← M p.grad``: on curvature steps that is exactly the CG solution; on the steps in
between, the fresh gradient is mapped through the curvature learned at the last solve (no
products, two inner products, no host sync).

Parameters frozen after construction: the solve is that of the loss as a function of the
trained parameters (zero gradient and zero curvature rows/columns in the frozen slots, the warm
start's frozen slots zeroed), so the solution is exactly zero there and the secant pair is a
curvature pair of that restricted problem; a frozen parameter receives no gradient. The
solution is recomputed at every curvature step, so there is no other per-parameter state.

Not implemented from the paper: CG backtracking, the line search on the HF step and
structural damping.

References:
    J. Martens. Deep learning via Hessian-free optimization. ICML 2010.
    https://www.cs.toronto.edu/~jmartens/docs/Deep_HessianFree.pdf

    N. Schraudolph. Fast curvature matrix-vector products for second-order gradient descent.
    Neural Computation 14(7), 2002 (the GGN).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import LayerStats
from ..config import PreconditioningConfig
from ..enums import CurvatureType
from ..numerics import warn_once
from ..registry import register_method
from ..validation import check_float, check_int, invalid
from .cost import CostModel, Phase
from .secant_solver import SecantSolverGradientMaker
from .second_order import (
    DampingAdapter,
    SecantInverse,
    coerce_curvature,
)

__all__ = ["HessianFreeConfig", "HessianFreeGradientMaker"]


@dataclass(kw_only=True)
class HessianFreeConfig(PreconditioningConfig):
    """Hessian-free options.

    Args:
        curvature: ``ggn`` (default; positive semi-definite) or ``hessian``.
        cg_max_iters: Conjugate-gradient iterations (curvature products) per curvature step.
        cg_tol: Relative residual ``‖r‖ ≤ cg_tol · ‖g‖`` at which CG stops (0: run all).
        warm_start_decay: CG starts from this multiple of the previous solution (0: from 0).
        adapt_damping: Levenberg-Marquardt adaptation of the damping (``damping`` is the start).
        damping_growth: Factor by which the adaptation raises or lowers the damping.
    """

    curvature: CurvatureType | str = CurvatureType.GGN
    cg_max_iters: int = 50
    cg_tol: float = 1e-4
    warm_start_decay: float = 0.95
    adapt_damping: bool = True
    damping_growth: float = 1.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.curvature = coerce_curvature(self.curvature)
        check_int("cg_max_iters", self.cg_max_iters, minimum=1)
        check_float("cg_tol", self.cg_tol, minimum=0.0, maximum=1.0, strict_max=True)
        check_float("warm_start_decay", self.warm_start_decay, minimum=0.0, maximum=1.0)
        if not isinstance(self.adapt_damping, bool):
            raise invalid("adapt_damping", self.adapt_damping, "Must be True or False")
        check_float("damping_growth", self.damping_growth, minimum=1.0, strict_min=True)
        if self.adapt_damping and self.damping <= 0.0:
            raise invalid(
                "damping",
                self.damping,
                "adapt_damping=True scales the damping multiplicatively; start it > 0",
            )


@register_method(
    "hessian_free",
    "Hessian-free: truncated CG on the damped GGN or Hessian, warm-started (Martens 2010)",
    family="fisher",
)
class HessianFreeGradientMaker(SecantSolverGradientMaker):
    """Hessian-free gradient maker (see the module docstring for the update and amortisation).

    Args:
        model: The model.
        config: :class:`HessianFreeConfig`.
    """

    config_class = HessianFreeConfig
    config: HessianFreeConfig
    # CG assumes an exact symmetric operator: low-precision products (autocast) put noise into
    # the null space of the GGN, which a damping adapted towards 0 lets grow without bound
    full_precision_curvature = True

    def __init__(self, model: nn.Module, config: HessianFreeConfig | None = None) -> None:
        super().__init__(model, config)
        self.lm = DampingAdapter(
            self.config.effective_damping, 0.25, 0.75, self.config.damping_growth
        )
        #: CG iterations of the last solve (diagnostics).
        self.last_cg_iters = 0

    def _hessian_products(self) -> bool:
        return self.config.curvature is CurvatureType.HESSIAN

    @property
    def damping(self) -> float:
        """The current damping ``λ`` (adapted when ``adapt_damping``)."""
        return self.lm.damping if self.config.adapt_damping else self.config.effective_damping

    def _buffers(self) -> tuple[Tensor, Tensor]:
        """CG's work rows ``[3, P]`` and a ``[2, P]`` pair not held by the state."""
        if self._work is None:
            self._work = self.vec.empty(3, dtype=self.work_dtype)
        return self._work, self._pairs.take(self._latest, self.inverse.pair)

    def solve(self, g: Tensor, max_iters: int, out: Tensor | None = None) -> tuple[Tensor, int]:
        """Run CG on ``(C + λ I) x = g`` with this batch's products (curvature steps only).

        The iteration of :func:`precond.linalg.solvers.cg`, on reused buffers and updated in
        place; it synchronises once per iteration (stopping tests), as that one does.

        Args:
            g: Right-hand side (flat).
            max_iters: Iteration cap.
            out: Vector receiving ``x`` (default: a new one).

        Returns:
            ``(x, iterations)``.
        """
        batch = self.batch
        assert batch is not None, "solve() needs the products of a curvature step"
        kind = CurvatureType(self.config.curvature)
        lam = self.damping
        if self._work is None:
            self._work = self.vec.empty(3, dtype=self.work_dtype)
        r, d, ad = self._work
        x = torch.empty_like(g) if out is None else out

        def matvec(v: Tensor, dst: Tensor) -> None:
            batch.product(kind, v, out=dst)
            dst.add_(v, alpha=lam)

        warm = self.solution is not None and self.config.warm_start_decay > 0.0
        if warm:
            assert self.solution is not None
            torch.mul(self.solution, self.config.warm_start_decay, out=x)
            mask = self.vec.mask()
            if mask is not None:
                x.masked_fill_(~mask, 0.0)
            matvec(x, ad)
            torch.sub(g, ad, out=r)
        else:
            x.zero_()
            r.copy_(g)
        d.copy_(r)
        rs = float(r.dot(r))
        target = (self.config.cg_tol * float(g.norm())) ** 2
        for it in range(1, max_iters + 1):
            if rs <= target:
                return x, it - 1
            matvec(d, ad)
            curv = float(d.dot(ad))
            if not curv > 0.0:  # negative curvature: A is not PD along d; stop
                return x, it - 1
            alpha = rs / curv
            x.add_(d, alpha=alpha)
            r.add_(ad, alpha=-alpha)
            rs_new = float(r.dot(r))
            torch.add(r, d, alpha=rs_new / rs, out=d)
            rs = rs_new
        return x, max_iters

    def update_curvature(self, stats: Mapping[str, LayerStats]) -> None:  # noqa: D102
        batch = self.batch
        if batch is None:
            return
        loss = self._curvature_loss if self.config.adapt_damping else None
        if self.config.adapt_damping and loss is not None and self.solution is not None:
            self.lm.observe(loss, self.vec.dot_params(self.solution))
        work, pair = self._buffers()
        x, g = pair[0], pair[1]
        batch.gradient(self.work_dtype, out=g)
        _, self.last_cg_iters = self.solve(g, self.config.cg_max_iters, out=x)
        gx = SecantInverse.curvature(x, g)
        if gx is None:
            warn_once(
                "hessian_free:solve",
                "Hessian-free: the CG solution is not finite or not a descent direction "
                "(g·x ≤ 0); keeping the previous solution (plain gradient if there is none).",
            )
            self.lm.record = None
            return
        self._accept(pair, gx)
        if self.config.adapt_damping and loss is not None:
            cx = batch.product(CurvatureType(self.config.curvature), x, out=work[2])
            ucu, uu = torch.stack([x.dot(cx), x.dot(x)]).tolist()  # one host sync
            self.lm.remember(loss, gu=gx, ucu=ucu, uu=uu, theta_u=self.vec.dot_params(x))

    def preconditioner_state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            **self._secant_state(),
            "lm": self.lm.state_dict(),
        }

    def load_preconditioner_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        self._load_secant_state(state)
        self.lm.load_state_dict(state["lm"])

    def cost_model(self) -> CostModel:
        """CG products per curvature step (as run) and the secant operator applied every step.

        Products are declared by ``add_products`` (a GGN product: two first-order passes and
        their weight contractions; a Hessian product: one double back-propagation).
        """
        cm = CostModel()
        extra = int(self.config.warm_start_decay > 0.0)  # residual of the warm start
        extra += int(self.config.adapt_damping)  # xᵀCx for the quadratic model
        # CG stops at its tolerance, mostly well before the cap: the products counted are
        # those the solves actually computed (mean per curvature step so far; the cap before
        # the first solve).
        products = self.mean_products(self.config.cg_max_iters + extra)
        self.add_products(cm, products, CurvatureType(self.config.curvature))
        iters = min(max(products - extra, 0), self.config.cg_max_iters)
        p = self.vec.numel
        # Per CG iteration, fused at best: Ad += λd with dᵀAd, x and r updated with rᵀr, then
        # d = r + βd: 8P elements read and 4P written, an elementwise pass over 6P.
        if iters:
            cm.add(Phase.CURVATURE, "elementwise", (6 * p,), count=iters)
        # Apply M = γI + W K Wᵀ: Wᵀg reads (s, y, g), γg + W(K Wᵀg) reads them and writes g:
        # 7P elements of traffic, an elementwise pass over 3.5P.
        cm.add(Phase.APPLY, "elementwise", (7 * p // 2,))
        # The pair (s, y); a new pair is solved while the old one is kept (in case of failure).
        cm.state_numel = 2 * p
        # CG's r, d, Ad, the new pair, the graph of the products, and the part of a product's
        # output that autograd allocates before it is copied into Ad (GGN products through
        # the graph contract the affine layers' weight gradients straight into Ad).
        cm.transient_numel = 5 * p + self.product_copy_numel + self.graph_numel
        return cm
