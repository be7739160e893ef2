r"""Shampoo: one Kronecker factor per tensor dimension (Gupta, Koren & Singer 2018).

Every trained parameter is viewed as a tensor (size-1 dimensions dropped, trailing dimensions
of kernels merged, large dimensions cut into blocks; see :mod:`._tensor_blocks`). For a block
``G`` of order ``k`` Shampoo keeps one statistic per dimension,

.. math::

    H_i \leftarrow \beta_2 H_i + (1 - \beta_2)\, G_{(i)} G_{(i)}^\top
    \qquad (\beta_2 = 1:\ H_i \leftarrow H_i + G_{(i)} G_{(i)}^\top,\ \text{AdaGrad-style sums}),

where ``G_(i)`` is the mode-``i`` unfolding, and preconditions with

.. math::

    P(G) = G \times_1 (H_1 + \epsilon I)^{-1/p} \times_2 \cdots \times_k (H_k + \epsilon I)^{-1/p},
    \qquad p = 2k,

i.e. ``L^{-1/4} G R^{-1/4}`` for a matrix and ``(Σ g gᵀ + εI)^{-1/2} g`` for a vector (bias,
norm gain). The damping ``ε`` (``damping / data_size``) enters only when the roots are taken:
the stored statistics never contain it. Roots come from batched eigendecompositions of all
factors of equal size.

**Grafting** (Anil et al. 2020): with ``grafting`` set, each parameter tensor's update has the
direction of ``P(G)`` and the norm of the grafted method's update ``A(G)``:
``D = P(G) · ‖A(G)‖ / ‖P(G)‖`` with ``A(g) = g`` (``sgd``), ``g / (√(Σ g²) + ε_g)``
(``adagrad``) or ``g / (√v̂ + ε_g)``, ``v ← β v + (1 − β) g²`` bias-corrected (``adam``).
The grafted method's statistics are updated on every step (element-wise work).

**Non-finite gradients**: on a curvature step where a group of equally shaped blocks has a
non-finite statistic, that group's statistics are not updated (host check, warned once); the
grafting accumulator of a parameter whose gradient is not finite is left unchanged on any step
(device-side guard, no host sync; Adam grafting's step counter still advances).

**Start-up**: before ``start_preconditioning_step`` the update is the grafted direction (the
plain gradient without grafting); statistics accumulate from step 0.

**Schedules**: the curvature schedule (``curvature_upd_interval``) folds the current gradient
into the statistics; the preconditioner schedule recomputes the roots; every other step only
multiplies by the stored roots. Shampoo needs gradients only, so every trained parameter of any
module is preconditioned (no capture adapter, no hooks).

References:
    V. Gupta, T. Koren, Y. Singer. Shampoo: Preconditioned Stochastic Tensor Optimization.
    ICML 2018. https://arxiv.org/abs/1802.09568

    R. Anil, V. Gupta, T. Koren, K. Regan, Y. Singer. Scalable Second Order Optimization for
    Deep Learning. 2020. https://arxiv.org/abs/2002.09018
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import LayerStats
from ..config import PreconditioningConfig
from ..linalg.solvers import gram_diagonal
from ..numerics import finite_flags, finite_sums, host_flags, warn_once
from ..registry import register_method
from ..validation import check_float, check_int, coerce_enum, invalid
from ._gradient_stats import (
    check_blocking,
    damped_eigh_,
    reject_ema_decay,
)
from ._tensor_blocks import (
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
from .cost import CostModel, Phase, eigh_workspace_numel

__all__ = ["Grafting", "ShampooConfig", "ShampooGradientMaker", "VectorFactor"]


class Grafting(str, Enum):
    """Whose per-tensor update norm Shampoo's direction takes."""

    NONE = "none"
    SGD = "sgd"
    ADAGRAD = "adagrad"
    ADAM = "adam"

    def __str__(self) -> str:
        return self.value


class VectorFactor(str, Enum):
    """The factor of order-1 blocks (biases, norm gains): a full matrix or its diagonal."""

    FULL = "full"
    DIAGONAL = "diagonal"

    def __str__(self) -> str:
        return self.value


