r"""Muon: momentum orthogonalised by Newton–Schulz iterations (Jordan et al. 2024).

For every matrix-shaped parameter (convolution kernels are viewed as
``[C_out, C_in·k·k]``), with gradient ``G`` and momentum buffer ``B``:

.. math::

    B \leftarrow \mu B + G, \qquad
    U = G + \mu B \ \ (\text{Nesterov}) \ \text{ or } \ U = B, \qquad
    D = s \cdot \mathrm{NS}(U) \approx s \cdot U_{\text{polar}} = s\, \mathcal{U} \mathcal{V}^\top

where ``U = 𝒰 Σ 𝒱ᵀ`` and ``NS`` runs ``ns_steps`` Newton–Schulz iterations on
``X₀ = U / ‖U‖_F`` (transposed first when it has more rows than columns):

* ``quintic`` (default, Jordan's coefficients ``(a, b, c) = (3.4445, −4.7750, 2.0315)``):
  ``X ← a X + (b A + c A²) X`` with ``A = X Xᵀ``. It does not converge: after a few steps the
  singular values lie in about ``[0.68, 1.2]``, which is all Muon needs and is fast.
* ``cubic``: ``X ← 1.5 X − 0.5 A X``, which converges to the exact polar factor ``𝒰𝒱ᵀ`` (slowly
  for small singular values; use many steps).

The scale ``s`` depends on the shape ``rows × cols`` of the matrix:

* ``rms`` (default; Liu et al. 2025): ``s = rms_target · √max(rows, cols)``, so the update's
  RMS is ``rms_target`` (0.2 ≈ AdamW's typical update RMS): one learning rate fits Muon and the
  Adam fallback.
* ``shape`` (Jordan's): ``s = √max(1, rows / cols)``.
* ``none``: ``s = 1``.

**The rest** (declared rule): parameters with fewer than two dimensions of size > 1 (biases,
norm gains, scalars) and every parameter of the modules in ``fallback_modules`` (default: all
``nn.Embedding`` modules; add the output head, e.g. ``fallback_modules=[nn.Embedding,
"head"]``) are not orthogonalised. They get the ``fallback`` rule:

* ``adam`` (default): ``m̂ / (√v̂ + ε)`` with ``adam_betas``, ``adam_eps`` and bias correction;
* ``momentum``: the same (Nesterov) momentum as the matrices, not orthogonalised;
* ``plain``: the gradient unchanged.

**Interaction with the user's optimizer**: precond writes ``D`` into ``p.grad`` and the user's
``torch.optim.SGD(lr)`` applies it. Muon's momentum and the fallback's Adam moments live inside
the gradient maker (its state), so use **SGD without momentum**. Muon keeps no curvature: the
curvature and preconditioner schedules have nothing to update, and all work (momentum,
Newton–Schulz) happens on every step, batched over parameters of equal shape.

**Non-finite gradients**: a parameter whose gradient is not finite on a step keeps its momentum
buffer (and Adam moments) unchanged, checked on the device without a host sync; the Adam step
counter still advances.

References:
    K. Jordan, Y. Jin, V. Boza, J. You, F. Cesista, L. Newhouse, J. Bernstein. Muon: An
    optimizer for hidden layers in neural networks. 2024.
    https://kellerjordan.github.io/posts/muon/

    J. Liu et al. Muon is Scalable for LLM Training. 2025. https://arxiv.org/abs/2502.16982
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import LayerStats
from ..config import (
    IgnoreSpec,
    PreconditioningConfig,
    matches_with_ancestors,
    module_specs,
)
from ..numerics import finite_sums, host_flags
from ..registry import register_method
from ..validation import check_float, check_int, coerce_enum, invalid
from ._gradient_stats import (
    check_betas,
    check_bool,
    finite_rows,
    keep_where_,
    reject_ema_decay,
)
from ._tensor_blocks import BlockLayout, GroupBatch, rows, set_rows, stats_dtype
from .base import PreconditionedGradientMaker
from .cost import CostModel, Phase

__all__ = [
    "MuonConfig",
    "MuonFallback",
    "MuonGradientMaker",
    "MuonScale",
    "NewtonSchulz",
    "newton_schulz",
    "orthogonalise_",
]

#: Jordan's quintic coefficients (a, b, c).
QUINTIC = (3.4445, -4.7750, 2.0315)
#: Largest total size of the fallback parameters updated as one flat tensor (the flat update
#: saves per-tensor kernels on many small tensors, e.g. biases; its temporaries span them all,
#: so large tensors such as embeddings keep the per-tensor loop).
FLAT_FALLBACK_MAX = 1 << 18


class NewtonSchulz(str, Enum):
    """The Newton–Schulz iteration."""

    QUINTIC = "quintic"
    CUBIC = "cubic"

    def __str__(self) -> str:
        return self.value


class MuonScale(str, Enum):
    """Shape-dependent scale of the orthogonalised update."""

    RMS = "rms"
    SHAPE = "shape"
    NONE = "none"

    def __str__(self) -> str:
        return self.value


class MuonFallback(str, Enum):
    """What parameters that are not orthogonalised get."""

    ADAM = "adam"
    MOMENTUM = "momentum"
    PLAIN = "plain"

    def __str__(self) -> str:
        return self.value


def newton_schulz(
    x: Tensor, steps: int, iteration: NewtonSchulz | str = NewtonSchulz.QUINTIC
) -> Tensor:
    """Approximate the polar factor ``𝒰𝒱ᵀ`` of each matrix ``x = 𝒰Σ𝒱ᵀ`` (batched).

    Args:
        x: ``[..., m, n]``.
        steps: Number of iterations.
        iteration: ``quintic`` (Jordan's coefficients) or ``cubic`` (converging).

    Returns:
        ``[..., m, n]``, same dtype.
    """
    work = x.reshape(-1, *x.shape[-2:]).clone()
    return orthogonalise_(work, steps, NewtonSchulz(iteration)).reshape(x.shape)


def orthogonalise_(x: Tensor, steps: int, iteration: NewtonSchulz, scale: float = 1.0) -> Tensor:
    """``scale · NS(x)`` for a batch ``x`` of matrices, which is overwritten (its workspace).

    The iteration ping-pongs between ``x`` and one buffer of its size, arranged so that the
    result lands in ``x``; the Gram matrix ``A`` and the quintic's polynomial
    ``P = a I + b A + c A²`` (``m × m``, ``m`` the smaller side) are the rest of the workspace,
    allocated once. Each iteration is then ``X ← P X``, one plain product: ``a X`` as a term of
    ``P`` (on its diagonal) is an ``m``-element pass, where ``a X + (b A + c A²) X`` as one
    ``baddbmm`` also reads and scales the ``m × n`` iterate (on the 2-core CPU of the benchmarks
    the two took the same time within noise at ``512 × 784``; the product alone is what the cost
    floor prices). The cubic iteration is ``X ← (3/2 I − 1/2 A) X`` the same way. The scale is
    folded into the last iteration's polynomial.

    Args:
        x: ``[B, m, n]``, overwritten.
        steps: Number of iterations (at least one).
        iteration: ``quintic`` or ``cubic``.
        scale: Factor of the result.

    Returns:
        ``x``, holding the result.
    """
    tall = x.shape[-2] > x.shape[-1]
    cur = x.mT if tall else x
    other = torch.empty_like(cur)
    norm = torch.linalg.matrix_norm(cur, keepdim=True).add_(1e-7)
    if steps % 2:
        # start in the buffer, so that the last iteration writes into x
        torch.div(cur, norm, out=other)
        cur, other = other, cur
    else:
        cur.div_(norm)
    b, m = cur.shape[0], cur.shape[1]
    gram = cur.new_empty(b, m, m)
    poly = cur.new_empty(b, m, m) if iteration is NewtonSchulz.QUINTIC else gram
    qa, qb, qc = QUINTIC
    diagonal = poly.diagonal(dim1=-2, dim2=-1)
    for k in range(steps):
        s = scale if k == steps - 1 else 1.0
        torch.bmm(cur, cur.mT, out=gram)
        if iteration is NewtonSchulz.QUINTIC:
            torch.baddbmm(gram, gram, gram, beta=qb * s, alpha=qc * s, out=poly)  # s(bA + cA²)
            diagonal.add_(qa * s)  # + s·a·I
        else:
            gram.mul_(-0.5 * s)
            diagonal.add_(1.5 * s)  # s(3/2 I − 1/2 A), in the Gram matrix's memory
        torch.bmm(poly, cur, out=other)
        cur, other = other, cur
    return cur.mT if tall else cur


@dataclass(kw_only=True)
class MuonConfig(PreconditioningConfig):
    """Muon options (``damping`` and the schedules are not used).

    Args:
        momentum: ``μ``.
        nesterov: Use ``G + μB`` instead of ``B``.
        ns_steps: Newton–Schulz iterations.
        ns_iteration: ``quintic`` (default) or ``cubic``.
        scale: ``rms`` (default, Liu et al.), ``shape`` (Jordan) or ``none``.
        rms_target: The update RMS of the ``rms`` scale.
        fallback: Rule for the parameters that are not orthogonalised: ``adam`` (default),
            ``momentum`` or ``plain``.
        fallback_modules: Modules whose parameters always take the fallback rule: module
            objects, classes or qualified-name patterns (a module matches if it or an ancestor
            does). Default: ``(nn.Embedding,)``.
        adam_betas: ``(β₁, β₂)`` of the Adam fallback.
        adam_eps: ``ε`` of the Adam fallback.
    """

    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_iteration: NewtonSchulz | str = NewtonSchulz.QUINTIC
    scale: MuonScale | str = MuonScale.RMS
    rms_target: float = 0.2
    fallback: MuonFallback | str = MuonFallback.ADAM
    fallback_modules: Sequence[IgnoreSpec] = field(default_factory=lambda: (nn.Embedding,))
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("momentum", self.momentum, minimum=0.0, maximum=1.0, strict_max=True)
        check_bool("nesterov", self.nesterov)
        check_int("ns_steps", self.ns_steps, minimum=1)
        self.ns_iteration = coerce_enum(NewtonSchulz, self.ns_iteration, "ns_iteration")
        self.scale = coerce_enum(MuonScale, self.scale, "scale")
        check_float("rms_target", self.rms_target, minimum=0.0, strict_min=True)
        self.fallback = coerce_enum(MuonFallback, self.fallback, "fallback")
        self.fallback_modules = module_specs("fallback_modules", self.fallback_modules)
        self.adam_betas = check_betas("adam_betas", self.adam_betas)
        check_float("adam_eps", self.adam_eps, minimum=0.0, strict_min=True)
        reject_ema_decay(self.ema_decay, "Muon", "momentum (or adam_betas for the fallback)")

    def in_fallback(self, model: nn.Module, name: str) -> bool:
        """Whether module ``name`` of ``model`` (or an ancestor) matches ``fallback_modules``.

        Args:
            model: The model.
            name: Qualified module name.

        Returns:
            ``True`` if its parameters take the fallback rule.
        """
        return matches_with_ancestors(self.fallback_modules, model, name)


def _matrix_view(shape: torch.Size) -> tuple[int, int] | None:
    if len(shape) < 2:
        return None
    rows_, cols = shape[0], math.prod(shape[1:])
    return (rows_, cols) if min(rows_, cols) > 1 else None


@register_method(
    "muon",
    "Muon: Newton-Schulz-orthogonalised momentum for matrices, Adam for the rest (Jordan 2024)",
    family="global",
)
class MuonGradientMaker(PreconditionedGradientMaker):
    """Muon gradient maker (update, rule for the other parameters, references: module docstring).

    Use it with ``torch.optim.SGD(params, lr)`` **without momentum**.

    Args:
        model: The model.
        config: :class:`MuonConfig`.

    Attributes:
        matrix_params: Parameters that are orthogonalised.
        fallback_params: Parameters that take the fallback rule.
        layout: The matrix views, grouped by shape.
        momentum: Per group, the momentum buffers ``[B, rows, cols]``.
    """

    config_class = MuonConfig
    config: MuonConfig
    needs_adapter = False

    def __init__(self, model: nn.Module, config: MuonConfig | None = None) -> None:
        super().__init__(model, config)
        cfg = self.config
        self.matrix_params: list[nn.Parameter] = []
        self.fallback_params: list[nn.Parameter] = []
        views: list[tuple[int, int]] = []
        for layer in self.layers:
            fallback = cfg.in_fallback(model, layer.name)
            for p in layer.params:
                view = None if fallback else _matrix_view(p.shape)
                if view is None:
                    self.fallback_params.append(p)
                else:
                    self.matrix_params.append(p)
                    views.append(view)
        every = self.matrix_params + self.fallback_params
        self._dtype = stats_dtype(
            torch.float64 if any(p.dtype == torch.float64 for p in every) else torch.float32
        )
        self.layout = BlockLayout(views, None)
        kw: dict[str, Any] = {"dtype": self._dtype, "device": every[0].device}
        self.momentum = [torch.zeros(g.size, *g.shape, **kw) for g in self.layout.groups]
        self._fallback_state: list[list[Tensor]] = [[] for _ in self.fallback_params]
        self._fallback_steps = [0] * len(self.fallback_params)
        # the fallback state as flat buffers (views of them per parameter), once packed
        self._flat_state: list[Tensor] | None = None
        #: The momentum decay per state dtype (see _decay; a cache, not state).
        self._decays: dict[torch.dtype, float] = {}
        #: Elements per fallback parameter (on the device), once packed.
        self._flat_sizes: Tensor | None = None
        self._fallback_numel = sum(p.numel() for p in self.fallback_params)

    def update_curvature(self, stats: Mapping[str, LayerStats]) -> None:
        """Nothing to do: Muon keeps no curvature."""

    def update_preconditioner(self) -> None:
        """Nothing to do: Muon keeps no curvature."""

    def precondition(self) -> None:  # noqa: D102
        cfg = self.config
        batches = self.layout.gather([p.grad for p in self.matrix_params], self._dtype)
        shapes = [p.shape for p in self.matrix_params]
        none: list[GroupBatch | None] = [None] * len(batches)
        for gi, (group, batch) in enumerate(zip(self.layout.groups, batches)):
            if batch is None:
                continue
            u = self._momentum_(gi, batch)
            iteration = NewtonSchulz(cfg.ns_iteration)
            o = orthogonalise_(u, cfg.ns_steps, iteration, self._scale(*group.shape))
            # each group is written out before the next one's workspace is taken
            out = GroupBatch(o, batch.index, batch.present)
            directions = self.layout.scatter([*none[:gi], out, *none[gi + 1 :]], shapes)
            for p, d in zip(self.matrix_params, directions):
                if p.grad is not None and d is not None and d.data_ptr() != p.grad.data_ptr():
                    p.grad.copy_(d)
        if self.config.fallback is MuonFallback.PLAIN:
            return  # the gradient unchanged
        grads = [p.grad for p in self.fallback_params]
        if self._fallback_flat_ok(grads):
            self._fallback_flat([g for g in grads if g is not None])
            return
        for i, p in enumerate(self.fallback_params):
            if p.grad is not None:
                p.grad.copy_(self._fallback(i, p.grad.to(self._dtype)))

    def _momentum_(self, gi: int, batch: GroupBatch) -> Tensor:
        """``B ← μB + G``; returns ``U`` (Nesterov ``G + μB``, else ``B``) in ``G``'s memory.

        ``batch.data`` is the gradients' own memory or a stacked copy: either may be
        overwritten, since the direction replaces ``p.grad``. A matrix whose gradient is not
        finite keeps its buffer (device-side, no host sync); its ``U`` uses the gradient with
        the non-finite entries zeroed.
        """
        mu = self.config.momentum
        g = batch.data
        flags = finite_rows(g)
        buf = rows(self.momentum[gi], batch.index)
        known = host_flags(flags)
        if known is not None and all(known):
            # every matrix finite, read for free (a CPU, see host_flag): the zeroing pass and
            # the per-matrix weights are exact no-ops; the decay is the value the device-side
            # selection computes for a finite matrix, bit for bit
            buf.mul_(self._decay(g.dtype)).add_(g)
        else:
            ok = flags.to(g.dtype).reshape(-1, 1, 1)
            g.nan_to_num_(0.0, 0.0, 0.0)
            buf.mul_(1.0 - (1.0 - mu) * ok)  # μ where finite, 1 (unchanged) elsewhere
            buf.addcmul_(g, ok)
        if batch.index is not None:
            set_rows(self.momentum[gi], batch.index, buf)
        return g.add_(buf, alpha=mu) if self.config.nesterov else g.copy_(buf)

    def _decay(self, dtype: torch.dtype) -> float:
        """``1 − (1 − μ)·1`` rounded as in ``dtype`` (the device-side selection's finite value).

        Computed once per dtype (a cache, not state).
        """
        decay = self._decays.get(dtype)
        if decay is None:
            one = torch.ones((), dtype=dtype)
            decay = self._decays[dtype] = float(1.0 - (1.0 - self.config.momentum) * one)
        return decay

    def _scale(self, rows_: int, cols: int) -> float:
        kind = self.config.scale
        if kind is MuonScale.RMS:
            return self.config.rms_target * math.sqrt(max(rows_, cols))
        if kind is MuonScale.SHAPE:
            return math.sqrt(max(1.0, rows_ / cols))
        return 1.0

    def _fallback_flat_ok(self, grads: list[Tensor | None]) -> bool:
        """Whether all fallback parameters step together (one flat update, no per-tensor loop).

        They do when every one has a gradient, their step counts agree (the usual case) and
        they are small together (:data:`FLAT_FALLBACK_MAX`); their state then lives in flat
        buffers, one view per parameter.
        """
        if not grads or any(g is None for g in grads) or self._fallback_numel > FLAT_FALLBACK_MAX:
            return False
        if len(set(self._fallback_steps)) != 1:
            return False
        if self._flat_state is None:
            self._pack_fallback()
        return self._flat_state is not None

    def _pack_fallback(self) -> None:
        """Move the per-parameter fallback state into flat buffers (per-parameter views)."""
        params = self.fallback_params
        n_state = 2 if self.config.fallback is MuonFallback.ADAM else 1
        kw: dict[str, Any] = {"dtype": self._dtype, "device": params[0].device}
        if all(not s for s in self._fallback_state):
            flats = [torch.zeros(sum(p.numel() for p in params), **kw) for _ in range(n_state)]
        elif all(len(s) == n_state for s in self._fallback_state):
            flats = [
                torch.cat([s[k].reshape(-1).to(self._dtype) for s in self._fallback_state])
                for k in range(n_state)
            ]
        else:
            return
        sizes = [p.numel() for p in params]
        views = [f.split(sizes) for f in flats]
        self._fallback_state = [
            [views[k][i].view(p.shape) for k in range(n_state)] for i, p in enumerate(params)
        ]
        self._flat_state = flats
        self._flat_sizes = torch.tensor(sizes, device=params[0].device)

    def _fallback_flat(self, grads: list[Tensor]) -> None:
        """The fallback rule of all parameters at once, on their concatenated gradients.

        The same arithmetic, element for element, as :meth:`_fallback` (so the same result),
        with one guard flag per parameter (the sum of its gradient is finite), broadcast to its
        elements.
        """
        assert self._flat_state is not None
        g = torch.cat([t.reshape(-1).to(self._dtype) for t in grads])
        assert self._flat_sizes is not None
        # one flag per parameter (as the per-parameter rule), broadcast to its elements;
        # where every flag reads True for free (a CPU, see host_flag), the selections would
        # keep every new value and are skipped (the same arithmetic, in place)
        flags = finite_sums(grads)
        ok: Tensor | None = None
        known = host_flags(flags)
        if known is None or not all(known):
            ok = flags.repeat_interleave(self._flat_sizes, output_size=g.numel())
        if self.config.fallback is MuonFallback.MOMENTUM:
            (buf,) = self._flat_state
            mu = self.config.momentum
            if ok is None:
                buf.mul_(mu).add_(g)
            else:
                torch.where(ok, buf.mul(mu).add_(g), buf, out=buf)
            out = g.add(buf, alpha=mu) if self.config.nesterov else buf
        else:
            beta1, beta2 = self.config.adam_betas
            m, v = self._flat_state
            if ok is None:
                m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            else:
                torch.where(ok, m.mul(beta1).add_(g, alpha=1.0 - beta1), m, out=m)
                torch.where(ok, v.mul(beta2).addcmul_(g, g, value=1.0 - beta2), v, out=v)
            self._fallback_steps = [t + 1 for t in self._fallback_steps]
            # g (our concatenated copy) is spent: the direction is written into it
            out = self._adam_direction(m, v, self._fallback_steps[0], out=g)
        parts = out.split([t.numel() for t in grads])
        torch._foreach_copy_(grads, [o.view(t.shape) for o, t in zip(parts, grads)])

    def _fallback(self, i: int, g: Tensor) -> Tensor:
        kind = self.config.fallback
        if kind is MuonFallback.PLAIN:
            return g
        state = self._fallback_state[i]
        ok = finite_sums([g])[0]  # a non-finite gradient leaves the state unchanged
        if kind is MuonFallback.MOMENTUM:
            if not state:
                state.append(torch.zeros_like(g))
            mu = self.config.momentum
            buf = keep_where_(state[0], state[0].mul(mu).add_(g), ok)
            return g.add(buf, alpha=mu) if self.config.nesterov else buf
        if not state:
            state.extend([torch.zeros_like(g), torch.zeros_like(g)])
        beta1, beta2 = self.config.adam_betas
        m, v = state
        keep_where_(m, m.mul(beta1).add_(g, alpha=1.0 - beta1), ok)
        keep_where_(v, v.mul(beta2).addcmul_(g, g, value=1.0 - beta2), ok)
        self._fallback_steps[i] += 1
        # g is p.grad or a copy of it in the state's dtype: spent, the direction replaces it
        return self._adam_direction(m, v, self._fallback_steps[i], out=g)

    def _adam_direction(self, m: Tensor, v: Tensor, t: int, out: Tensor) -> Tensor:
        """``(m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)`` written into ``out``.

        One temporary (the denominators) instead of four; the same operations in the same
        order, so the same values.
        """
        beta1, beta2 = self.config.adam_betas
        denom = v.div(1.0 - beta2**t).sqrt_().add_(self.config.adam_eps)
        return torch.div(m, 1.0 - beta1**t, out=out).div_(denom)

    # ---- state ------------------------------------------------------------------------------
    def preconditioner_state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            "momentum": [m.clone() for m in self.momentum],
            "fallback": [[t.clone() for t in s] for s in self._fallback_state],
            "fallback_steps": list(self._fallback_steps),
        }

    def load_preconditioner_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        if [tuple(m.shape) for m in state["momentum"]] != [tuple(m.shape) for m in self.momentum]:
            raise invalid(
                "state",
                "Muon momentum",
                "Its shapes do not match this model's matrix parameters",
            )
        self.momentum = [m.clone() for m in state["momentum"]]
        self._fallback_state = [[t.clone() for t in s] for s in state["fallback"]]
        self._fallback_steps = [int(t) for t in state["fallback_steps"]]
        self._flat_state = self._flat_sizes = None

    def cost_model(self) -> CostModel:
        """Unavoidable kernels: the Newton–Schulz matrix products and the momentum."""
        cm = CostModel(state_dtype=self._dtype)
        steps = self.config.ns_steps
        quintic = self.config.ns_iteration is NewtonSchulz.QUINTIC
        for group in self.layout.groups:
            b = group.size
            m, n = sorted(group.shape)
            # the momentum update, the Nesterov combination and the Frobenius normalisation
            cm.add(Phase.APPLY, "elementwise", (b * m * n,), count=3)
            cm.add(Phase.APPLY, "bmm", (b, m, n, m), count=steps)
            if quintic:
                cm.add(Phase.APPLY, "bmm", (b, m, m, m), count=steps)
            cm.add(Phase.APPLY, "bmm", (b, m, m, n), count=steps)
            cm.state_numel += b * m * n
            # the iteration's workspace (groups run one after the other): the next iterate
            # and the m × m Gram matrix (and the quintic's polynomial of it)
            workspace = b * (m * n + (2 if quintic else 1) * m * m)
            cm.transient_numel = max(cm.transient_numel, workspace)
        numel = sum(p.numel() for p in self.fallback_params)
        kind = self.config.fallback
        if kind is not MuonFallback.PLAIN:
            cm.add(Phase.APPLY, "elementwise", (numel,), count=2)
            cm.state_numel += numel * (2 if kind is MuonFallback.ADAM else 1)
            # the guard's candidate state beside the state it may keep (non-finite gradients),
            # for all fallback parameters at once when they step as one flat update
            flat = numel <= FLAT_FALLBACK_MAX
            most = numel if flat else max((p.numel() for p in self.fallback_params), default=0)
            cm.transient_numel = max(cm.transient_numel, most)
        return cm
