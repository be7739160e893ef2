r"""SOAP: Adam in the eigenbasis of Shampoo's factors (Vyas et al., ICLR 2025).

Parameters are cut into blocks as in Shampoo (:mod:`._tensor_blocks`). For a matrix block
``G`` with Shampoo statistics ``L, R`` and their eigenbases ``Q_L, Q_R``, one step is

.. math::

    G' &= Q_L^\top G\, Q_R, \qquad M' \leftarrow \beta_1 M' + (1-\beta_1) G', \\
    V &\leftarrow \beta_2 V + (1-\beta_2)\, G' \odot G', \qquad
    N' = \frac{M' / (1-\beta_1^t)}{\sqrt{V / (1-\beta_2^t)} + \epsilon}, \qquad
    D = Q_L N' Q_R^\top, \\
    L &\leftarrow \beta_s L + (1-\beta_s)\, G G^\top, \qquad
    R \leftarrow \beta_s R + (1-\beta_s)\, G^\top G,

and on refresh steps the bases advance by one power-iteration step,
``Q ← QR(L Q)`` (after the first eigendecomposition). Blocks of any order work mode by mode
(one statistic and one basis per dimension).

**Moments across a basis change** (the paper's handling): both moments are stored in the
rotated coordinates. The first moment is rotated exactly into the new basis,
``M' ← (Q_L,newᵀ Q_L,old) M' (Q_R,oldᵀ Q_R,new)``, which is the paper's first moment kept in
original coordinates (``M' = Q_Lᵀ M Q_R`` for the current bases) at the cost of one rotation
per refresh instead of one per step. The second moment ``V`` is not rotated: at a refresh the
columns of each ``Q`` are first sorted by their estimated eigenvalues ``diag(Qᵀ L Q)``
(descending) and ``V`` is permuted the same way, so each entry of ``V`` follows its
eigenvector; then ``Q ← QR(L Q)``.

**Order within a step** (the paper's): the direction at step ``t`` uses the bases computed
from gradients up to ``t − 1``, so a gradient never enters its own projection. On scheduled
steps the statistics absorb ``G_t`` and the new bases are computed from them (in
``update_curvature`` / ``update_preconditioner``), but they replace the old bases, with the
moment handling below, only after ``G_t`` has been preconditioned. On the very first step
there is no basis yet: matrix blocks get a zero direction (the paper skips that step), while
blocks without a basis (1-D parameters unless ``precondition_1d``) run plain Adam from the
start.

**Interaction with the user's optimizer**: precond writes ``D`` into ``p.grad`` and the user's
``torch.optim.SGD(lr)`` applies ``p ← p − lr·D``. Both Adam moments, the bias correction and
``ε`` live inside this gradient maker (its state), so use **SGD without momentum** (and
without Nesterov); SGD's ``weight_decay`` then acts as coupled L2 regularisation (add
decoupled decay yourself if you want AdamW's).

**Schedules**: ``curvature_upd_interval`` is how often ``L, R`` absorb the gradient (every step
in the paper); ``preconditioner_upd_interval`` is the paper's ``precondition_frequency`` (10 in
the paper; the shared default follows the curvature schedule). Adam's moments update on
every step (element-wise work plus the rotations). ``damping`` is not used.

**Non-finite gradients**: on a curvature step where a group of equally shaped blocks has a
non-finite statistic, that group's ``L, R`` are not updated (host check, warned once); a block
whose gradient is not finite keeps its Adam moments and step count on any step (device-side
guard, no host sync).

References:
    N. Vyas, D. Morwani, R. Zhao, I. Shapira, D. Brandfonbrener, L. Janson, S. Kakade. SOAP:
    Improving and Stabilizing Shampoo using Adam. ICLR 2025. https://arxiv.org/abs/2409.11321
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import LayerStats
from ..config import PreconditioningConfig
from ..linalg.solvers import gram_diagonal
from ..numerics import finite_flags, host_flags, warn_once
from ..registry import register_method
from ..validation import check_float, invalid
from ._gradient_stats import (
    check_betas,
    check_blocking,
    check_bool,
    eigh_descending,
    finite_rows,
    reject_ema_decay,
)
from ._tensor_blocks import (
    BlockGroup,
    BlockLayout,
    GroupBatch,
    fibre_gram,
    merge_shape,
    mode_product,
    rows,
    set_rows,
    stats_dtype,
)
from .base import PreconditionedGradientMaker
from .cost import CostModel, Phase

__all__ = ["SoapConfig", "SoapGradientMaker"]


@dataclass(kw_only=True)
class SoapConfig(PreconditioningConfig):
    """SOAP options.

    Args:
        betas: Adam's ``(β₁, β₂)`` in the eigenbasis.
        eps: Adam's ``ε`` (added to ``√v̂``).
        shampoo_beta: Decay ``β_s`` of the Shampoo statistics ``L, R``.
        correct_bias: Adam's bias correction.
        precondition_1d: Give vectors (biases, norm gains) a full factor and an eigenbasis
            too; by default they run plain Adam.
        merge_dims: Largest dimension made by merging trailing dimensions of tensors of order
            ≥ 3; ``None`` keeps all dimensions.
        block_size: Dimensions larger than this are cut into blocks with their own factors;
            ``None`` never blocks.
    """

    betas: tuple[float, float] = (0.95, 0.95)
    eps: float = 1e-8
    shampoo_beta: float = 0.95
    correct_bias: bool = True
    precondition_1d: bool = False
    merge_dims: int | None = 1024
    block_size: int | None = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        self.betas = check_betas("betas", self.betas)
        check_float("eps", self.eps, minimum=0.0, strict_min=True)
        check_float("shampoo_beta", self.shampoo_beta, minimum=0.0, maximum=1.0, strict_max=True)
        check_bool("correct_bias", self.correct_bias)
        check_bool("precondition_1d", self.precondition_1d)
        check_blocking(self.merge_dims, self.block_size)
        reject_ema_decay(self.ema_decay, "SOAP", "shampoo_beta (statistics) or betas (Adam)")


@register_method(
    "soap",
    "SOAP: Adam in the eigenbasis of Shampoo's factors, QR refreshes (Vyas et al. 2024)",
    family="global",
)
class SoapGradientMaker(PreconditionedGradientMaker):
    """SOAP gradient maker (see the module docstring for the update and references).

    Use it with ``torch.optim.SGD(params, lr)`` **without momentum**: Adam's moments are
    inside the gradient maker.

    Args:
        model: The model.
        config: :class:`SoapConfig`.

    Attributes:
        layout: The blocks of every trained parameter, grouped by shape.
        stats: Per group, the Shampoo statistic of each dimension (empty for plain-Adam groups).
        bases: Per group and dimension, the eigenbasis ``[B, n, n]`` (``None`` before the first
            eigendecomposition).
        exp_avg: Per group, Adam's first moment ``[B, *shape]`` in the rotated coordinates.
        exp_avg_sq: Per group, Adam's second moment in the rotated coordinates.
        adam_steps: Per group, Adam's step count of each block ``[B]``.
    """

    config_class = SoapConfig
    config: SoapConfig
    needs_adapter = False

    def __init__(self, model: nn.Module, config: SoapConfig | None = None) -> None:
        super().__init__(model, config)
        cfg = self.config
        self._params: list[nn.Parameter] = [p for layer in self.layers for p in layer.params]
        self._dtype = stats_dtype(
            torch.float64 if any(p.dtype == torch.float64 for p in self._params) else torch.float32
        )
        device = self._params[0].device
        self.layout = BlockLayout(
            [merge_shape(p.shape, cfg.merge_dims) for p in self._params], cfg.block_size
        )
        kw: dict[str, Any] = {"dtype": self._dtype, "device": device}
        self.stats: list[list[Tensor]] = []
        self.bases: list[list[Tensor | None]] = []
        self.exp_avg: list[Tensor] = []
        self.exp_avg_sq: list[Tensor] = []
        self.adam_steps: list[Tensor] = []
        for group in self.layout.groups:
            b = group.size
            dims = list(group.shape) if self._rotated(group) else []
            self.stats.append([torch.zeros(b, n, n, **kw) for n in dims])
            self.bases.append([None] * len(dims))
            self.exp_avg.append(torch.zeros(b, *group.shape, **kw))
            self.exp_avg_sq.append(torch.zeros(b, *group.shape, **kw))
            self.adam_steps.append(torch.zeros(b, **kw))
        self._batches: list[GroupBatch | None] | None = None
        # Bases refreshed on this step: (group, dim) -> (new basis, column order of the power
        # step); they take over after this step's direction is computed with the old ones.
        self._pending: dict[tuple[int, int], tuple[Tensor, Tensor | None]] = {}
        self._consts: dict[torch.dtype, tuple[Tensor, Tensor]] = {}

    def _rotated(self, group: BlockGroup) -> bool:
        return group.order >= 2 or self.config.precondition_1d

    # ---- the three verbs --------------------------------------------------------------------
    def update_curvature(self, stats: Mapping[str, LayerStats]) -> None:
        """Fold this step's gradient into the statistics ``L, R`` (it does not change the bases)."""
        self._batches = self.layout.gather([p.grad for p in self._params], self._dtype)
        self._fold_statistics(self._batches)

    def update_preconditioner(self) -> None:
        """Compute the new bases; they replace the old ones after this step's direction."""
        fresh: dict[int, list[tuple[int, int]]] = {}
        power: dict[int, list[tuple[int, int]]] = {}
        for gi, qs in enumerate(self.bases):
            for d, q in enumerate(qs):
                n = self.layout.groups[gi].shape[d]
                (fresh if q is None else power).setdefault(n, []).append((gi, d))
        for n, items in fresh.items():
            dec = eigh_descending(self._cat(self.stats, items), f"soap:eigh:{n}", "SOAP")
            if dec is not None:
                self._stage(items, dec[1], None)
        for n, items in power.items():
            self._power_step(n, items)

    def precondition(self) -> None:  # noqa: D102
        batches, self._batches = self._batches, None
        if batches is None:
            batches = self.layout.gather([p.grad for p in self._params], self._dtype)
        outputs: list[GroupBatch | None] = []
        for gi, batch in enumerate(batches):
            if batch is None:
                outputs.append(None)
                continue
            outputs.append(GroupBatch(self._adam_in_basis(gi, batch), batch.index, batch.present))
        directions = self.layout.scatter(outputs, [p.shape for p in self._params])
        self._switch_bases()
        for p, d in zip(self._params, directions):
            # a lone block's direction is already in the gradient's memory
            if p.grad is not None and d is not None and d.data_ptr() != p.grad.data_ptr():
                p.grad.copy_(d)

    # ---- Adam in the eigenbasis -------------------------------------------------------------
    def _adam_in_basis(self, gi: int, batch: GroupBatch) -> Tensor:
        """The direction of a group's blocks, written over ``batch.data``.

        ``batch.data`` is the gradients' own memory (a lone block) or a stacked copy; either
        may be overwritten, since the direction replaces ``p.grad``. Blocks whose gradient is
        not finite keep their moments and step count (device-side): their rotated gradient is
        zeroed and their decays set to 1, so the moment updates leave them bit-for-bit alone.
        """
        g, index = batch.data, batch.index
        qs = self.bases[gi]
        if any(q is None for q in qs):
            return g.zero_()  # no basis yet: the paper's skipped first step
        bases = [rows(q, index) for q in qs if q is not None]
        beta1, beta2 = self.config.betas
        ok = finite_rows(g)
        shape = (-1,) + (1,) * (g.dim() - 1)
        # fresh memory when rotated; unrotated blocks work in the gradient's memory. A block
        # that is not finite enters as zeros (its entries zeroed, then the block's flag
        # applied: two passes, where a broadcast `masked_fill_` was 1.6 times slower).
        g_rot = torch.nan_to_num_(_rotate(g, bases), 0.0, 0.0, 0.0)
        m, v = rows(self.exp_avg[gi], index), rows(self.exp_avg_sq[gi], index)
        known = host_flags(ok)
        if known is not None and all(known):
            # every block finite, read for free (a CPU, see host_flag): the flag's pass and
            # the per-block weights are exact no-ops (× 1, β₁ and β₂ themselves), skipped
            m.lerp_(g_rot, 1.0 - beta1)
            v.mul_(beta2).addcmul_(g_rot, g_rot, value=1.0 - beta2)
        else:
            ok_r = ok.reshape(shape)
            ok_f = ok_r.to(g.dtype)
            c_beta2, c_one = self._constants(g.dtype)
            g_rot.mul_(ok_f)
            # M ← β₁M + (1 − β₁)G' as one lerp; weight 0 (M unchanged) for a non-finite block
            m.lerp_(g_rot, ok_f * (1.0 - beta1))
            v.mul_(torch.where(ok_r, c_beta2, c_one)).addcmul_(g_rot, g_rot, value=1.0 - beta2)
        if index is not None:
            set_rows(self.exp_avg[gi], index, m)
            set_rows(self.exp_avg_sq[gi], index, v)
        t = rows(self.adam_steps[gi], index).add_(ok)  # +1 where finite (exact: counts)
        if index is not None:
            set_rows(self.adam_steps[gi], index, t)
        # N' = (M'/bc1) / (√(V/bc2) + ε) = (√bc2/bc1) · M' / (√V + ε√bc2): the corrections
        # are per-block scalars, folded into ε and one scaling; computed in g_rot's memory
        n = g_rot
        if self.config.correct_bias:
            root2 = (1.0 - torch.pow(beta2, t)).sqrt_().reshape(shape)
            bc1 = (1.0 - torch.pow(beta1, t)).reshape(shape)
            torch.sqrt(v, out=n).add_(root2 * self.config.eps)
            torch.div(m, n, out=n).mul_(root2.div_(bc1))
        else:
            torch.sqrt(v, out=n).add_(self.config.eps)
            torch.div(m, n, out=n)
        if not bases:
            return n if n.data_ptr() == g.data_ptr() else g.copy_(n)
        return _rotate(n, [q.mT for q in bases], out=g)

    def _constants(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``β₂, 1`` as 0-dim tensors of ``dtype`` (made once; no state)."""
        consts = self._consts.get(dtype)
        if consts is None:
            dev = self._params[0].device
            c = torch.tensor([self.config.betas[1], 1.0], dtype=dtype, device=dev)
            consts = self._consts[dtype] = (c[0], c[1])
        return consts

    # ---- statistics and bases ---------------------------------------------------------------
    def _fold_statistics(self, batches: list[GroupBatch | None]) -> None:
        beta = self.config.shampoo_beta
        updates: list[tuple[int, int, Tensor]] = []
        for gi, batch in enumerate(batches):
            if batch is None:
                continue
            updates.extend((gi, d, fibre_gram(batch.data, d)) for d in range(len(self.stats[gi])))
        # Gram matrices: finite exactly when their diagonals are
        flags = finite_flags([gram_diagonal(u) for _, _, u in updates])
        bad = {gi for (gi, _, _), ok in zip(updates, flags) if not ok}
        if bad:
            warn_once(
                "soap:stats",
                "SOAP: non-finite gradient statistics; their update was skipped (the previous "
                "statistics are kept).",
            )
        for gi, d, u in updates:
            if gi in bad:
                continue
            batch = batches[gi]
            assert batch is not None
            _ema_rows(self.stats[gi][d], batch.index, u, beta)

    def _power_step(self, n: int, items: list[tuple[int, int]]) -> None:
        stat = self._cat(self.stats, items)
        basis = self._cat(self.bases, items)
        lq = stat @ basis
        estimates = (basis * lq).sum(dim=-2)  # diag(Qᵀ L Q)
        order = torch.sort(estimates, dim=-1, descending=True, stable=True).indices
        lq = lq.gather(-1, order.unsqueeze(-2).expand_as(lq))
        q: Tensor | None
        try:
            # Q of QR(LQ) without forming R: the same Householder factorisation (bitwise equal
            # to torch.linalg.qr's Q), minus the triangular copy
            q = torch.linalg.householder_product(*torch.geqrf(lq))
        except RuntimeError:
            q = None
        if q is None or not finite_flags([q])[0]:
            dec = eigh_descending(stat, f"soap:eigh:{n}", "SOAP")
            q = None if dec is None else dec[1]
            warn_once(f"soap:qr:{n}", "SOAP: the QR power step failed; used eigh instead.")
        if q is not None:
            self._stage(items, q, order)

    def _cat(self, source: list[list[Any]], items: list[tuple[int, int]]) -> Tensor:
        parts = [source[gi][d] for gi, d in items]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _stage(self, items: list[tuple[int, int]], q: Tensor, order: Tensor | None) -> None:
        sizes = [self.layout.groups[gi].size for gi, _ in items]
        orders = [None] * len(sizes) if order is None else list(order.split(sizes))
        for (gi, d), new, perm in zip(items, q.split(sizes), orders):
            self._pending[(gi, d)] = (new.contiguous(), perm)

    def _switch_bases(self) -> None:
        """Install the staged bases: rotate ``M'`` exactly, permute ``V`` by the column order."""
        for (gi, d), (new, order) in self._pending.items():
            old = self.bases[gi][d]
            if old is not None:
                self.exp_avg[gi] = mode_product(self.exp_avg[gi], old.mT @ new, d)
            if order is not None:
                v = self.exp_avg_sq[gi]
                if order.shape[0] == 1:  # a lone block: index_select copies whole slices
                    self.exp_avg_sq[gi] = v[0].index_select(d, order[0]).unsqueeze(0)
                else:
                    shape = [order.shape[0]] + [1] * (v.dim() - 1)
                    shape[d + 1] = order.shape[1]
                    self.exp_avg_sq[gi] = v.gather(d + 1, order.reshape(shape).expand_as(v))
            self.bases[gi][d] = new
        self._pending.clear()

    # ---- state ------------------------------------------------------------------------------
    def preconditioner_state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            "stats": [[s.clone() for s in group] for group in self.stats],
            "bases": [[None if q is None else q.clone() for q in group] for group in self.bases],
            "exp_avg": [m.clone() for m in self.exp_avg],
            "exp_avg_sq": [v.clone() for v in self.exp_avg_sq],
            "adam_steps": [t.clone() for t in self.adam_steps],
        }

    def load_preconditioner_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        if [tuple(m.shape) for m in state["exp_avg"]] != [tuple(m.shape) for m in self.exp_avg]:
            raise invalid(
                "state",
                "SOAP moments",
                "Their shapes do not match this model's blocks (different model or "
                "merge_dims/block_size)",
            )
        self.stats = [[s.clone() for s in group] for group in state["stats"]]
        self.bases = [[None if q is None else q.clone() for q in group] for group in state["bases"]]
        self.exp_avg = [m.clone() for m in state["exp_avg"]]
        self.exp_avg_sq = [v.clone() for v in state["exp_avg_sq"]]
        self.adam_steps = [t.clone() for t in state["adam_steps"]]

    def cost_model(self) -> CostModel:
        """Unavoidable kernels: factor Grams, QR power steps, two rotations per step."""
        cm = CostModel(state_dtype=self._dtype)
        qr_count: dict[int, int] = {}
        rotation = 0
        for group in self.layout.groups:
            b, numel = group.size, math.prod(group.shape)
            cm.add(Phase.APPLY, "elementwise", (b * numel,), count=4)
            cm.state_numel += 2 * b * numel
            if not self._rotated(group):
                continue
            # a rotation holds the rotated block and, for blocks of order ≥ 2, the intermediate
            # of its mode products (groups are processed one after the other)
            rotation = max(rotation, (2 if group.order >= 2 else 1) * b * numel)
            for n in group.shape:
                rest = numel // n
                cm.add(Phase.CURVATURE, "bmm", (b, n, rest, n))
                cm.add(Phase.CURVATURE, "elementwise", (b * n * n,))  # the statistic's average
                cm.add(Phase.APPLY, "bmm", (b, rest, n, n), count=2)
                cm.add(Phase.REFRESH, "bmm", (b, rest, n, n))  # carry M' into the new basis
                cm.state_numel += 2 * b * n * n
                qr_count[n] = qr_count.get(n, 0) + b
        for n, count in qr_count.items():
            cm.add(Phase.REFRESH, "bmm", (count, n, n, n), count=2)  # L·Q and Q_oldᵀ·Q_new
            cm.add(Phase.REFRESH, "qr", (count, n))
        # A refresh stages every new basis (the step's direction is still computed with the
        # old ones, rotations included) and, per size, holds L·Q and the factorisation's output.
        staged = sum(count * n * n for n, count in qr_count.items())
        power = max((2 * count * n * n for n, count in qr_count.items()), default=0)
        cm.transient_numel = staged + max(power, rotation)
        return cm