@dataclass(kw_only=True)
class ShampooConfig(PreconditioningConfig):
    """Shampoo options (``damping`` is Shampoo's ``ε``, added to the factors' eigenvalues).

    Args:
        beta2: Decay of the statistics: 1 (default) sums them (AdaGrad-style), ``β₂ < 1``
            keeps an exponential moving average.
        exponent_override: Use ``(H + εI)^{-1/p}`` with this ``p`` for every factor instead of
            ``p = 2·order``.
        merge_dims: Largest dimension made by merging trailing dimensions of tensors of order
            ≥ 3 (``[C_out, C_in, k, k] → [C_out, C_in·k·k]``); ``None`` keeps all dimensions.
        block_size: Dimensions larger than this are cut into blocks with their own factors;
            ``None`` never blocks.
        vector_factor: ``full`` (a ``d × d`` factor per vector block) or ``diagonal``.
        grafting: ``adagrad`` (default), ``adam``, ``sgd`` or ``none``.
        graft_beta2: Second-moment decay of Adam grafting.
        graft_epsilon: ``ε_g`` of AdaGrad and Adam grafting.
        start_preconditioning_step: Steps before this one use the grafted (or plain)
            gradient.
    """

    damping: float = 1e-6
    beta2: float = 1.0
    exponent_override: int | None = None
    merge_dims: int | None = 1024
    block_size: int | None = 1024
    vector_factor: VectorFactor | str = VectorFactor.FULL
    grafting: Grafting | str = Grafting.ADAGRAD
    graft_beta2: float = 0.999
    graft_epsilon: float = 1e-8
    start_preconditioning_step: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("damping", self.damping, minimum=0.0, strict_min=True)
        check_float("beta2", self.beta2, minimum=0.0, maximum=1.0, strict_min=True)
        if self.exponent_override is not None:
            check_int("exponent_override", self.exponent_override, minimum=1)
        check_blocking(self.merge_dims, self.block_size)
        self.vector_factor = coerce_enum(VectorFactor, self.vector_factor, "vector_factor")
        self.grafting = coerce_enum(Grafting, self.grafting, "grafting")
        check_float("graft_beta2", self.graft_beta2, minimum=0.0, maximum=1.0, strict_max=True)
        check_float("graft_epsilon", self.graft_epsilon, minimum=0.0, strict_min=True)
        check_int("start_preconditioning_step", self.start_preconditioning_step, minimum=0)
        reject_ema_decay(self.ema_decay, "Shampoo", "beta2")


