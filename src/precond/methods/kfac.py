r"""K-FAC: Kronecker-factored approximate curvature (Martens & Grosse 2015).

For a layer with canonical weight ``W̃`` (``[d_out, d_in']`` per group) the Fisher block is
approximated by ``B ⊗ A`` with ``A = E[ã ãᵀ]`` (layer inputs, bias column appended) and
``B = E[g gᵀ]`` (gradients of the back-propagated vectors w.r.t. the layer output), and the
update is

.. math::

    \Delta W̃ = (B + \pi\sqrt{\lambda} I)^{-1} \, \nabla_{W̃} L \,
                (A + \sqrt{\lambda}/\pi \, I)^{-1}

(π-damping; ``damping_mode="sqrt"`` uses ``√λ`` on both, ``"exact"`` inverts
``B ⊗ A + λI`` through the factors' eigendecompositions). Layers with weight-sharing positions
use K-FAC-expand or -reduce (Eschenhagen et al. 2023); embeddings have a diagonal input factor
(token frequencies), never a dense V×V one; normalisation layers (scale and shift per unit) use
their exact unit-wise 2×2 Fisher blocks.

References:
    J. Martens, R. Grosse. Optimizing Neural Networks with Kronecker-factored Approximate
    Curvature. ICML 2015. https://arxiv.org/abs/1503.05671

    R. Grosse, J. Martens. A Kronecker-factored approximate Fisher matrix for convolution
    layers. ICML 2016. https://arxiv.org/abs/1602.01407

    R. Eschenhagen et al. Kronecker-Factored Approximate Curvature for Modern Neural Network
    Architectures. NeurIPS 2023. https://arxiv.org/abs/2311.00636
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..capture import Layer, LayerStats
from ..curvature import fisher
from ..enums import CurvatureType, WeightSharing
from ..linalg.blocks import Block, DenseBlock, KronBlock, KronDamping, Solver
from ..linalg.solvers import gram_diagonal
from ..numerics import all_sums_finite, warn_once
from ..registry import register_method
from ..validation import coerce_enum, invalid
from .base import FisherConfig, PreconditionedGradientMaker
from .cost import CostModel, Phase, add_patches

__all__ = ["KfacConfig", "KfacGradientMaker", "grad_parts", "write_preconditioned"]


@dataclass(kw_only=True)
class KfacConfig(FisherConfig):
    """K-FAC options.

    Args:
        solver: ``cholesky`` (default; explicit inverses of the damped factors) or ``eigh``.
        damping_mode: ``pi`` (default), ``sqrt`` or ``exact`` (requires ``solver="eigh"``).
    """

    solver: Solver | str = Solver.CHOLESKY
    damping_mode: KronDamping | str = KronDamping.PI

    def __post_init__(self) -> None:
        super().__post_init__()
        self.solver = coerce_enum(Solver, self.solver, "solver")
        self.damping_mode = coerce_enum(KronDamping, self.damping_mode, "damping_mode")
        if self.damping_mode is KronDamping.EXACT and self.solver is not Solver.EIGH:
            raise invalid("damping_mode", "exact", "Exact Kronecker damping needs solver='eigh'")


def write_preconditioned(layer: Layer, update: Tensor) -> None:
    """Copy a canonical ``[G, d_out, d_in']`` update into the layer parameters' ``.grad``.

    Parameters whose ``.grad`` is ``None`` (unused this step) stay ``None``.

    Args:
        layer: The layer.
        update: The preconditioned gradient in canonical form.
    """
    for p, u in zip(layer.params, layer.from_matrix(update)):
        if p.grad is not None:
            p.grad.copy_(u)


def grad_parts(layer: Layer, dtype: torch.dtype | None = None) -> list[Tensor] | None:
    """Canonical views of the layer's gradients: ``[G, d_out, d_in]`` and ``[G, d_out, 1]``.

    Their concatenation along the last dimension is :meth:`Layer.grads_matrix`; writing into
    them writes ``p.grad``, so a method can precondition in place without concatenating the
    gradients and copying the result back.

    Args:
        layer: The layer.
        dtype: Required dtype of the gradients (``None``: any).

    Returns:
        One view per trained parameter (weight columns first), or ``None`` if a gradient is
        missing, has another dtype or has no canonical view (the caller then uses
        :meth:`Layer.grads_matrix` and :func:`write_preconditioned`).
    """
    adapter = layer.adapter
    assert adapter is not None
    parts: list[Tensor] = []
    for p, is_weight in zip(layer.params, _kinds(layer)):
        g = p.grad
        if g is None or (dtype is not None and g.dtype != dtype):
            return None
        if is_weight:
            view = adapter.weight_to_matrix(layer.module, g)
        else:
            view = adapter.bias_to_matrix(layer.module, g)
        if view.untyped_storage().data_ptr() != g.untyped_storage().data_ptr():
            return None  # a reshaped copy, not a view
        parts.append(view)
    return parts


def _kinds(layer: Layer) -> list[bool]:
    w, b = layer.trained
    return [True] * int(w) + [False] * int(b)


def layer_has_grad(layer: Layer) -> bool:
    """Whether any parameter of ``layer`` received a gradient."""
    return any(p.grad is not None for p in layer.params)


@register_method("kfac", "K-FAC: Kronecker-factored Fisher per layer (Martens & Grosse 2015)")
class KfacGradientMaker(PreconditionedGradientMaker):
    """K-FAC gradient maker (see the module docstring for the update and references).

    Args:
        model: The model.
        config: :class:`KfacConfig`.
    """

    config_class = KfacConfig
    config: KfacConfig

    def __init__(self, model: torch.nn.Module, config: KfacConfig | None = None) -> None:
        super().__init__(model, config)
        self.blocks: dict[str, Block] = {}
        for layer in self.layers:
            assert layer.adapter is not None
            if layer.adapter.elementwise:
                self.blocks[layer.name] = DenseBlock(Solver.CHOLESKY)
            else:
                self.blocks[layer.name] = KronBlock(self.config.solver, self.config.damping_mode)
        self._shapes: dict[str, tuple[int, int]] = {}

    @property
    def tag(self) -> str:
        """Tag of the back-propagated vectors of the configured curvature."""
        return CurvatureType(self.config.curvature).value

    def update_curvature(self, stats: Mapping[str, LayerStats]) -> None:  # noqa: D102
        sharing = WeightSharing(self.config.weight_sharing)
        decay = self.config.ema_decay
        for layer in self.layers:
            st = stats.get(layer.name)
            if st is None or st.num_calls == 0:
                continue
            block = self.blocks[layer.name]
            self._shapes[layer.name] = (st.batch_size, _positions(st))
            if isinstance(block, KronBlock):
                a = fisher.kron_input_factor(st, sharing)
                b = fisher.kron_output_factor(st, self.tag, sharing)
                checks = [fisher.kron_factor_check(a), fisher.kron_factor_check(b)]
                if not all_sums_finite(checks):
                    warn_once(
                        f"kfac:stats:{layer.name}",
                        f"K-FAC: non-finite statistics for layer {layer.label}; curvature update "
                        "skipped (the previous estimate is kept).",
                    )
                    continue
                if decay == 0.0:
                    block.a, block.b = a, b  # fresh tensors of ours: no copy into the old ones
                else:
                    block.update(a, b, decay)
            else:
                assert isinstance(block, DenseBlock)
                m = fisher.unit_matrices(st, self.tag)
                if not all_sums_finite([gram_diagonal(m)]):
                    warn_once(
                        f"kfac:stats:{layer.name}",
                        f"K-FAC: non-finite statistics for layer {layer.label}; update skipped.",
                    )
                    continue
                block.update(m, decay)

    def update_preconditioner(self) -> None:  # noqa: D102
        for layer in self.layers:
            block = self.blocks[layer.name]
            if isinstance(block, KronBlock) and block.b is None:
                continue
            if isinstance(block, DenseBlock) and block.matrix is None:
                continue
            if not block.refresh(self.damping):
                warn_once(
                    f"kfac:refresh:{layer.name}",
                    f"K-FAC: could not invert the damped curvature of layer {layer.label}; "
                    "keeping the previous preconditioner (plain gradient if there is none).",
                )

    def precondition(self) -> None:  # noqa: D102
        for layer in self.layers:
            block = self.blocks[layer.name]
            if not block.ready or not layer_has_grad(layer):
                continue
            if isinstance(block, KronBlock) and _apply_in_place(layer, block):
                continue
            # Kronecker blocks take [G, d_out, d_in']; unit-wise blocks batch over (G, d_out).
            write_preconditioned(layer, block.apply(layer.grads_matrix()))

    def preconditioner_state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {name: block.state_dict() for name, block in self.blocks.items()}

    def load_preconditioner_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        for name, block in self.blocks.items():
            block.load_state_dict(state[name])

    def cost_model(self) -> CostModel:
        """Unavoidable kernels at the shapes of the last curvature step."""
        cm = CostModel()
        k = self.config.n_mc_samples if self.config.curvature is CurvatureType.FISHER_MC else 0
        if self.config.curvature in (CurvatureType.FISHER_EXACT, CurvatureType.GGN):
            k = -1  # one pass per class; the harness reads the class count from the problem
        if k:
            cm.add(Phase.EXTRA_BACKWARD, "backward", (k,))
        for layer in self.layers:
            if layer.name not in self._shapes:
                continue
            n, s = self._shapes[layer.name]
            groups, d_out, d_in = layer.shape
            m = n * s
            if self.config.weight_sharing is WeightSharing.REDUCE:
                m = n
            block = self.blocks[layer.name]
            if isinstance(block, KronBlock) and block.a_diagonal:
                # one-hot inputs (embeddings): A is the diagonal of token counts
                cm.add(Phase.CURVATURE, "elementwise", (m + groups * d_in,))
                cm.add(Phase.CURVATURE, "bmm", (groups, d_out, max(k, 1) * m, d_out))
                if self.config.ema_decay > 0.0:
                    cm.add(Phase.CURVATURE, "elementwise", (groups * (d_in + d_out**2),))
                cm.add(Phase.REFRESH, "elementwise", (groups * d_in,))
                cm.add(Phase.REFRESH, "cholesky", (groups, d_out))
                cm.add(Phase.REFRESH, "cholesky_inverse", (groups, d_out))
                cm.add(Phase.APPLY, "bmm", (groups, d_out, d_out, d_in))
                cm.add(Phase.APPLY, "elementwise", (groups * d_out * d_in,))
                cm.state_numel += 2 * groups * (d_in + d_out * d_out)
                cm.transient_numel = max(cm.transient_numel, groups * (d_in + d_out * d_out))
            elif isinstance(block, KronBlock):
                kk = max(k, 1)
                add_patches(cm, layer, n, s)
                cm.add(Phase.CURVATURE, "bmm", (groups, d_in, m, d_in))
                cm.add(Phase.CURVATURE, "bmm", (groups, d_out, kk * m, d_out))
                if self.config.ema_decay > 0.0:  # folding them into the moving averages
                    cm.add(Phase.CURVATURE, "elementwise", (groups * (d_in**2 + d_out**2),))
                cm.add(Phase.REFRESH, "cholesky", (groups, d_in))
                cm.add(Phase.REFRESH, "cholesky_inverse", (groups, d_in))
                cm.add(Phase.REFRESH, "cholesky", (groups, d_out))
                cm.add(Phase.REFRESH, "cholesky_inverse", (groups, d_out))
                cm.add(Phase.APPLY, "bmm", (groups, d_out, d_out, d_in))
                cm.add(Phase.APPLY, "bmm", (groups, d_out, d_in, d_in))
                cm.state_numel += 2 * groups * (d_in * d_in + d_out * d_out)
                # a refresh factorises each damped factor in its own buffer (the factor, then
                # its inverse, where the damped copy lies); both exist before either replaces
                # the previous inverses, which are kept if one factorisation fails
                workspace = groups * (d_in * d_in + d_out * d_out)
                cm.transient_numel = max(cm.transient_numel, workspace)
            else:
                cm.add(Phase.CURVATURE, "elementwise", (max(k, 1) * m * groups * d_in,))
                if self.config.ema_decay > 0.0:  # folding them into the moving averages
                    cm.add(Phase.CURVATURE, "elementwise", (groups * d_out * d_in * d_in,))
                cm.add(Phase.REFRESH, "cholesky", (groups * d_out, d_in))
                cm.add(Phase.APPLY, "elementwise", (groups * d_out * d_in * d_in,))
                cm.state_numel += 2 * groups * d_out * d_in * d_in
        return cm


def _apply_in_place(layer: Layer, block: KronBlock) -> bool:
    """``B⁻¹ [G_w | g_b] A⁻¹`` written straight into ``weight.grad`` and ``bias.grad``.

    With ``A⁻¹ = [[P, q], [qᵀ, r]]`` (bias last): ``W' = (B⁻¹G_w) P + (B⁻¹g_b) qᵀ`` and
    ``b' = (B⁻¹G_w) q + (B⁻¹g_b) r``. No concatenation of weight and bias gradients and no
    copy of the result; used for the common case (dense factors, weight and bias trained, both
    gradients present, weight gradient viewable as a contiguous ``[G, d_out, d_in]``).

    Returns:
        ``False`` if the layer does not fit the fast path (the caller uses the generic one).
    """
    if block.a_inv is None or block.b_inv is None or block.a_diagonal:
        return False
    if layer.trained != (True, True) or any(p.grad is None for p in layer.params):
        return False
    assert layer.adapter is not None
    weight, bias = layer.params
    assert weight.grad is not None and bias.grad is not None
    gw = layer.adapter.weight_to_matrix(layer.module, weight.grad)
    if not gw.is_contiguous() or gw.data_ptr() != weight.grad.data_ptr():
        return False
    gb = bias.grad.reshape(gw.shape[0], gw.shape[1], 1)
    a_inv = block.a_inv.to(gw.dtype)
    b_inv = block.b_inv.to(gw.dtype)
    d = gw.shape[-1]
    p_, q, r = a_inv[:, :d, :d], a_inv[:, :d, d:], a_inv[:, d:, d:]
    tw = torch.bmm(b_inv, gw)  # [G, d_out, d_in]
    tb = torch.bmm(b_inv, gb)  # [G, d_out, 1]
    new_b = torch.baddbmm(tb * r, tw, q)
    # the rank-one bias term is added in place (no gradient-sized outer product)
    torch.bmm(tw, p_, out=gw).baddbmm_(tb, q.transpose(1, 2))
    bias.grad.copy_(new_b.reshape(bias.grad.shape))
    return True


def _positions(st: LayerStats) -> int:
    """Weight-sharing positions per example (one-hot layers: without building their inputs)."""
    if st.adapter.one_hot_input:
        return int(st.a_indices().shape[1])
    return st.num_positions()