def _ema_rows(state: Tensor, index: Tensor | None, value: Tensor, beta: float) -> None:
    """``state ← β·state + (1 − β)·value`` on the rows of a batch (in place when it has all).

    Args:
        state: ``[B, ...]``.
        index: The batch's rows (``None``: all).
        value: ``[B', ...]``.
        beta: The decay.
    """
    if index is None:
        state.lerp_(value, 1.0 - beta)  # one pass
        return
    new = rows(state, index).lerp_(value, 1.0 - beta)
    set_rows(state, index, new)


def _rotate(x: Tensor, bases: list[Tensor], out: Tensor | None = None) -> Tensor:
    """``x ×_1 Q_1ᵀ ×_2 Q_2ᵀ …``: coordinates of ``x`` in the bases (pass ``Qᵀ`` to go back).

    Args:
        x: ``[B, d_0, …]``.
        bases: One ``[B, d, d]`` per dimension of the blocks.
        out: Where the result goes (a tensor shaped like ``x``, not overlapping it); ``None``
            allocates.

    Returns:
        The rotated tensor (``out`` when given; ``x`` itself when ``bases`` is empty).
    """
    for d, q in enumerate(bases):
        last = d == len(bases) - 1
        if last and out is not None and d == x.dim() - 2 and out.is_contiguous():
            # the last mode is a plain batched product: written straight into ``out``
            b, n = x.shape[0], x.shape[-1]
            torch.bmm(x.reshape(b, -1, n), q, out=out.view(b, -1, n))
            return out
        x = mode_product(x, q, d)
    if out is not None and x.data_ptr() != out.data_ptr():
        return out.copy_(x)
    return x