@register_method(
    "shampoo",
    "Shampoo: a Kronecker factor per tensor dimension, inverse roots, grafting (Gupta et al. 2018)",
    family="global",
)
class ShampooGradientMaker(PreconditionedGradientMaker):
    """Shampoo gradient maker (see the module docstring for the update and references).

    Args:
        model: The model.
        config: :class:`ShampooConfig`.

    Attributes:
        layout: The blocks of every trained parameter, grouped by shape.
        stats: Per group, one statistic per block dimension (``[B, n, n]``, or ``[B, n]`` for
            diagonal vector factors).
        roots: Per group and dimension, the inverse roots (``None`` before the first refresh).
    """

    config_class = ShampooConfig
    config: ShampooConfig
    needs_adapter = False

    def __init__(self, model: nn.Module, config: ShampooConfig | None = None) -> None:
        super().__init__(model, config)
        cfg = self.config
        self._params: list[nn.Parameter] = [p for layer in self.layers for p in layer.params]
        self._dtype = stats_dtype(
            torch.float64 if any(p.dtype == torch.float64 for p in self._params) else torch.float32
        )
        device = self._params[0].device
        views = [merge_shape(p.shape, cfg.merge_dims) for p in self._params]
        self.layout = BlockLayout(views, cfg.block_size)
        self.stats: list[list[Tensor]] = []
        for group in self.layout.groups:
            b = group.size
            if self._diagonal(group.order):
                self.stats.append(
                    [torch.zeros(b, group.shape[0], dtype=self._dtype, device=device)]
                )
            else:
                self.stats.append(
                    [torch.zeros(b, n, n, dtype=self._dtype, device=device) for n in group.shape]
                )
        self.roots: list[list[Tensor | None]] = [[None] * len(s) for s in self.stats]
        self._graft: list[Tensor | None] = [None] * len(self._params)
        self._graft_steps = [0] * len(self._params)
        self._graft_work: list[Tensor] = []
        self._batches: list[GroupBatch | None] | None = None

    # ---- helpers ----------------------------------------------------------------------------
    def _diagonal(self, order: int) -> bool:
        return order == 1 and self.config.vector_factor is VectorFactor.DIAGONAL

    def _exponent(self, order: int) -> float:
        p = self.config.exponent_override or 2 * order
        return -1.0 / p

    # ---- the three verbs --------------------------------------------------------------------
    def update_curvature(self, stats: Mapping[str, LayerStats]) -> None:  # noqa: D102
        self._graft_work = []  # the grafting's buffers: not held through the statistics' peak
        batches = self.layout.gather([p.grad for p in self._params], self._dtype)
        self._batches = batches  # reused by precondition() on this step
        updates: list[tuple[int, int, Tensor]] = []
        checks: list[Tensor] = []  # what decides whether each update is finite
        for gi, (group, batch) in enumerate(zip(self.layout.groups, batches)):
            if batch is None:
                continue
            if self._diagonal(group.order):
                updates.append((gi, 0, batch.data.square()))
                checks.append(updates[-1][2])
            else:
                for d in range(group.order):
                    updates.append((gi, d, fibre_gram(batch.data, d)))
                    # a Gram matrix is finite exactly when its diagonal is
                    checks.append(gram_diagonal(updates[-1][2]))
        flags = finite_flags(checks)
        bad = {gi for (gi, _, _), ok in zip(updates, flags) if not ok}
        if bad:
            warn_once(
                "shampoo:stats",
                "Shampoo: non-finite gradient statistics; their update was skipped (the "
                "previous statistics are kept).",
            )
        beta2 = self.config.beta2
        for gi, d, u in updates:
            if gi in bad:
                continue
            batch = batches[gi]
            assert batch is not None
            stat = self.stats[gi][d]
            if batch.index is None:
                if beta2 == 1.0:
                    stat.add_(u)
                else:
                    stat.lerp_(u, 1.0 - beta2)  # one pass
                continue
            old = rows(stat, batch.index)
            new = old.add_(u) if beta2 == 1.0 else old.lerp_(u, 1.0 - beta2)  # old: a copy
            set_rows(stat, batch.index, new)

    def update_preconditioner(self) -> None:  # noqa: D102
        self._graft_work = []  # nor through the refresh's (its eigendecompositions)
        start = self.config.start_preconditioning_step
        step = self._step
        schedule = self.preconditioner_schedule
        if step < start and any(schedule.is_update_step(s) for s in range(step + 1, start + 1)):
            return  # a later refresh comes before these roots would be used
        eps = self.damping
        by_size: dict[int, list[tuple[int, int]]] = {}
        for gi, group in enumerate(self.layout.groups):
            if self._diagonal(group.order):
                self.roots[gi][0] = (self.stats[gi][0] + eps).pow(self._exponent(1))
                continue
            for d, n in enumerate(group.shape):
                by_size.setdefault(n, []).append((gi, d))
        for n, items in by_size.items():
            mats = [self.stats[gi][d] for gi, d in items]
            # one working copy (the damped matrices), one batched eigh per size
            work = torch.cat(mats) if len(mats) > 1 else mats[0].clone()
            dec = damped_eigh_(work, eps)
            if dec is None:
                warn_once(
                    f"shampoo:eigh:{n}",
                    f"Shampoo: eigendecomposition of the {n}×{n} factors failed; keeping the "
                    "previous roots (identity if there are none).",
                )
                continue
            sizes = [m.shape[0] for m in mats]
            del mats
            for (gi, d), evals, evecs, scratch in zip(
                items, dec[0].split(sizes), dec[1].split(sizes), work.split(sizes), strict=True
            ):
                self.roots[gi][d] = _root(
                    evals,
                    evecs,
                    self._exponent(self.layout.groups[gi].order),
                    scratch,
                    self.roots[gi][d],
                )
            # views of the decomposition included: freed before the next size's working copy
            del dec, work, evals, evecs, scratch

    def precondition(self) -> None:  # noqa: D102
        batches, self._batches = self._batches, None
        directions: list[Tensor | None] = [None] * len(self._params)
        if self._step >= self.config.start_preconditioning_step:
            directions = self._shampoo_directions(batches)
        # The grafted norms first: they read p.grad, which the directions then replace.
        norms = self._grafted_norms([p.grad for p in self._params], [d is None for d in directions])
        grads: list[Tensor] = []
        dirs: list[Tensor] = []
        grafted: list[Tensor] = []
        for p, d, norm in zip(self._params, directions, norms):
            if p.grad is None or d is None:
                continue
            d = d.reshape(p.grad.shape)
            if norm is None:
                p.grad.copy_(d)
                continue
            grads.append(p.grad)
            dirs.append(d)
            grafted.append(norm)
        if grads:
            # each direction rescaled to its grafted norm, all tensors at once, in place: a
            # direction is this step's own tensor, or p.grad itself where no root applied
            own = torch.stack(torch._foreach_norm(dirs))
            tiny = torch.finfo(own.dtype).tiny
            scales = (torch.stack(grafted).to(own.dtype) / own.clamp_min(tiny)).unbind()
            big, small = _split_by_size(grads)
            for k in big:  # one pass each (a direction may be p.grad itself)
                torch.mul(dirs[k], scales[k], out=grads[k])
            if small:  # two passes, one call each for all
                torch._foreach_mul_([dirs[k] for k in small], [scales[k] for k in small])
                torch._foreach_copy_([grads[k] for k in small], [dirs[k] for k in small])

    def _shampoo_directions(self, batches: list[GroupBatch | None] | None) -> list[Tensor | None]:
        if all(r is None for rs in self.roots for r in rs):
            return [None] * len(self._params)
        if batches is None:
            batches = self.layout.gather([p.grad for p in self._params], self._dtype)
        for gi, (group, batch) in enumerate(zip(self.layout.groups, batches)):
            if batch is None:
                continue
            y = batch.data  # may be a view of p.grad: never written in place
            for d, root in enumerate(self.roots[gi]):
                if root is None:
                    continue  # identity until the first successful refresh
                r = rows(root, batch.index)
                y = y * r if self._diagonal(group.order) else mode_product(y, r, d)
            batch.data = y
        return self.layout.scatter(batches, [p.shape for p in self._params])

    def _grafted_norms(self, grads: list[Tensor | None], write: list[bool]) -> list[Tensor | None]:
        """The grafted updates' norms ``‖A(g)‖``, updating the grafting accumulators.

        All parameters at once (foreach kernels, no per-parameter Python). Where ``write``
        (no Shampoo direction for that parameter on this step) ``A(g)`` itself replaces
        ``p.grad`` instead and its norm is ``None``; ``None`` everywhere without grafting.
        """
        kind = self.config.grafting
        out: list[Tensor | None] = [None] * len(grads)
        idx = [i for i, g in enumerate(grads) if g is not None]
        grad = [g for g in grads if g is not None]
        if kind is Grafting.NONE or not idx:
            return out
        gs = [g if g.dtype == self._dtype else g.to(self._dtype) for g in grad]
        if kind is Grafting.SGD:
            keep = [k for k, i in enumerate(idx) if not write[i]]
            for k, n in zip(keep, torch._foreach_norm([gs[k] for k in keep]) if keep else []):
                out[idx[k]] = n
            return out
        states: list[Tensor] = []
        for i, g in zip(idx, gs):
            state = self._graft[i]
            if state is None:
                state = self._graft[i] = torch.zeros_like(g)
            states.append(state)
        # A non-finite gradient leaves its accumulator unchanged (device-side, no host sync):
        # its square enters with weight 0, and its non-finite entries are zeroed first. The
        # work buffers are kept between steps: allocated on every step, the large ones cost
        # their page faults (a `torch.where` into a fresh 512 × 784 tensor took 157 µs inside
        # the step, 94 alone; its non-finite entries zeroed and the flag applied into a kept
        # buffer, 36 µs: `where` is the slower kernel even into a kept buffer).
        finite = finite_sums(gs)
        work = self._graft_buffers(gs)
        # Where the flags can be read for free (a CPU, see host_flag), a finite gradient
        # enters its square as it is (zeroing nothing and multiplying by 1 are exact no-ops:
        # two passes saved); elsewhere the flags stay on the device.
        known = host_flags(finite)
        if known is not None and all(known):
            squared = list(gs)
        else:
            squared = []
            for k, (f, g, w) in enumerate(zip(finite.unbind(), gs, work)):
                if known is not None and known[k]:
                    squared.append(g)
                else:
                    squared.append(torch.nan_to_num(g, 0.0, 0.0, 0.0, out=w).mul_(f))
        # A(g) = g / (√ŝ + ε) with ŝ = s / c (c = 1 for AdaGrad, Adam's bias correction
        # otherwise) is computed as √c · g / (√s + ε√c): the correction is a scalar folded
        # into ε and into the norm (and the written direction), not a pass over s.
        roots: list[float] = [1.0] * len(idx)
        if kind is Grafting.ADAGRAD:
            torch._foreach_addcmul_(states, squared, squared)
        else:
            beta = self.config.graft_beta2
            decay = list((1.0 - (1.0 - beta) * finite.to(gs[0].dtype)).unbind())
            # β where finite, 1 (unchanged) elsewhere
            torch._foreach_mul_(states, decay)
            torch._foreach_addcmul_(states, squared, squared, value=1.0 - beta)
            for k, i in enumerate(idx):
                self._graft_steps[i] += 1
                roots[k] = math.sqrt(1.0 - beta ** self._graft_steps[i])
        eps = self.config.graft_epsilon
        big, small = _split_by_size(gs)
        for k in big:  # three passes each
            torch.sqrt(states[k], out=work[k]).add_(eps * roots[k])
            torch.div(gs[k], work[k], out=work[k])
        if small:  # five passes, one call each for all
            ws = [work[k] for k in small]
            torch._foreach_copy_(ws, [states[k] for k in small])
            torch._foreach_sqrt_(ws)
            torch._foreach_add_(ws, [eps * roots[k] for k in small])
            torch._foreach_reciprocal_(ws)
            torch._foreach_mul_(ws, [gs[k] for k in small])
        norms = torch._foreach_norm(work)
        for k, i in enumerate(idx):
            root = roots[k]
            if write[i] and root == 1.0:
                grad[k].copy_(work[k])
            elif write[i]:
                torch.mul(work[k], root, out=grad[k])
            else:
                out[i] = norms[k] if root == 1.0 else norms[k] * root
        return out

    def _graft_buffers(self, like: list[Tensor]) -> list[Tensor]:
        """Work buffers shaped like ``like`` (kept between idle steps; not state).

        Dropped on curvature and refresh steps, whose peaks they would otherwise add to
        (mlp512: 2.6 MB on a 38 MB peak).
        """
        bufs = self._graft_work
        if len(bufs) != len(like) or any(
            b.shape != t.shape or b.dtype != t.dtype or b.device != t.device
            for b, t in zip(bufs, like)
        ):
            bufs = self._graft_work = [torch.empty_like(t) for t in like]
        return bufs

    # ---- state ------------------------------------------------------------------------------
    def preconditioner_state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            "stats": [[s.clone() for s in group] for group in self.stats],
            "roots": [[None if r is None else r.clone() for r in group] for group in self.roots],
            "graft": [None if s is None else s.clone() for s in self._graft],
            "graft_steps": list(self._graft_steps),
        }

    def load_preconditioner_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        stats = state["stats"]
        shapes = [[tuple(s.shape) for s in group] for group in self.stats]
        if [[tuple(s.shape) for s in group] for group in stats] != shapes:
            raise invalid(
                "state",
                "Shampoo statistics",
                "Their shapes do not match this model's blocks (different model or "
                "merge_dims/block_size)",
            )
        self.stats = [[s.clone() for s in group] for group in stats]
        self.roots = [[None if r is None else r.clone() for r in group] for group in state["roots"]]
        self._graft = [None if s is None else s.clone() for s in state["graft"]]
        self._graft_steps = [int(s) for s in state["graft_steps"]]

    def cost_model(self) -> CostModel:
        """Unavoidable kernels: factor Grams, batched eigh per factor size, mode products."""
        cm = CostModel(state_dtype=self._dtype)
        eigh_count: dict[int, int] = {}
        for group in self.layout.groups:
            b, numel = group.size, math.prod(group.shape)
            if self._diagonal(group.order):
                cm.add(Phase.CURVATURE, "elementwise", (b * numel,))
                cm.add(Phase.REFRESH, "elementwise", (b * numel,))
                cm.add(Phase.APPLY, "elementwise", (b * numel,))
                cm.state_numel += 2 * b * numel
                continue
            for n in group.shape:
                rest = numel // n
                cm.add(Phase.CURVATURE, "bmm", (b, n, rest, n))
                cm.add(Phase.CURVATURE, "elementwise", (b * n * n,))  # folded into the statistic
                cm.add(Phase.APPLY, "bmm", (b, rest, n, n))
                cm.state_numel += 2 * b * n * n
                eigh_count[n] = eigh_count.get(n, 0) + b
        for n, count in eigh_count.items():
            cm.add(Phase.REFRESH, "eigh", (count, n))
            cm.add(Phase.REFRESH, "bmm", (count, n, n, n))
            # the new eigenvectors exist next to the previous roots (kept if eigh fails), with
            # the decomposition's workspace
            eigh_numel = count * n * n + eigh_workspace_numel(n)
            cm.transient_numel = max(cm.transient_numel, eigh_numel)
        numel = sum(p.numel() for p in self._params)
        if self.config.grafting is Grafting.SGD:
            # the two norms, then the rescaled direction written out
            cm.add(Phase.APPLY, "elementwise", (2 * numel,))
        elif self.config.grafting is not Grafting.NONE:
            # accumulator update (reads g and the state, writes it), the norm of A(g) (reads
            # both again) and the rescaled direction written out
            cm.add(Phase.APPLY, "elementwise", (3 * numel,))
            cm.state_numel += numel
        return cm


