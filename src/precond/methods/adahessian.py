r"""AdaHessian: Adam with the Hessian diagonal in place of squared gradients (Yao et al. 2021).

On curvature steps a Hutchinson sample ``D = z ⊙ (H z)`` (Rademacher ``z`` from the gradient
maker's generator; ``n_probes`` samples averaged) is smoothed in space: convolution kernels
(parameters with three or more dimensions) average ``D`` over their kernel positions, and with
``block_size = b > 1`` the other parameters average it over blocks of ``b`` consecutive entries
(the paper's Eq. 10). Then

.. math::

    v ← β_2 v + (1 − β_2) D^{(s)} ⊙ D^{(s)}, \qquad
    m ← β_1 m + (1 − β_1) g \quad\text{(every step)},

    p.grad ← \frac{m / (1 − β_1^t)}{\big(\sqrt{v / (1 − β_2^{n})}\big)^k + ε},

with ``t`` the number of steps, ``n`` the number of curvature updates (the Hessian may be
refreshed only every ``curvature_upd_interval`` steps: the paper's delayed Hessian update) and
``k`` the Hessian power (``t`` and ``n`` are counted per parameter, so the steps a parameter
spends frozen do not count for it; see :mod:`precond.methods.elementwise`). The first moment is
the gradient maker's state: use plain SGD (no momentum) as the optimizer, its learning rate
being AdaHessian's ``η``.

Knobs: ``momentum`` (``β₁``), ``ema_decay`` (``β₂``, default 0.999), ``hessian_power`` (``k``),
``damping`` (``ε``, default 1e-4), ``spatial_average``, ``block_size``, ``n_probes``.

Reference:
    Z. Yao, A. Gholami, S. Shen, M. Mustafa, K. Keutzer, M. W. Mahoney. ADAHESSIAN: An Adaptive
    Second Order Optimizer for Machine Learning. AAAI 2021. https://arxiv.org/abs/2006.00719
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..capture import stat_dtype
from ..config import PreconditioningConfig
from ..registry import register_method
from ..validation import check_float, check_int, check_probability, invalid
from .cost import CostModel, Phase
from .elementwise import ElementwiseSecondOrderMaker
from .probes import hutchinson_diagonal, rademacher_like

__all__ = ["AdaHessianConfig", "AdaHessianGradientMaker", "block_average"]


@dataclass(kw_only=True)
class AdaHessianConfig(PreconditioningConfig):
    """AdaHessian options (see the module docstring).

    Args:
        momentum: ``β₁`` of the gradient's first moment.
        ema_decay: ``β₂`` of the squared Hessian diagonal's moving average.
        hessian_power: ``k ∈ (0, 1]``.
        spatial_average: Average the diagonal over the kernel positions of convolutions.
        block_size: Average the diagonal of other parameters over blocks of this many entries.
        n_probes: Hutchinson probes per curvature step.
        damping: ``ε`` added to the denominator.
    """

    momentum: float = 0.9
    ema_decay: float = 0.999
    hessian_power: float = 1.0
    spatial_average: bool = True
    block_size: int = 1
    n_probes: int = 1
    damping: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_probability("momentum", self.momentum)
        check_float("hessian_power", self.hessian_power, minimum=0.0, maximum=1.0, strict_min=True)
        if not isinstance(self.spatial_average, bool):
            raise invalid("spatial_average", self.spatial_average, "Must be True or False")
        check_int("block_size", self.block_size, minimum=1)
        check_int("n_probes", self.n_probes, minimum=1)


def block_average(d: Tensor, block_size: int, spatial: bool) -> Tensor:
    """Spatial and block averaging of a diagonal estimate (Yao et al., Eq. 10).

    Args:
        d: Diagonal estimate, parameter-shaped.
        block_size: ``b``: entries averaged together (flattened order; the last block may be
            shorter).
        spatial: For tensors with three or more dimensions (convolution kernels), average over
            every dimension after the first two instead.

    Returns:
        The averaged estimate, shaped like ``d``.
    """
    if spatial and d.dim() >= 3:
        return d.mean(dim=tuple(range(2, d.dim())), keepdim=True).expand_as(d).clone()
    if block_size == 1 or d.numel() <= 1:
        return d
    flat = d.reshape(-1)
    n = flat.numel()
    blocks = -(-n // block_size)
    padded = flat.new_zeros(blocks * block_size)
    padded[:n] = flat
    counts = flat.new_full((blocks,), float(block_size))
    counts[-1] = n - (blocks - 1) * block_size
    means = padded.view(blocks, block_size).sum(dim=1) / counts
    return means.repeat_interleave(block_size)[:n].view_as(d)


@register_method(
    "adahessian",
    "AdaHessian: Adam with a Hutchinson Hessian diagonal (Yao et al. 2021)",
    family="global",
)
class AdaHessianGradientMaker(ElementwiseSecondOrderMaker):
    """AdaHessian gradient maker (see the module docstring for the update and reference).

    Args:
        model: The model.
        config: :class:`AdaHessianConfig`.
    """

    config_class = AdaHessianConfig
    config: AdaHessianConfig
    _label = "AdaHessian"

    _average_square = True

    def __init__(self, model: nn.Module, config: AdaHessianConfig | None = None) -> None:
        super().__init__(model, config)
        #: The probes' buffer, reused across curvature steps (not state: rewritten each time).
        self._probe_scratch: list[Tensor] = []
        #: A 0-dim zero the directions broadcast (not state).
        self._zero: Tensor | None = None

    def _needs_graph(self) -> bool:
        return True

    def _diagonal_estimate(
        self, loss: Tensor, params: list[nn.Parameter], pre_grads: list[Tensor]
    ) -> list[Tensor]:
        k = self.config.n_probes
        # One probe whose sample is squared without smoothing (Linear weights at block size 1):
        # the sign that z puts on each entry of H z is squared away, so H z is folded as it is.
        unsigned = [k == 1 and self._unsmoothed(p) for p in params]
        total: list[Tensor] = []
        for j in range(k):
            z = rademacher_like(params, self.generator, scratch=self._probe_scratch)
            est = hutchinson_diagonal(
                pre_grads, params, z, retain_graph=j < k - 1, unsigned=unsigned
            )
            total = est if not total else [t.add_(e) for t, e in zip(total, est)]
        return [t / k for t in total] if k > 1 else total

    def _unsmoothed(self, param: Tensor) -> bool:
        """Whether :meth:`_smooth` returns this parameter's estimate unchanged."""
        cfg = self.config
        if cfg.spatial_average and param.dim() >= 3:
            return False
        return cfg.block_size == 1 or param.numel() <= 1

    def _smooth(self, estimate: Tensor) -> Tensor:
        cfg = self.config
        if cfg.spatial_average and estimate.dim() >= 3:
            # kept [O, I, 1, ...]: the moving average's update broadcasts it over the kernel
            return estimate.mean(dim=tuple(range(2, estimate.dim())), keepdim=True)
        return block_average(estimate, cfg.block_size, cfg.spatial_average)

    def _denominators_(
        self, outs: list[Tensor], curvatures: list[Tensor], updates: list[int]
    ) -> None:
        cfg = self.config
        if cfg.hessian_power != 1.0:
            for out, c, n in zip(outs, curvatures, updates):
                torch.div(c, 1.0 - cfg.ema_decay ** max(n, 1), out=out)
            torch._foreach_sqrt_(outs)
            torch._foreach_pow_(outs, cfg.hessian_power)
            torch._foreach_add_(outs, self.damping)
            return
        # sqrt(v / (1 − β₂ⁿ)) + ε = ε + sqrt(v) / sqrt(1 − β₂ⁿ): two passes (the square root,
        # then the scale and the damping in one), not three
        for out, c in zip(outs, curvatures):
            torch.sqrt(c, out=out)
        eps = torch.full((), self.damping, dtype=outs[0].dtype, device=outs[0].device)
        for out, n in zip(outs, updates):
            torch.add(eps, out, alpha=(1.0 - cfg.ema_decay ** max(n, 1)) ** -0.5, out=out)

    def _directions_(
        self, outs: list[Tensor], moments: list[Tensor], denoms: list[Tensor], steps: list[int]
    ) -> None:
        beta1 = self.config.momentum
        zero = self._zero
        for out, m, d, step in zip(outs, moments, denoms, steps):
            if zero is None or zero.dtype != m.dtype or zero.device != m.device:
                zero = self._zero = m.new_zeros(())
            # 0 + scale · m / denom in one pass (a 0-dim zero broadcasts)
            torch.addcdiv(zero, m, d, value=1.0 / (1.0 - beta1**step), out=out)

    def cost_model(self) -> CostModel:
        """One HVP per probe, element-wise EMA, refresh and apply; state ``m``, ``v``, denom."""
        cm = CostModel(state_dtype=stat_dtype(self.precond_params[0].dtype))
        numel = self._numel
        cm.add(Phase.EXTRA_BACKWARD, "hvp", (self.config.n_probes,))
        cm.add(Phase.CURVATURE, "elementwise", (3 * numel,))
        cm.add(Phase.REFRESH, "elementwise", (2 * numel,))
        cm.add(Phase.APPLY, "elementwise", (3 * numel,))
        cm.state_numel = 3 * numel
        cm.transient_numel = 2 * numel
        # A Hessian-vector product is a double backward: it must keep the gradient's graph (the
        # tensors the create_graph backward saved, mostly the activations' gradients).
        cm.transient_numel += self.graph_numel
        return cm
