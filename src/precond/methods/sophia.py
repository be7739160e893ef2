r"""Sophia: clipped second-order steps with a cheap diagonal curvature (Liu et al. 2024).

Every ``k = curvature_upd_interval`` steps (default 10) a diagonal estimate ``ĥ`` is folded
into ``h ← β₂ h + (1 − β₂) ĥ``; every step ``m ← β₁ m + (1 − β₁) g`` and

.. math::

    p.grad ← \operatorname{clip}\Big(\frac{m}{\max(γ h, ε)}, 1\Big),

the element-wise clip to ``[−1, 1]``; the optimizer (plain SGD, learning rate ``η``; its weight
decay is then decoupled as in the paper) takes the step. Estimators (``estimator``):

* ``gnb`` (Gauss-Newton-Bartlett, default): labels ``ŷ`` sampled from the model's predictive
  distribution, ``ĥ = B · ∇L̂(ŷ) ⊙ ∇L̂(ŷ)`` with ``B`` the number of loss terms; one extra
  backward pass; unbiased for the diagonal of the GGN (= Fisher for the supported losses).
  Needs a loss precond knows (``setup_loss_call`` with a supported loss, or
  ``setup_logits_repr``).
* ``hutchinson``: ``ĥ = u ⊙ (H u)`` with ``u ~ N(0, I)``; one Hessian-vector product.

Knobs: ``momentum`` (``β₁``, 0.965), ``ema_decay`` (``β₂``, 0.99), ``rho`` (``γ``, 0.04),
``damping`` (``ε``, 1e-12), ``curvature_upd_interval`` (``k``, 10). The moments and ``h`` are
part of the state; ``h`` starts at zero without bias correction, as in the paper.

Reference:
    H. Liu, Z. Li, D. Hall, P. Liang, T. Ma. Sophia: A Scalable Stochastic Second-order
    Optimizer for Language Model Pre-training. ICLR 2024. https://arxiv.org/abs/2305.14342
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor, nn

from ..capture import stat_dtype
from ..config import PreconditioningConfig
from ..registry import register_method
from ..validation import check_float, check_probability, coerce_enum
from ._twin_backward import UncutGraphs
from .cost import CostModel, Phase
from .elementwise import ElementwiseSecondOrderMaker
from .probes import gaussian_like, gnb_diagonal, hutchinson_diagonal

__all__ = ["SophiaConfig", "SophiaEstimator", "SophiaGradientMaker", "sophia_direction"]


class SophiaEstimator(str, Enum):
    """Diagonal curvature estimator of Sophia."""

    GNB = "gnb"
    HUTCHINSON = "hutchinson"

    def __str__(self) -> str:
        return self.value


@dataclass(kw_only=True)
class SophiaConfig(PreconditioningConfig):
    """Sophia options (see the module docstring).

    Args:
        estimator: ``gnb`` (default) or ``hutchinson``.
        momentum: ``β₁``.
        ema_decay: ``β₂`` of the curvature's moving average.
        rho: ``γ > 0``, scale of the curvature in the clipped ratio.
        damping: ``ε > 0``, floor of the denominator.
        curvature_upd_interval: ``k``, steps between curvature estimates.
    """

    estimator: SophiaEstimator | str = SophiaEstimator.GNB
    momentum: float = 0.965
    ema_decay: float = 0.99
    rho: float = 0.04
    damping: float = 1e-12
    curvature_upd_interval: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        self.estimator = coerce_enum(SophiaEstimator, self.estimator, "estimator")
        check_probability("momentum", self.momentum)
        check_float("rho", self.rho, minimum=0.0, strict_min=True)
        check_float("damping", self.damping, minimum=0.0, strict_min=True)


def sophia_direction(m: Tensor, denom: Tensor) -> Tensor:
    """``clip(m / denom, 1)`` element-wise, with ``denom = max(γ h, ε)`` precomputed.

    Args:
        m: First moment.
        denom: ``max(γ h, ε)`` (positive).

    Returns:
        The clipped ratio in ``[−1, 1]``.
    """
    return (m / denom).clamp(min=-1.0, max=1.0)


@register_method(
    "sophia",
    "Sophia: clipped diagonal Newton steps with GNB/Hutchinson curvature (Liu et al. 2024)",
    family="global",
)
class SophiaGradientMaker(ElementwiseSecondOrderMaker):
    """Sophia gradient maker (see the module docstring for the update and reference).

    Args:
        model: The model.
        config: :class:`SophiaConfig`.
    """

    config_class = SophiaConfig
    config: SophiaConfig
    _label = "Sophia"

    def __init__(self, model: nn.Module, config: SophiaConfig | None = None) -> None:
        super().__init__(model, config)
        #: Graph signatures without a cut for the GNB pass (a cache, not state).
        self._uncut = UncutGraphs()

    def _needs_graph(self) -> bool:
        return self.config.estimator is SophiaEstimator.HUTCHINSON

    def _diagonal_estimate(
        self, loss: Tensor, params: list[nn.Parameter], pre_grads: list[Tensor]
    ) -> list[Tensor]:
        if self.config.estimator is SophiaEstimator.GNB:
            # with the loss's own backward (see _backward); the graph is freed
            return gnb_diagonal(
                self.loss_inputs(),
                params,
                self.generator,
                loss=loss,
                uncut=self._uncut,
                key=self.graph_signature(),
            )
        u = gaussian_like(params, self.generator)
        return hutchinson_diagonal(pre_grads, params, u)

    def _denominators_(
        self, outs: list[Tensor], curvatures: list[Tensor], updates: list[int]
    ) -> None:
        for out, c in zip(outs, curvatures):
            torch.mul(c, self.config.rho, out=out)
        torch._foreach_clamp_min_(outs, self.damping)

    def _directions_(
        self, outs: list[Tensor], moments: list[Tensor], denoms: list[Tensor], steps: list[int]
    ) -> None:
        for out, m, d in zip(outs, moments, denoms):
            # = sophia_direction; one clamp pass per parameter (a foreach clamp_min and
            # clamp_max would be two)
            torch.div(m, d, out=out).clamp_(min=-1.0, max=1.0)

    def cost_model(self) -> CostModel:
        """One extra backward (GNB) or HVP, element-wise EMA and clipped ratio."""
        cm = CostModel(state_dtype=stat_dtype(self.precond_params[0].dtype))
        numel = self._numel
        if self.config.estimator is SophiaEstimator.GNB:
            # The estimate squares the sampled loss's gradient in the weights: one gradient
            # w.r.t. all parameters (a backward pass with its weight gradients). It follows the
            # loss's backward segment by segment (_twin_backward); what one segment's retained
            # tensors and the other pass's gradient at a cut add is not declared.
            cm.add(Phase.EXTRA_BACKWARD, "grad", (1,))
        else:
            cm.add(Phase.EXTRA_BACKWARD, "hvp", (1,))
            cm.add(Phase.EXTRA_BACKWARD, "randn", (numel,))  # the probe u ~ N(0, I)
        cm.add(Phase.CURVATURE, "elementwise", (2 * numel,))
        cm.add(Phase.REFRESH, "elementwise", (numel,))
        cm.add(Phase.APPLY, "elementwise", (3 * numel,))
        cm.state_numel = 3 * numel
        cm.transient_numel = numel
        # A Hessian-vector product is a double backward: it must keep the gradient's graph (the
        # tensors the create_graph backward saved, mostly the activations' gradients).
        cm.transient_numel += self.graph_numel
        return cm