#: Elements from which a tensor's element-wise grafting work is done with its own calls into
#: kept buffers (fewer passes); smaller tensors share ``torch._foreach_*`` calls (one call for
#: all of them however many there are: per-tensor calls would cost their dispatch, on an
#: accelerator their launch, per parameter).
PER_TENSOR_NUMEL = 1 << 16


def _split_by_size(tensors: list[Tensor]) -> tuple[list[int], list[int]]:
    """Indices of the tensors with at least :data:`PER_TENSOR_NUMEL` elements, and the others."""
    big = [k for k, t in enumerate(tensors) if t.numel() >= PER_TENSOR_NUMEL]
    return big, [k for k, t in enumerate(tensors) if t.numel() < PER_TENSOR_NUMEL]


def _root(
    evals: Tensor, evecs: Tensor, power: float, scratch: Tensor, old: Tensor | None
) -> Tensor:
    """``Q diag(λ^p) Qᵀ`` (:func:`~precond.linalg.solvers.psd_power` without temporaries).

    The scaled eigenvectors overwrite ``scratch`` (the decomposed working copy, no longer
    needed) and the root overwrites the previous root ``old`` where there is one (only after
    the decomposition succeeded, so a failure still keeps it).
    """
    scaled = torch.mul(evecs, evals.pow(power).unsqueeze(-2), out=scratch)
    if old is None or old.shape != scaled.shape or old.dtype != scaled.dtype:
        return scaled @ evecs.transpose(-1, -2)
    return torch.matmul(scaled, evecs.transpose(-1, -2), out=old)
