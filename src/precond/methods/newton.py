r"""Damped Newton with the full or layer-wise Hessian.

On curvature steps the Hessian ``H`` of the loss as written is built densely from
Hessian-vector products (one per parameter, batched through ``vmap`` where the model allows),
averaged with ``ema_decay``, and factorised on preconditioner steps; every step applies

.. math::

    p.\mathrm{grad} \leftarrow (H + δ I)^{-1} g
    \quad\text{or, block by block,}\quad (H_{ll} + δ_l I)^{-1} g_l

with ``hessian_shape="layer_wise"`` (``H_ll`` the diagonal block of the parameters of one
module). With a learning rate of 1, SGD then takes the damped Newton step.

The Hessian of a neural network is often indefinite, and ``(H + δI)^{-1} g`` is then not a
descent direction (or does not exist). Two rules keep the step safe:

* ``indefinite="shift"`` (default): Cholesky of ``H + δI``; if it fails the damping is raised to
  ``δ' = max(δ, ε) − λ_min(H)`` (``λ_min`` from ``eigvalsh``; ``ε = 10⁻⁷ max|λ|``), the
  smallest shift making the matrix positive definite with smallest eigenvalue ``max(δ, ε)``
  (the Levenberg-Marquardt / trust-region choice).
* ``indefinite="abs"``: the saddle-free Newton step ``Q (|Λ| + δ' I)^{-1} Qᵀ g`` from
  ``eigh(H) = Q Λ Qᵀ`` with ``δ' = max(δ, ε)`` (Dauphin et al. 2014), which moves away from
  saddle points instead of towards them.

Amortisation: intermediate steps run a plain backward pass and reuse the stored factorisation
(Cholesky factor or dense inverse) of the last refresh; no products, no factorisation.

Parameters frozen after construction: the dense Hessian keeps its fixed layout. While a
parameter is frozen it contributes a zero gradient block, its rows and columns of the running
average are neither updated nor dropped (only the trained × trained entries take the batch
Hessian; the kept entries are used again once it is un-frozen), and refreshes factorise the
average with those rows and columns zeroed, so that the step of the trained parameters is the
damped Newton step ``(H_AA + δI)^{-1} g_A`` of the loss as a function of them alone (``A`` the
trained coordinates). A factorisation made before a parameter was frozen is applied, until the
next refresh, with its zero gradient block (still a positive definite map on the others).

Cost: ``P`` Hessian-vector products per curvature step and a ``P × P`` matrix (``Σ d_l²`` for
layer-wise) in float64; models with more than ``max_params`` preconditioned parameters are
rejected at construction. Use ``hessian_free``, ``lissa`` or ``curveball`` for larger models.

References:
    Y. Dauphin, R. Pascanu, C. Gulcehre, K. Cho, S. Ganguli, Y. Bengio. Identifying and
    attacking the saddle point problem in high-dimensional non-convex optimization.
    NeurIPS 2014. https://arxiv.org/abs/1406.2572

    J. Nocedal, S. Wright. Numerical Optimization, 2nd ed., Springer 2006, §3.4 (Newton with
    Hessian modification).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import LayerStats
from ..config import PreconditioningConfig
from ..enums import Shape
from ..linalg.ema import ema_update
from ..linalg.solvers import add_diagonal, damped_cholesky
from ..numerics import warn_once
from ..registry import register_method
from ..validation import check_int, coerce_enum, invalid
from .cost import CostModel, Phase
from .second_order import SecondOrderGradientMaker

__all__ = ["IndefiniteRule", "NewtonConfig", "NewtonGradientMaker"]


class IndefiniteRule(str, Enum):
    """How Newton handles a Hessian that is not positive definite."""

    SHIFT = "shift"
    ABS = "abs"

    def __str__(self) -> str:
        return self.value


@dataclass(kw_only=True)
class NewtonConfig(PreconditioningConfig):
    """Newton options.

    Args:
        hessian_shape: ``full`` (default; one ``P × P`` matrix) or ``layer_wise`` (one dense
            block per module, cross-module curvature dropped).
        indefinite: ``shift`` (default; raise the damping until positive definite) or ``abs``
            (saddle-free: absolute eigenvalues).
        max_params: Largest number of preconditioned parameters accepted (one Hessian-vector
            product per parameter and curvature step).
        hvp_batch_size: Hessian-vector products per (vmapped) autograd call; 1 runs them one
            at a time.
    """

    hessian_shape: Shape | str = Shape.FULL
    indefinite: IndefiniteRule | str = IndefiniteRule.SHIFT
    max_params: int = 4096
    hvp_batch_size: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        self.hessian_shape = coerce_enum(Shape, self.hessian_shape, "hessian_shape")
        if self.hessian_shape not in (Shape.FULL, Shape.LAYER_WISE):
            raise invalid(
                "hessian_shape", self.hessian_shape.value, "Supported: ('full', 'layer_wise')"
            )
        self.indefinite = coerce_enum(IndefiniteRule, self.indefinite, "indefinite")
        check_int("max_params", self.max_params, minimum=1)
        check_int("hvp_batch_size", self.hvp_batch_size, minimum=1)


class NewtonBlock:
    """One dense Hessian block: its running average and the damped factorisation.

    Args:
        rule: The indefiniteness rule.
    """

    _names = ("matrix", "factor", "damping_used")

    def __init__(self, rule: IndefiniteRule) -> None:
        self.rule = rule
        self.matrix: Tensor | None = None
        #: Cholesky factor of ``H + δ'I`` (``shift``) or the dense inverse (``abs``).
        self.factor: Tensor | None = None
        self.damping_used = 0.0
        #: Whether the last refresh found ``H + δI`` indefinite and shifted it by ``λ_min``.
        self.shifted = False

    def update(self, hessian: Tensor, ema_decay: float, active: Tensor | None = None) -> None:
        """Fold in this batch's block.

        Args:
            hessian: The batch's block.
            ema_decay: Decay of the running average.
            active: Trained coordinates (bool), or ``None`` for all: only the trained × trained
                entries are updated, the others keep their values.
        """
        if active is None or self.matrix is None:
            self.matrix = ema_update(self.matrix, hessian, ema_decay)
            return
        old = self.matrix.clone()
        new = ema_update(self.matrix, hessian, ema_decay)
        self.matrix = torch.where(active[:, None] & active[None, :], new, old)

    def refresh(self, damping: float, active: Tensor | None = None) -> bool:
        """Factorise the damped block; keep the previous factor and return False on failure.

        Args:
            damping: ``δ``.
            active: Trained coordinates (bool), or ``None`` for all: the rows and columns of the
                others are zeroed in the factorised matrix (not in the stored average).
        """
        if self.matrix is None:
            return False
        h = self.matrix
        if active is not None:
            h = h * (active[:, None] & active[None, :]).to(h.dtype)
        if self.rule is IndefiniteRule.SHIFT:
            res = damped_cholesky(h, damping, retries=0)
            self.shifted = res is None
            if res is None and bool(torch.isfinite(h).all()):
                evals = torch.linalg.eigvalsh(h)
                eps = 1e-7 * float(evals.abs().max())
                shift = max(damping, eps) - min(float(evals[0]), 0.0)
                factor, info = torch.linalg.cholesky_ex(add_diagonal(h, shift))
                res = None if bool(info != 0) else (factor, shift)
            if res is None:
                return False
            self.factor, self.damping_used = res
            return True
        if not bool(torch.isfinite(h).all()):
            return False
        evals, evecs = torch.linalg.eigh(h)
        delta = max(damping, 1e-7 * float(evals.abs().max()))
        if delta <= 0.0:
            return False
        self.factor = (evecs / (evals.abs() + delta)) @ evecs.T
        self.damping_used = delta
        return True

    def apply(self, g: Tensor) -> Tensor:
        """``(H + δ'I)^{-1} g`` (or the saddle-free inverse) for a flat ``g``."""
        assert self.factor is not None
        g64 = g.to(self.factor.dtype)
        if self.rule is IndefiniteRule.SHIFT:
            # Two triangular solves on the factor in place: torch.cholesky_solve would first
            # copy (and transpose) the whole n×n factor on every call, which costs more than
            # the solves themselves. Same kernels, same result.
            y = torch.linalg.solve_triangular(self.factor, g64[:, None], upper=False)
            return torch.linalg.solve_triangular(self.factor.mT, y, upper=True)[:, 0]
        return self.factor @ g64

    def state_dict(self) -> dict[str, Any]:
        """Matrix, factor and the damping used, cloned."""
        return {
            n: (v.clone() if isinstance(v, Tensor) else v)
            for n in self._names
            for v in [getattr(self, n)]
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        for n in self._names:
            v = state[n]
            setattr(self, n, v.clone() if isinstance(v, Tensor) else v)


@register_method(
    "newton",
    "damped Newton: dense full or layer-wise Hessian from HVPs, Cholesky or saddle-free solve",
    family="fisher",
)
class NewtonGradientMaker(SecondOrderGradientMaker):
    """Damped Newton gradient maker (see the module docstring for the update and rules).

    Args:
        model: The model.
        config: :class:`NewtonConfig`.

    Raises:
        ValueError: If the model has more than ``max_params`` preconditioned parameters.
    """

    config_class = NewtonConfig
    config: NewtonConfig

    def __init__(self, model: nn.Module, config: NewtonConfig | None = None) -> None:
        super().__init__(model, config)
        total = self.vec.numel
        if total > self.config.max_params:
            raise invalid(
                "model size",
                total,
                f"{type(self).__name__} builds a dense Hessian with one Hessian-vector product "
                f"per preconditioned parameter and allows at most max_params="
                f"{self.config.max_params}; raise max_params, exclude modules with "
                "ignore_modules, or use a matrix-free method (hessian_free, lissa, curveball)",
            )
        rule = IndefiniteRule(self.config.indefinite)
        #: ``(first, stop)`` parameter index ranges of the blocks.
        self.spans: list[tuple[int, int]] = []
        if self.config.hessian_shape is Shape.FULL:
            self.spans = [(0, len(self.vec.params))]
        else:
            start = 0
            for layer in self.layers:
                self.spans.append((start, start + len(layer.params)))
                start += len(layer.params)
        self.blocks = [NewtonBlock(rule) for _ in self.spans]
        offsets = [0]
        for size in self.vec.sizes:
            offsets.append(offsets[-1] + size)
        self._coords = [(offsets[a], offsets[b]) for a, b in self.spans]

    def update_curvature(self, stats: Mapping[str, LayerStats]) -> None:  # noqa: D102
        batch = self.batch
        if batch is None:
            return
        for (a, b), block in zip(self.spans, self.blocks):
            active = self.vec.mask(a, b)
            if active is not None and not bool(active.any()):
                continue  # every parameter of the block is frozen: its state is kept
            hessian = batch.hessian_block(a, b, self.config.hvp_batch_size)
            if not bool(torch.isfinite(hessian).all()):
                warn_once(
                    "newton:hessian",
                    "Newton: non-finite Hessian; curvature update skipped (previous kept).",
                )
                continue
            block.update(hessian, self.config.ema_decay, active)

    def update_preconditioner(self) -> None:  # noqa: D102
        for (a, b), block in zip(self.spans, self.blocks):
            active = self.vec.mask(a, b)
            if active is not None and not bool(active.any()):
                continue  # nothing of the block is trained: keep its factorisation
            if block.matrix is not None and not block.refresh(self.damping, active):
                warn_once(
                    "newton:refresh",
                    "Newton: could not factorise the damped Hessian; keeping the previous "
                    "factorisation (plain gradient if there is none).",
                )

    def precondition(self) -> None:  # noqa: D102
        g = self.vec.grads(torch.float64)
        out = g.clone()
        for (lo, hi), block in zip(self._coords, self.blocks):
            if block.factor is not None:
                out[lo:hi] = block.apply(g[lo:hi])
        self.vec.write_grads(out)

    def preconditioner_state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"blocks": [block.state_dict() for block in self.blocks]}

    def load_preconditioner_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        for block, st in zip(self.blocks, state["blocks"]):
            block.load_state_dict(st)

    def cost_model(self) -> CostModel:
        """Products, factorisations and solves of the configured Newton variant."""
        cm = CostModel(state_dtype=torch.float64)
        cm.add(Phase.CURVATURE, "hvp", (self.vec.numel,))
        kind = "cholesky" if self.config.indefinite is IndefiniteRule.SHIFT else "eigh"
        for (lo, hi), block in zip(self._coords, self.blocks):
            d = hi - lo
            cm.add(Phase.REFRESH, kind, (1, d))
            if block.shifted:
                # An indefinite H + δI: the shift rule needs λ_min(H) (the failed Cholesky
                # attempt is not part of the math: a test by eigenvalues would not need it).
                cm.add(Phase.REFRESH, "eigvalsh", (1, d))
            # Cholesky: two triangular solves; saddle-free: one product with the inverse.
            cm.add(Phase.APPLY, "matmul", (d, d, 1), count=2 if kind == "cholesky" else 1)
            cm.state_numel += 2 * d * d
        return cm
