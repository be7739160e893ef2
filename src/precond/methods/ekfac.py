r"""EKFAC: K-FAC's eigenbasis with per-coordinate rescaling (George et al. 2018).

For a layer with canonical weight ``W̃`` (``[d_out, d_in']`` per group), K-FAC approximates the
Fisher block by ``B ⊗ A``. EKFAC keeps the Kronecker-factored eigenbasis (KFE)
``Q = Q_B ⊗ Q_A`` of these factors (``A = Q_A Λ_A Q_Aᵀ``, ``B = Q_B Λ_B Q_Bᵀ``) but replaces the
eigenvalues ``Λ_B ⊗ Λ_A`` by the exact second moments of the per-example Jacobians ``J_kn`` in
that basis,

.. math::

    s = \sum_{k,n} (Q_B^\top J_{kn} Q_A)^{\odot 2}, \qquad
    F \approx Q \,\mathrm{diag}(s)\, Q^\top, \qquad
    \Delta W̃ = Q_B \big[ (Q_B^\top \nabla_{W̃} L \, Q_A) \oslash (s + \lambda) \big] Q_A^\top,

the diagonal that minimises the Frobenius error of the Fisher block among all matrices
diagonal in the KFE, never worse than K-FAC's. The eigenbasis (the expensive ``eigh``) is
recomputed on the preconditioner schedule from the running factors; the scaling ``s`` is
updated on the curvature schedule (an exponential moving average with ``ema_decay``). When the
basis changes, the running scaling is carried over as the diagonal of its old KFE matrix in the
new basis, ``s ← (R_B^{⊙2}) s (R_A^{⊙2})ᵀ`` with ``R = Q_newᵀ Q_old``, so averages stay
consistent. Damping is exact in the eigenbasis: ``(s + λ)⁻¹``.

Layers: Linear and convolutions (``weight_sharing`` ``expand``/``reduce`` for the factors; the
scaling always uses the exact per-example Jacobians ``Σ_s g ãᵀ``); embeddings with their
diagonal input factor (token frequencies, identity eigenbasis; the scaling is accumulated on
the touched vocabulary entries only); normalisation layers with their exact unit-wise 2 × 2
Fisher blocks (``norm_shape="unit_wise"``, as K-FAC) or their diagonal (``"diag"``).

Costs per layer: factors ``O(N S (d_in'² + d_out²))`` and scaling ``O(N d_out d_in')``
(``S = 1``) or ``O(N S d_out d_in')`` on curvature steps; two ``eigh`` on refresh steps; four
matrix products per step (like K-FAC with eigendecompositions).

References:
    T. George, C. Laurent, X. Bouthillier, N. Ballas, P. Vincent. Fast Approximate Natural
    Gradient Descent in a Kronecker-factored Eigenbasis. NeurIPS 2018.
    https://arxiv.org/abs/1806.03884
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..capture import Layer, LayerStats, stat_dtype
from ..curvature import fisher
from ..enums import CurvatureType, Shape, WeightSharing
from ..linalg.blocks import Block, DenseBlock, DiagBlock, KfeBlock, Solver
from ..linalg.ema import ema_update
from ..linalg.solvers import gram_diagonal
from ..numerics import all_sums_finite, warn_once
from ..registry import register_method
from .base import FisherConfig, PreconditionedGradientMaker
from .cost import CostModel, Phase, add_patches, eigh_workspace_numel
from .kfac import layer_has_grad, write_preconditioned
from .natural_gradient import (
    coerce_shape,
    extra_backward_cost,
    num_vectors,
    positions,
    positive_damping,
)
from .per_example import compact_one_hot, one_hot_pairs, scatter_columns

__all__ = ["EkfacConfig", "EkfacGradientMaker", "reproject_scale"]


@dataclass(kw_only=True)
class EkfacConfig(FisherConfig):
    """EKFAC options.

    Args:
        norm_shape: Curvature of normalisation layers: ``unit_wise`` (default; their exact
            2 × 2 block per unit) or ``diag``.
    """

    norm_shape: Shape | str = Shape.UNIT_WISE

    def __post_init__(self) -> None:
        super().__post_init__()
        self.norm_shape = coerce_shape(self.norm_shape, (Shape.UNIT_WISE, Shape.DIAG), "norm_shape")


def reproject_scale(
    scale: Tensor, old: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor]
) -> Tensor:
    """The diagonal, in a new eigenbasis, of the KFE matrix ``Q_old diag(s) Q_oldᵀ``.

    Args:
        scale: ``s`` ``[G, d_out, d_in']`` in the old basis.
        old: Old ``(Q_A, Q_B)`` (``Q_A`` may be the diagonal-factor marker of ``KfeBlock``).
        new: New ``(Q_A, Q_B)``.

    Returns:
        ``(R_B^{⊙2}) s (R_A^{⊙2})ᵀ`` with ``R = Q_newᵀ Q_old``.
    """
    (qa_old, qb_old), (qa_new, qb_new) = old, new
    rb = (qb_new.transpose(-1, -2) @ qb_old).square()
    out = rb @ scale
    if qa_new.dim() == 3 and qa_old.dim() == 3:
        ra = (qa_new.transpose(-1, -2) @ qa_old).square()
        out = out @ ra.transpose(-1, -2)
    return out


@register_method(
    "ekfac", "EKFAC: K-FAC eigenbasis with per-coordinate rescaling (George et al. 2018)"
)
class EkfacGradientMaker(PreconditionedGradientMaker):
    """EKFAC gradient maker (see the module docstring for the update and references).

    Args:
        model: The model.
        config: :class:`EkfacConfig`.
    """

    config_class = EkfacConfig
    config: EkfacConfig

    def __init__(self, model: torch.nn.Module, config: EkfacConfig | None = None) -> None:
        super().__init__(model, config)
        self.blocks: dict[str, Block] = {}
        self.factors: dict[str, dict[str, Tensor | None]] = {}
        for layer in self.layers:
            assert layer.adapter is not None
            if not layer.adapter.elementwise:
                self.blocks[layer.name] = KfeBlock()
                self.factors[layer.name] = {"a": None, "b": None}
            elif self.config.norm_shape is Shape.DIAG:
                self.blocks[layer.name] = DiagBlock()
            else:
                self.blocks[layer.name] = DenseBlock(Solver.CHOLESKY)
        # Layers whose statistics changed since their last factorisation (eigh or Cholesky).
        self._stale: set[str] = set()
        self._shapes: dict[str, tuple[int, int, int]] = {}
        # Curvature updates visit the layers with the largest factors first: their eigh (and
        # its workspace) runs before the inputs of convolutions are expanded (im2col patches,
        # built and cached on first use), so the two transients do not coincide. The layers
        # are independent, so the order does not change any result.
        self._curvature_order = sorted(
            self.layers, key=lambda layer: -layer.shape[0] * max(layer.shape[1:]) ** 2
        )

    @property
    def tag(self) -> str:
        """Tag of the back-propagated vectors of the configured curvature."""
        return CurvatureType(self.config.curvature).value

    def _refresh_due(self) -> bool:
        # Mirrors the step skeleton: on a curvature step the preconditioner refreshes on its
        # own schedule, or because none exists yet.
        schedule = self.preconditioner_schedule
        return schedule.is_update_step(self.step) or not self._has_preconditioner

    # ---- curvature --------------------------------------------------------------------------
    def update_curvature(self, stats: Mapping[str, LayerStats]) -> None:  # noqa: D102
        sharing = WeightSharing(self.config.weight_sharing)
        decay = self.config.ema_decay
        due = self._refresh_due()
        for layer in self._curvature_order:
            st = stats.get(layer.name)
            if st is None or st.num_calls == 0:
                continue
            self._shapes[layer.name] = (num_vectors(st, self.tag), st.batch_size, positions(st))
            block = self.blocks[layer.name]
            if not isinstance(block, KfeBlock):
                self._update_norm(layer, st, block)
                continue
            a = fisher.kron_input_factor(st, sharing)
            b = fisher.kron_output_factor(st, self.tag, sharing)
            if not all_sums_finite([fisher.kron_factor_check(a), fisher.kron_factor_check(b)]):
                self._warn_stats(layer)
                continue
            f = self.factors[layer.name]
            if decay == 0.0:
                f["a"], f["b"] = a, b  # fresh tensors of ours: no copy into the old ones
            else:
                f["a"] = ema_update(f["a"], a, decay)
                f["b"] = ema_update(f["b"], b, decay)
            self._stale.add(layer.name)
            if due or block.qb is None:
                # The batch's scaling must be measured in the basis it will be used with.
                self._set_basis(layer, block, reproject=decay > 0.0)
            if block.qb is None:
                continue
            scale = self._kfe_scale(st, block)
            if not all_sums_finite([scale]):
                self._warn_stats(layer)
                continue
            block.update(scale, decay)

    def _update_norm(self, layer: Layer, st: LayerStats, block: Block) -> None:
        if isinstance(block, DiagBlock):
            stat = fisher.diagonal(st, self.tag)
            check = stat
        else:
            stat = fisher.unit_matrices(st, self.tag)
            check = gram_diagonal(stat)  # Gram matrices: finite when their diagonals are
        if not all_sums_finite([check]):
            self._warn_stats(layer)
            return
        assert isinstance(block, DenseBlock | DiagBlock)
        block.update(stat, self.config.ema_decay)
        self._stale.add(layer.name)

    def _warn_stats(self, layer: Layer) -> None:
        warn_once(
            f"ekfac:stats:{layer.name}",
            f"EKFAC: non-finite statistics for layer {layer.label}; curvature update skipped "
            "(the previous estimate is kept).",
        )

    def _set_basis(self, layer: Layer, block: KfeBlock, *, reproject: bool) -> None:
        f = self.factors[layer.name]
        if f["a"] is None or f["b"] is None:
            return
        old = None if block.qa is None or block.qb is None else (block.qa, block.qb)
        if not block.set_basis(f["a"], f["b"]):
            warn_once(
                f"ekfac:basis:{layer.name}",
                f"EKFAC: eigendecomposition of the Kronecker factors of layer {layer.label} "
                "failed; keeping the previous eigenbasis.",
            )
            return
        self._stale.discard(layer.name)
        if reproject and old is not None and block.scale is not None:
            assert block.qa is not None and block.qb is not None
            block.scale = reproject_scale(block.scale, old, (block.qa, block.qb))

    def _kfe_scale(self, st: LayerStats, block: KfeBlock) -> Tensor:
        """``Σ_kn (Q_Bᵀ J_kn Q_A)²`` without dense per-example Jacobians where avoidable."""
        assert block.qa is not None and block.qb is not None
        qb = block.qb
        if compact_one_hot(st):
            # identity input basis: each (example, token) pair's column rotated by Q_B,
            # squared and added into its token's column (one group)
            j, _, tokens = one_hot_pairs(st, self.tag)
            rotated = (j @ qb[0].to(j.dtype)).square_()
            del j
            rotated = rotated[0] if rotated.shape[0] == 1 else rotated.sum(0)
            return scatter_columns(rotated, tokens, st.adapter.in_features(st.layer.module))
        if st.num_positions() > 1:
            if st.layer.trained == (True, True) and block.qa.dim() == 3:
                # the ones column enters the rotation as Q_A's last row: no inputs with a
                # bias column are built
                return _kfe_scale_from_chunks(st, st.g(self.tag), block)
            return _chunked_kfe_scale(st.a(), st.g(self.tag), block)
        # J = g ãᵀ per example, so Q_Bᵀ J Q_A = (Q_Bᵀ g)(Q_Aᵀ ã)ᵀ: rotate the factors (fresh
        # tensors of ours, squared in place).
        if st.layer.trained == (True, True) and block.qa.dim() == 3:
            x = st.x()
            dt = stat_dtype(x.dtype)
            qa = block.qa.to(dt)
            ar = _rotated(x[:, 0].to(dt), qa[:, :-1]).add_(qa[:, -1]).square_()
        else:
            a = st.a()
            dt = stat_dtype(a.dtype)
            a1 = a[:, 0].to(dt)  # [N, G, d_in']
            ar = a1.square() if block.qa.dim() == 2 else _rotated(a1, block.qa).square_()
        g1 = st.g(self.tag)[:, :, 0].to(dt)  # [K, N, G, d_out]
        gr = torch.einsum("kngo,gop->kngp", g1, qb).square_()
        return torch.einsum("kngo,ngi->goi", gr, ar)

    # ---- preconditioner ---------------------------------------------------------------------
    def update_preconditioner(self) -> None:  # noqa: D102
        for layer in self.layers:
            block = self.blocks[layer.name]
            if isinstance(block, KfeBlock):
                if layer.name in self._stale:
                    self._set_basis(layer, block, reproject=True)
                if block.scale is None or block.qb is None:
                    continue
                ok = block.refresh(positive_damping(self.damping, block.scale))
            elif isinstance(block, DiagBlock):
                if block.values is None:
                    continue
                ok = block.refresh(positive_damping(self.damping, block.values))
            else:
                assert isinstance(block, DenseBlock)
                if block.matrix is None or layer.name not in self._stale:
                    continue
                ok = block.refresh(self.damping)
                if ok:
                    self._stale.discard(layer.name)
            if not ok:
                warn_once(
                    f"ekfac:refresh:{layer.name}",
                    f"EKFAC: could not refresh the preconditioner of layer {layer.label}; "
                    "keeping the previous one (plain gradient if there is none).",
                )

    def precondition(self) -> None:  # noqa: D102
        for layer in self.layers:
            block = self.blocks[layer.name]
            if not layer_has_grad(layer) or not _ready(block):
                continue
            if isinstance(block, KfeBlock) and _apply_in_place(layer, block):
                continue
            v = layer.grads_matrix()
            write_preconditioned(layer, block.apply(v.to(stat_dtype(v.dtype))))

    # ---- state and cost ---------------------------------------------------------------------
    def preconditioner_state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            "blocks": {name: block.state_dict() for name, block in self.blocks.items()},
            "factors": {
                name: {k: None if v is None else v.clone() for k, v in f.items()}
                for name, f in self.factors.items()
            },
            "stale": sorted(self._stale),
        }

    def load_preconditioner_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        for name, block in self.blocks.items():
            block.load_state_dict(state["blocks"][name])
        for name in self.factors:
            saved = state["factors"][name]
            self.factors[name] = {k: None if v is None else v.clone() for k, v in saved.items()}
        self._stale = set(state["stale"])

    def cost_model(self) -> CostModel:
        """Unavoidable kernels at the shapes of the last curvature step."""
        cm = CostModel()
        k = max(extra_backward_cost(self.config, cm), 1)
        for layer in self.layers:
            if layer.name not in self._shapes:
                continue
            _, n, s = self._shapes[layer.name]
            groups, d_out, d_in = layer.shape
            block = self.blocks[layer.name]
            if not isinstance(block, KfeBlock):
                cm.add(Phase.CURVATURE, "elementwise", (k * n * s * groups * d_in,))
                if isinstance(block, DenseBlock):
                    cm.add(Phase.REFRESH, "cholesky", (groups * d_out, d_in))
                    cm.add(Phase.APPLY, "elementwise", (groups * d_out * d_in * d_in,))
                    cm.state_numel += 2 * groups * d_out * d_in * d_in
                else:
                    cm.add(Phase.APPLY, "elementwise", (groups * d_out * d_in,))
                    cm.state_numel += groups * d_out * d_in
                continue
            m = n if self.config.weight_sharing is WeightSharing.REDUCE else n * s
            if block.qa is not None and block.qa.dim() == 2:
                _one_hot_cost(cm, (groups, d_out, d_in), n, s, k, self.config.ema_decay > 0.0)
                continue
            add_patches(cm, layer, n, s)
            cm.add(Phase.CURVATURE, "bmm", (groups, d_in, m, d_in))
            cm.add(Phase.CURVATURE, "bmm", (groups, d_out, k * m, d_out))
            if self.config.ema_decay > 0.0:  # the factors' and the scaling's moving averages
                cm.add(
                    Phase.CURVATURE, "elementwise", (groups * (d_in**2 + d_out**2 + d_out * d_in),)
                )
            if s == 1:
                cm.add(Phase.CURVATURE, "matmul", (n * groups, d_in, d_in))
                cm.add(Phase.CURVATURE, "matmul", (k * n * groups, d_out, d_out))
                cm.add(Phase.CURVATURE, "bmm", (groups, d_out, k * n, d_in))
            else:
                # rotate the factors, then sum their products over positions
                cm.add(Phase.CURVATURE, "matmul", (k * n * s * groups, d_out, d_out))
                cm.add(Phase.CURVATURE, "matmul", (n * s * groups, d_in, d_in))
                cm.add(Phase.CURVATURE, "bmm", (k * n * groups, d_out, s, d_in))
                per_example = groups * (k * d_out * d_in + s * (k * d_out + d_in))
                chunk = min(n * per_example, CHUNK_NUMEL)
                cm.transient_numel = max(cm.transient_numel, chunk)
            cm.add(Phase.REFRESH, "eigh", (groups, d_in))
            cm.add(Phase.REFRESH, "eigh", (groups, d_out))
            # A new eigenbasis is computed next to the previous one (kept if eigh fails), with
            # the decomposition's workspace.
            big = max(d_in, d_out)
            basis = groups * big * big + eigh_workspace_numel(big)
            cm.transient_numel = max(cm.transient_numel, basis)
            for _ in range(2):
                cm.add(Phase.APPLY, "bmm", (groups, d_out, d_out, d_in))
                cm.add(Phase.APPLY, "bmm", (groups, d_out, d_in, d_in))
            cm.add(Phase.APPLY, "elementwise", (groups * d_out * d_in,))
            cm.state_numel += 2 * groups * (d_in * d_in + d_out * d_out) + groups * d_out * d_in
        return cm


def _one_hot_cost(
    cm: CostModel, shape: tuple[int, int, int], n: int, s: int, k: int, ema: bool
) -> None:
    """A layer with one-hot inputs (embeddings): diagonal ``A``, identity input basis.

    ``A`` is the diagonal of token counts; the scaling rotates each example's output gradients
    (``Q_Bᵀ g``, one matrix product) and squares them on the example's tokens, then writes the
    scaling of the whole ``d_out × vocabulary`` table; applying rotates by ``Q_B`` only.
    """
    groups, d_out, d_in = shape
    m = n * s
    cm.add(Phase.CURVATURE, "elementwise", (m + groups * d_in,))
    cm.add(Phase.CURVATURE, "bmm", (groups, d_out, k * m, d_out))
    cm.add(Phase.CURVATURE, "matmul", (k * m * groups, d_out, d_out))
    cm.add(Phase.CURVATURE, "elementwise", (k * m * groups * d_out + groups * d_out * d_in,))
    if ema:  # the factors' and the scaling's moving averages
        cm.add(Phase.CURVATURE, "elementwise", (groups * (d_in + d_out**2 + d_out * d_in),))
    cm.add(Phase.REFRESH, "eigh", (groups, d_out))
    cm.transient_numel = max(
        cm.transient_numel, groups * d_out * d_out + eigh_workspace_numel(d_out)
    )
    cm.add(Phase.APPLY, "bmm", (groups, d_out, d_out, d_in), count=2)
    cm.add(Phase.APPLY, "elementwise", (groups * d_out * d_in,))
    cm.state_numel += 2 * groups * (d_in + d_out * d_out) + groups * d_out * d_in


#: Elements of rotated per-example Jacobians materialised at once (weight-sharing layers).
CHUNK_NUMEL = 1 << 22


def _kfe_scale_from_chunks(st: LayerStats, g: Tensor, block: KfeBlock) -> Tensor:
    """:func:`_chunked_kfe_scale` (with ``bias``) over the layer's input chunks.

    A single-call layer's inputs come a chunk of examples at a time
    (:meth:`~precond.capture.stats.LayerStats.input_chunks`), so a convolution's im2col
    patches of the whole batch never exist at once. A module called several times sums each
    example's Jacobian over the positions of every call: its inputs are formed whole.
    """
    if st.num_calls != 1:
        return _chunked_kfe_scale(st.x(), g, block, bias=True)
    total: Tensor | None = None
    lo = 0
    for xc in st.input_chunks():
        hi = lo + xc.shape[0]
        part = _chunked_kfe_scale(xc, g[:, lo:hi], block, bias=True)
        total = part if total is None else total.add_(part)
        lo = hi
    assert total is not None
    return total


def _chunked_kfe_scale(a: Tensor, g: Tensor, block: KfeBlock, *, bias: bool = False) -> Tensor:
    """``Σ_kn (Q_Bᵀ J_kn Q_A)²`` with ``J_kn = Σ_s g ãᵀ``, a chunk of examples at a time.

    The same quantity as :func:`precond.curvature.fisher.kfe_scale`. The factors are rotated
    before the sum over positions, ``Q_Bᵀ J Q_A = Σ_s (Q_Bᵀ g_s)(Q_Aᵀ ã_s)ᵀ``, so the rotated
    Jacobians are formed directly (no unrotated copy, no ``d_out × d_out × d_in`` and
    ``d_out × d_in × d_in`` products per example), and at most :data:`CHUNK_NUMEL` of their
    elements exist at once. With ``bias``, ``a`` holds the inputs without the ones column
    (``ã = [a, 1]``, so ``Q_Aᵀ ã = Q_A[:d]ᵀ a + Q_A[d]``).
    """
    assert block.qa is not None and block.qb is not None
    dt = stat_dtype(a.dtype)
    k, n, _, groups, d_out = g.shape
    d_in = a.shape[-1] + int(bias)
    # rotated Jacobians plus the rotated output gradients and inputs of one example
    per_example = groups * (k * d_out * d_in + a.shape[1] * (k * d_out + d_in))
    step = max(1, CHUNK_NUMEL // max(per_example, 1))
    total = a.new_zeros(groups, d_out, d_in, dtype=dt)
    qb = block.qb.to(dt)
    qa = None if block.qa.dim() == 2 else block.qa.to(dt)
    for start in range(0, n, step):
        sl = slice(start, start + step)
        gr = torch.einsum("knsgo,gop->knsgp", g[:, sl].to(dt), qb)
        ar = a[sl].to(dt)
        if qa is not None and bias:
            ar = torch.einsum("nsgi,gij->nsgj", ar, qa[:, :-1]).add_(qa[:, -1])
        elif qa is not None:
            ar = torch.einsum("nsgi,gij->nsgj", ar, qa)
        j = torch.einsum("knsgo,nsgi->kngoi", gr, ar)
        del gr, ar
        total += j.square_().sum(dim=(0, 1))
    return total


def _apply_in_place(layer: Layer, block: KfeBlock) -> bool:
    """``Q_B [(Q_Bᵀ V Q_A) ⊘ (s + λ)] Q_Aᵀ`` in two gradient-sized buffers, into ``.grad``.

    ``V = [G_w | g_b]`` is concatenated once; each product writes into whichever buffer is
    free, and the last one goes straight into ``weight.grad`` (columns of ``Q_Aᵀ`` for the
    weight) and ``bias.grad`` (its last column). Used for dense input bases when weight and bias
    are trained, both gradients exist in the statistics' dtype and the weight gradient is a
    contiguous ``[G, d_out, d_in]``.

    Returns:
        ``False`` if the layer does not fit (the caller uses the generic path).
    """
    qa, qb, scale = block.qa, block.qb, block.scale
    if qa is None or qb is None or scale is None or qa.dim() != 3:
        return False
    if layer.trained != (True, True) or layer.adapter is None:
        return False
    weight, bias = layer.params
    if weight.grad is None or bias.grad is None:
        return False
    if not weight.grad.dtype == bias.grad.dtype == qa.dtype == scale.dtype:
        return False
    gw = layer.adapter.weight_to_matrix(layer.module, weight.grad)
    if not gw.is_contiguous() or gw.data_ptr() != weight.grad.data_ptr():
        return False
    d = gw.shape[-1]
    v = layer.grads_matrix()
    t = torch.bmm(qb.transpose(-1, -2), v)
    torch.bmm(t, qa, out=v)  # rotated gradient
    torch.add(scale, block.damping, out=t).pow_(-1.0)
    v.mul_(t)
    torch.bmm(qb, v, out=t)
    torch.bmm(t, qa[:, :d].transpose(-1, -2), out=gw)
    new_b = torch.bmm(t, qa[:, d:].transpose(-1, -2))
    bias.grad.copy_(new_b.reshape(bias.grad.shape))
    return True


def _rotated(a: Tensor, qa: Tensor) -> Tensor:
    """``Q_Aᵀ ã`` per example for ``a`` ``[N, G, d_in']``."""
    return torch.einsum("ngi,gij->ngj", a, qa)


def _ready(block: Block) -> bool:
    if isinstance(block, DiagBlock | KfeBlock):
        return block.ready and block.damping > 0
    return block.ready
