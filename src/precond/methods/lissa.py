r"""LiSSA: the inverse Hessian-vector product by a stochastic Neumann series (Agarwal et al.).

On curvature steps the damped inverse ``(C + λI)^{-1} g`` (``C`` the GGN by default, or the
Hessian) is estimated by the recursion

.. math::

    X_0 = g,\qquad X_j = g + (I - s\,(C_j + λ I))\, X_{j-1}\quad (j = 1..J),\qquad
    x = \frac{s}{S} \sum_{i=1}^{S} X_J^{(i)},

which for a fixed ``C`` is the truncated Neumann series ``s Σ_{k≤J} (I − sA)^k g`` of
``A^{-1} g`` (``A = C + λI``), convergent when ``0 < s λ_max(A) < 2`` and ``A ≻ 0``; its error
along an eigenvector with eigenvalue ``μ`` is ``(1 − sμ)^{J+1}/μ``. Knobs: ``depth`` ``J``
(products per repetition), ``num_repetitions`` ``S``, ``scale`` ``s`` (``None``: ``1/μ̂`` with
``μ̂`` from ``power_iters`` power iterations on ``A`` from a random-sign start, a safe choice
since power iteration never overestimates ``λ_max``), and ``sample_fraction``: each product
``C_j`` uses a fresh random subset of that fraction of the loss terms (rows of the logits,
re-weighted to keep the expectation), which is LiSSA's stochastic Hessian estimate; with
``sample_fraction=1`` every product is the batch curvature and repetitions would coincide, so
``num_repetitions > 1`` needs ``sample_fraction < 1``. Sampling draws from the gradient maker's
generator.

The Hessian of a network may be indefinite, where the series diverges (which is why the default
curvature is the positive semi-definite GGN; the paper's Hessian suits convex losses). For
``0 ⪯ sA ⪯ 2I`` every term has norm at most ``‖g‖``, so ``‖X_J‖ > (J+1)‖g‖`` proves divergence:
such an estimate, or one that is not finite or not a descent direction (``gᵀx ≤ 0``), is
rejected and the previous one kept (warn once).

Amortisation: as in Hessian-free, the estimate ``x`` and its right-hand side ``g`` define the
stored inverse action :class:`~precond.methods.second_order.SecantInverse` (``M g = x``),
applied to ``p.grad`` on every step; curvature steps write exactly the LiSSA estimate.

Parameters frozen after construction: the recursion and the power iteration run on the loss as
a function of the trained parameters (zero gradient, zero curvature rows/columns and zero
power-iteration start in the frozen slots), so the estimate is exactly zero there; a frozen
parameter receives no gradient.

References:
    N. Agarwal, B. Bullins, E. Hazan. Second-Order Stochastic Optimization for Machine Learning
    in Linear Time. JMLR 18(116), 2017. https://arxiv.org/abs/1602.03943
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
from .probes import rademacher_like
from .secant_solver import SecantSolverGradientMaker
from .second_order import (
    BatchCurvature,
    SecantInverse,
    coerce_curvature,
)

__all__ = ["LissaConfig", "LissaGradientMaker"]


#: The power iteration rescales its iterate when the norm falls below this or exceeds its
#: inverse (unnormalised iterates grow or shrink by about ``λ_max`` per iteration).
_RESCALE_BELOW = 1e-12


@dataclass(kw_only=True)
class LissaConfig(PreconditioningConfig):
    """LiSSA options.

    Args:
        curvature: ``ggn`` (default; positive semi-definite) or ``hessian`` (the paper's, for
            convex losses; the series diverges along negative curvature).
        depth: Recursion steps ``J`` (curvature products) per repetition.
        num_repetitions: Independent recursions ``S`` averaged (needs ``sample_fraction < 1``).
        scale: Step ``s`` of the recursion, or ``None`` to estimate ``1/λ_max`` per curvature step.
        power_iters: Power iterations of the automatic scale (products per curvature step).
        sample_fraction: Fraction of the loss terms (logit rows) in each curvature sample.
    """

    curvature: CurvatureType | str = CurvatureType.GGN
    depth: int = 20
    num_repetitions: int = 1
    scale: float | None = None
    power_iters: int = 10
    sample_fraction: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.curvature = coerce_curvature(self.curvature)
        check_int("depth", self.depth, minimum=1)
        check_int("num_repetitions", self.num_repetitions, minimum=1)
        if self.scale is not None:
            check_float("scale", self.scale, minimum=0.0, strict_min=True)
        check_int("power_iters", self.power_iters, minimum=1)
        check_float(
            "sample_fraction", self.sample_fraction, minimum=0.0, maximum=1.0, strict_min=True
        )
        if self.num_repetitions > 1 and self.sample_fraction == 1.0:
            raise invalid(
                "num_repetitions",
                self.num_repetitions,
                "Repetitions differ only with sampled curvature; set sample_fraction < 1",
            )


@register_method(
    "lissa",
    "LiSSA: stochastic Neumann-series inverse-HVP, damped (Agarwal, Bullins & Hazan 2017)",
    family="fisher",
)
class LissaGradientMaker(SecantSolverGradientMaker):
    """LiSSA gradient maker (see the module docstring for the recursion and amortisation).

    Args:
        model: The model.
        config: :class:`LissaConfig`.
    """

    config_class = LissaConfig
    config: LissaConfig

    def __init__(self, model: nn.Module, config: LissaConfig | None = None) -> None:
        super().__init__(model, config)
        #: The scale ``s`` used by the last estimate.
        self.last_scale = 0.0
        #: Whether the last recursion exceeded the norm bound of a convergent series.
        self.diverged = False

    def _hessian_products(self) -> bool:
        return self.config.curvature is CurvatureType.HESSIAN and self.config.sample_fraction >= 1

    def _rows(self) -> Tensor:
        if self._work is None:
            self._work = self.vec.empty(2, dtype=self.work_dtype)
        return self._work

    def _weights(self, batch: BatchCurvature) -> Tensor | None:
        fraction = self.config.sample_fraction
        if fraction >= 1.0:
            return None
        rows = batch.rows()
        k = max(1, round(fraction * rows))
        gen = self.generator
        idx = torch.randperm(rows, generator=gen, device=gen.device)[:k]
        w = torch.zeros(rows, dtype=self.work_dtype, device=gen.device)
        w[idx] = rows / k
        return w.to(self.vec.params[0].device)

    def _matvec(self, batch: BatchCurvature, v: Tensor, out: Tensor) -> Tensor:
        """``out ← (C_j + λI) v`` with a fresh curvature sample ``C_j``."""
        kind = CurvatureType(self.config.curvature)
        batch.product(kind, v, self._weights(batch), out=out)
        return out.add_(v, alpha=self.damping)

    def estimate_scale(self, batch: BatchCurvature, g: Tensor) -> float:
        """``1/μ̂``, ``μ̂`` the largest ``‖A v‖`` of power iterations on ``A = C + λI`` (syncs).

        With sampled curvature every iteration draws a fresh sample, and the maximum over the
        iterations covers the samples' larger spectra. Returns 0 if the products are not finite.
        """
        work = self._rows()
        a, b = work[0], work[1]
        gen = self.generator
        # The start is a vector of random signs: it meets the top eigenvector as a Gaussian
        # start would (the draw is independent of A), for a tenth of the cost on a CPU (670k
        # entries: 0.14 ms against 1.6 ms for normal_, ~4% of a curvature step of the mlp512
        # benchmark at B = 32).
        ref = a if gen.device == a.device else torch.empty_like(a, device=gen.device)
        a.copy_(rademacher_like([ref], gen)[0])
        mask = self.vec.mask()
        if mask is not None:
            a.masked_fill_(~mask, 0.0)
        mu = 0.0
        # The iterates are not normalised: A is linear, so ‖A v‖/‖v‖ is the normalised
        # iteration's estimate, and ‖A v‖ is the next iterate's norm (a pass over v saved per
        # iteration). They are rescaled only when their norm leaves [1e-12, 1e12].
        n = float(a.norm())
        for _ in range(self.config.power_iters):
            self._matvec(batch, a, out=b)
            norm = float(b.norm())
            if not 0.0 < norm < float("inf"):
                return 0.0
            mu = max(mu, norm / n)
            a, b, n = b, a, norm
            if not _RESCALE_BELOW < n < 1.0 / _RESCALE_BELOW:
                a.div_(n)
                n = 1.0
        return 1.0 / mu

    def estimate(self, batch: BatchCurvature, g: Tensor, out: Tensor | None = None) -> Tensor:
        """The LiSSA estimate of ``(C + λI)^{-1} g`` on this batch.

        Args:
            batch: The curvature step's products.
            g: Right-hand side (flat).
            out: Vector receiving the estimate (default: a new one).

        Returns:
            ``x`` (flat).
        """
        s = self.config.scale if self.config.scale is not None else self.estimate_scale(batch, g)
        self.last_scale = s
        reps = self.config.num_repetitions
        x = torch.empty_like(g) if out is None else out
        work = self._rows()
        ax, total = work[0], work[1]
        if reps > 1:
            total.zero_()
        self.diverged = False
        # For 0 ⪯ sA ⪯ 2I every term has norm ≤ ‖g‖, so ‖X_J‖ ≤ (J+1)‖g‖; more means the
        # series diverges (negative curvature or a scale too large for a sample).
        bound = (self.config.depth + 1) * float(g.norm()) * (1.0 + 1e-3)
        kind = CurvatureType(self.config.curvature)
        keep = 1.0 - s * self.damping
        for _ in range(reps):
            x.copy_(g)
            for _ in range(self.config.depth):
                # X_j = g + X_{j-1} − s (C_j + λI) X_{j-1} = g + (1 − sλ) X_{j-1} − s C_j X_{j-1}:
                # two passes over X (the damping folded into the first)
                batch.product(kind, x, self._weights(batch), out=ax)
                torch.add(g, x, alpha=keep, out=x).add_(ax, alpha=-s)
            self.diverged |= not float(x.norm()) <= bound
            if reps > 1:
                total.add_(x)
        if reps > 1:
            x.copy_(total)
        return x.mul_(s / reps)

    def update_curvature(self, stats: Mapping[str, LayerStats]) -> None:  # noqa: D102
        batch = self.batch
        if batch is None:
            return
        pair = self._pairs.take(self._latest, self.inverse.pair)
        x, g = pair[0], pair[1]
        batch.gradient(self.work_dtype, out=g)
        self.estimate(batch, g, out=x)
        sy = None
        if not self.diverged and self.last_scale > 0.0:
            sy = SecantInverse.curvature(x, g)
        if sy is None:
            warn_once(
                "lissa:estimate",
                "LiSSA: the Neumann estimate is not finite or not a descent direction (the "
                "series diverges: lower scale, raise damping or use curvature='ggn'); keeping "
                "the previous estimate (plain gradient if there is none).",
            )
            return
        self._accept(pair, sy)

    def preconditioner_state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            **self._secant_state(),
            "last_scale": self.last_scale,
        }

    def load_preconditioner_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        self._load_secant_state(state)
        self.last_scale = float(state["last_scale"])

    def cost_model(self) -> CostModel:
        """Recursion and power-iteration products per curvature step; the secant apply.

        Products are declared by ``add_products`` (see the Hessian-free cost model).
        """
        cm = CostModel()
        steps = self.config.depth * self.config.num_repetitions
        power = self.config.power_iters if self.config.scale is None else 0
        self.add_products(cm, steps + power, CurvatureType(self.config.curvature))
        if self.config.sample_fraction < 1.0 and self.config.curvature is CurvatureType.HESSIAN:
            # Each sampled Hessian product re-builds the gradient graph of its subset.
            cm.add(Phase.CURVATURE, "backward", (steps + power,))
        p = self.vec.numel
        # Per product, fused at best: X ← X + g − s(CX + λX) reads X, CX, g and writes X
        # (4P elements of traffic, an elementwise pass over 2P); a power iteration likewise
        # normalises v and adds λv to Cv.
        cm.add(Phase.CURVATURE, "elementwise", (2 * p,), count=steps + power)
        # Apply M = γI + W K Wᵀ (see Hessian-free): an elementwise pass over 3.5P.
        cm.add(Phase.APPLY, "elementwise", (7 * p // 2,))
        cm.state_numel = 2 * p  # the pair (s, y)
        # The work rows, the new pair, the graph of the products, and the part of a product's
        # output allocated by autograd before it is copied (see the Hessian-free cost model).
        cm.transient_numel = 4 * p + self.product_copy_numel + self.graph_numel
        return cm
