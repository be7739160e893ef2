r"""PSGD: preconditioned SGD with a preconditioner fitted online on a Lie group (Li 2018, 2022).

Every curvature step draws a probe ``v ~ N(0, I)`` and forms a pair ``(v, h)``:

* ``fit="newton"``: ``h = H v + λ ε`` with ``H v`` a Hessian-vector product (double backward)
  and ``ε ~ N(0, I)`` independent;
* ``fit="whitening"``: ``h = ∇L + λ ε`` (the gradient replaces ``H v``; no second derivative).

The preconditioner ``P = QᵀQ`` takes one normalised step on the criterion
``E[hᵀ P h + vᵀ P^{-1} v]`` (see :mod:`precond.methods.psgd_fit`), whose minimiser is

.. math::

    P = (H^2 + λ^2 I)^{-1/2} \quad\text{(Newton)}, \qquad
    P = (E[g gᵀ] + λ^2 I)^{-1/2} \quad\text{(whitening)},

and every step writes ``p.grad ← P ∇L``. The damping ``λ`` bounds ``‖P‖ ≤ 1/λ`` and keeps the
fit well posed where ``H`` is singular or indefinite.

Forms (``form``):

* ``kron`` (default): per parameter, reshaped to a matrix ``[d₀, ∏ d_{1:}]`` (a 1-D parameter is
  a ``[1, n]`` row), ``Q = Q₂ ⊗ Q₁``: each factor upper triangular, or diagonal when its
  dimension exceeds ``max_dense_dim`` or the parameter is 1-D (diagonal form). Parameters with
  the same factor shapes are fitted and applied as one batch.
* ``lra``: ``Q = (I + U Vᵀ) diag(d)`` over all preconditioned parameters, rank ``rank``.
* ``diag``: ``Q = diag(d)``.

Knobs: ``precond_lr`` (normalised step ``μ`` of the fit), ``init_scale`` (initial ``P = s I``;
default Li's ``(E v² / E h²)^{1/2}`` from the first pair), ``update_probability`` (a fit happens on
curvature steps with this probability, drawn from the gradient maker's generator; the curvature
schedule ``curvature_upd_interval`` sets which steps are candidates), ``damping`` (``λ``).
``ema_decay`` must stay 0: the fit is itself a running average.

Parameters frozen after construction: a fit uses pairs of the trained parameters only (``H v``
of the loss as a function of them) and moves only their part of the preconditioner: their
Kronecker factors (the batched factors of a group are fitted on the trained members' slices),
their diagonal, or the rows of the low-rank form's ``d, U, V`` at their coordinates (the
``lra`` form is fitted and applied restricted to the trained coordinates). The frozen
parameters' parts are kept unchanged, so un-freezing resumes them, and they receive no
gradient. A parameter frozen when the preconditioner is initialised starts from
``P = init_scale · I`` (``I`` when ``init_scale`` is ``None``; the ``lra`` form uses the scale of
the trained coordinates).

References:
    X.-L. Li. Preconditioned Stochastic Gradient Descent. IEEE Transactions on Neural Networks
    and Learning Systems, 2018. https://arxiv.org/abs/1512.04202

    X.-L. Li. Black Box Lie Group Preconditioners for SGD. 2022.
    https://arxiv.org/abs/2211.04422
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import LayerStats, stat_dtype
from ..config import PreconditioningConfig
from ..numerics import finite_flags, warn_once
from ..registry import register_method
from ..validation import check_float, check_int, coerce_enum, invalid
from . import psgd_fit as fit
from ._saved import SavedCounts, gradient_with_saved
from .base import PreconditionedGradientMaker, accumulate_grads, backward_other_leaves
from .cost import CostModel, Phase
from .probes import gaussian_like, hvp_with_probes, split_grads

__all__ = ["PsgdConfig", "PsgdFit", "PsgdForm", "PsgdGradientMaker"]


class PsgdForm(str, Enum):
    """Lie group of the preconditioner factor ``Q``."""

    KRON = "kron"
    LRA = "lra"
    DIAG = "diag"

    def __str__(self) -> str:
        return self.value


class PsgdFit(str, Enum):
    """What the pairs ``(v, h)`` are: Hessian-vector products or gradients (whitening)."""

    NEWTON = "newton"
    WHITENING = "whitening"

    def __str__(self) -> str:
        return self.value


@dataclass(kw_only=True)
class PsgdConfig(PreconditioningConfig):
    """PSGD options (see the module docstring).

    Args:
        form: ``kron`` (default), ``lra`` or ``diag``.
        fit: ``newton`` (default; Hessian-vector products) or ``whitening`` (gradients).
        precond_lr: Normalised step size ``μ ∈ (0, 1)`` of the preconditioner fit.
        init_scale: Initial ``P = init_scale · I``; ``None`` takes it from the first pair.
        max_dense_dim: Largest dimension with a dense (triangular) Kronecker factor.
        rank: Rank of the ``lra`` form.
        update_probability: Probability that a curvature step fits the preconditioner.
        damping: ``λ ≥ 0``; ``P`` is fitted to ``H² + λ² I`` (Newton) or ``E[g gᵀ] + λ² I``.
    """

    form: PsgdForm | str = PsgdForm.KRON
    fit: PsgdFit | str = PsgdFit.NEWTON
    precond_lr: float = 0.1
    init_scale: float | None = None
    max_dense_dim: int = 1024
    rank: int = 10
    update_probability: float = 1.0
    damping: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        self.form = coerce_enum(PsgdForm, self.form, "form")
        self.fit = coerce_enum(PsgdFit, self.fit, "fit")
        check_float(
            "precond_lr",
            self.precond_lr,
            minimum=0.0,
            maximum=1.0,
            strict_min=True,
            strict_max=True,
        )
        if self.init_scale is not None:
            check_float("init_scale", self.init_scale, minimum=0.0, strict_min=True)
        check_int("max_dense_dim", self.max_dense_dim, minimum=1)
        check_int("rank", self.rank, minimum=1)
        check_float(
            "update_probability", self.update_probability, minimum=0.0, maximum=1.0, strict_min=True
        )
        if self.ema_decay != 0.0:
            raise invalid(
                "ema_decay",
                self.ema_decay,
                "PSGD fits its preconditioner online and keeps no moving average; leave "
                "ema_decay=0",
            )


def _matrix_shape(p: Tensor) -> tuple[int, int]:
    if p.dim() <= 1:
        return 1, p.numel()
    return p.shape[0], p.numel() // p.shape[0]


class _KronGroup:
    """Parameters sharing the Kronecker factor shapes, fitted and applied as one batch."""

    def __init__(self, params: list[nn.Parameter], dense: tuple[bool, bool]) -> None:
        self.params = params
        self.m, self.n = _matrix_shape(params[0])
        self.dense = dense
        self.dtype = stat_dtype(params[0].dtype)
        self.q1: Tensor | None = None
        self.q2: Tensor | None = None
        self.p1: Tensor | None = None
        self.p2: Tensor | None = None

    def stack(self, tensors: list[Tensor]) -> Tensor:
        mats = [t.reshape(self.m, self.n).to(self.dtype) for t in tensors]
        return mats[0].unsqueeze(0) if len(mats) == 1 else torch.stack(mats)

    def init(self, scale: Tensor) -> None:
        # scale: [b], the initial P; each factor carries its fourth root.
        s = scale.to(self.dtype).pow(0.25)
        dev = self.params[0].device
        factors = []
        for size, dense in zip((self.m, self.n), self.dense):
            if dense:
                eye = torch.eye(size, dtype=self.dtype, device=dev)
                factors.append(s[:, None, None] * eye)
            else:
                factors.append(s[:, None] * torch.ones(size, dtype=self.dtype, device=dev))
        self.q1, self.q2 = factors

    def relative_grads(
        self, v: Tensor, h: Tensor, members: list[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        """The factors' relative gradients on pairs of all members, or of ``members`` only."""
        q1, q2 = self._factors(members)
        return fit.kron_relative_grads(q1, q2, v, h)

    def step(
        self, grad1: Tensor, grad2: Tensor, lr: float, members: list[int] | None = None
    ) -> None:
        """Step the factors (of ``members`` only: the others are kept) along ``grad1, grad2``."""
        assert self.q1 is not None and self.q2 is not None
        if members is None:
            fit.kron_step(self.q1, self.q2, grad1, grad2, lr)
            return
        idx = self._index(members)
        q1, q2 = self.q1[idx], self.q2[idx]
        fit.kron_step(q1, q2, grad1, grad2, lr)
        self.q1[idx], self.q2[idx] = q1, q2

    def _factors(self, members: list[int] | None) -> tuple[Tensor, Tensor]:
        """The factors, or copies of the rows of ``members``."""
        assert self.q1 is not None and self.q2 is not None
        if members is None:
            return self.q1, self.q2
        idx = self._index(members)
        return self.q1[idx], self.q2[idx]

    def _index(self, members: list[int]) -> Tensor:
        assert self.q1 is not None
        return torch.tensor(members, device=self.q1.device)

    def refresh(self) -> None:
        assert self.q1 is not None and self.q2 is not None
        # into the previous preconditioner's memory (no second copy alive during a refresh)
        p1 = self.p1 if self.p1 is not None and self.p1.shape == self.q1.shape else None
        p2 = self.p2 if self.p2 is not None and self.p2.shape == self.q2.shape else None
        self.p1 = fit.kron_precond_factor(self.q1, out=p1)
        self.p2 = fit.kron_precond_factor(self.q2, out=p2)

    def apply(self) -> None:
        if self.p1 is None or self.p2 is None:
            return
        live = [p.grad is not None and p.requires_grad for p in self.params]
        grads = [
            p.grad if on and p.grad is not None else torch.zeros_like(p)
            for p, on in zip(self.params, live)
        ]
        g = self.stack(grads)
        target = self.params[0].grad
        if len(self.params) == 1 and live[0] and target is not None and target.dtype == g.dtype:
            # the last product is written straight into p.grad (g is a view of it: a temporary
            # holds the first product, so no output overlaps its input)
            dest = target.view(1, self.m, self.n) if target.is_contiguous() else None
            if dest is not None:
                fit.kron_apply(self.p1, self.p2, g, out=dest)
                return
        out = fit.kron_apply(self.p1, self.p2, g)
        for i, (p, on) in enumerate(zip(self.params, live)):
            if on and p.grad is not None:
                p.grad.copy_(out[i].reshape(p.shape))

    _names = ("q1", "q2", "p1", "p2")

    def state_dict(self) -> dict[str, Any]:
        return {
            k: None if getattr(self, k) is None else getattr(self, k).clone() for k in self._names
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k in self._names:
            v = state[k]
            setattr(self, k, None if v is None else v.clone())


@register_method(
    "psgd",
    "PSGD: Kronecker/low-rank/diagonal preconditioner fitted on a Lie group (Li 2018, 2022)",
    family="global",
)
class PsgdGradientMaker(PreconditionedGradientMaker):
    """PSGD gradient maker (see the module docstring for the update and references).

    Args:
        model: The model.
        config: :class:`PsgdConfig`.
    """

    config_class = PsgdConfig
    config: PsgdConfig
    needs_adapter = False

    def __init__(self, model: nn.Module, config: PsgdConfig | None = None) -> None:
        super().__init__(model, config)
        self.precond_params: list[nn.Parameter] = [p for layer in self.layers for p in layer.params]
        self.form = PsgdForm(self.config.form)
        self.groups: list[_KronGroup] = []
        if self.form is PsgdForm.KRON:
            by_key: dict[tuple[Any, ...], list[nn.Parameter]] = {}
            limit = self.config.max_dense_dim
            for p in self.precond_params:
                m, n = _matrix_shape(p)
                dense = (p.dim() >= 2 and 1 < m <= limit, p.dim() >= 2 and 1 < n <= limit)
                by_key.setdefault((m, n, dense, p.dtype, p.device), []).append(p)
            self.groups = [_KronGroup(ps, key[2]) for key, ps in by_key.items()]
        # diag form: d per parameter; lra form: d, U, V over the concatenation
        self.d: list[Tensor] = []
        self.p_diag: list[Tensor] = []
        self.lra: dict[str, Tensor] = {}
        self.initialized = False
        self.num_fits = 0
        self._refreshed_at = -1
        self._pairs: tuple[list[Tensor], list[Tensor]] | None = None
        # Indices (into precond_params) the pairs belong to; None: all of them.
        self._pair_rows: list[int] | None = None
        self._lra_index: tuple[tuple[bool, ...], Tensor] | None = None
        #: Elements saved by the gradient's graph on the last Newton fit: transient memory.
        self.graph_numel = 0
        #: The gradient graph's memory, counted once per graph signature (a cache, not state).
        self._saved_counts = SavedCounts()

    # ---- the pairs ------------------------------------------------------------------------------
    def _draw_fit(self) -> bool:
        prob = self.config.update_probability
        if prob >= 1.0 or not self.initialized:
            return True
        dev = self.precond_params[0].device
        return bool(torch.rand((), generator=self.generator, device=dev) < prob)

    def _second_derivatives(self, curvature_step: bool) -> bool:
        # Hessian-vector products on the steps that fit (drawn in _backward: any curvature step)
        return curvature_step and self.config.fit is PsgdFit.NEWTON

    def _backward(self, loss: Tensor, curvature_step: bool) -> None:
        rows = [i for i, p in enumerate(self.precond_params) if p.requires_grad]
        if not curvature_step or not rows or not self._draw_fit():
            loss.backward()
            return
        backward_other_leaves(self, loss)
        params = self.params
        pre = [self.precond_params[i] for i in rows]
        newton = self.config.fit is PsgdFit.NEWTON
        if newton:
            grads, self.graph_numel = gradient_with_saved(
                loss, params, self._saved_counts, self.graph_signature()
            )
        else:
            grads = split_grads(loss, params, create_graph=False)
        index = {id(p): i for i, p in enumerate(params)}
        pre_grads = [grads[index[id(p)]] for p in pre]
        dts = [stat_dtype(p.dtype) for p in pre]
        v = gaussian_like(pre, self.generator)
        if newton:
            hz = hvp_with_probes(pre_grads, pre, v)
            h = [torch.zeros_like(p) if hv is None else hv for p, hv in zip(pre, hz)]
        else:
            h = [g.detach() for g in pre_grads]  # p.grad's memory: never written here
        lam = self.damping
        v = [vi.to(dt) for vi, dt in zip(v, dts)]
        h = [hi.to(dt) for hi, dt in zip(h, dts)]
        if lam > 0:
            # h + λ ε, formed in the fresh noise tensors (h may share memory with p.grad or v)
            noise = gaussian_like(pre, self.generator)
            h = [e.to(hi.dtype).mul_(lam).add_(hi) for hi, e in zip(h, noise)]
        self._pairs = (v, h)
        self._pair_rows = None if len(rows) == len(self.precond_params) else rows
        # The graph is freed (the product did not retain it): the gradients become p.grad as
        # they are, without the copy accumulate_grads makes of tensors that require grad.
        accumulate_grads(params, [g.detach() for g in grads])

    # ---- the three verbs ------------------------------------------------------------------------
    def update_curvature(self, stats: Mapping[str, LayerStats]) -> None:  # noqa: D102
        if self._pairs is None:
            return
        v, h = self._pairs
        rows = self._pair_rows
        self._pairs = self._pair_rows = None
        if not all(finite_flags([*v, *h])):
            warn_once(
                "psgd:pairs",
                "PSGD: non-finite curvature-vector products; preconditioner fit skipped.",
            )
            return
        if not self.initialized:
            self._initialize(v, h, rows)
        if self.form is PsgdForm.KRON:
            # each group checks its relative gradients before stepping (no backup copy); the
            # normalised steps keep finite factors finite
            stepped, failed = self._fit_kron(v, h, rows)
            if failed:
                self._warn_fit()
            if stepped:
                self.num_fits += 1
            return
        backup = [t.clone() for t in self._fit_tensors()]
        self._fit(v, h, rows)
        if not all(finite_flags(self._fit_tensors())):
            for t, b in zip(self._fit_tensors(), backup):
                t.copy_(b)
            self._warn_fit()
            return
        self.num_fits += 1

    @staticmethod
    def _warn_fit() -> None:
        warn_once(
            "psgd:fit",
            "PSGD: the preconditioner fit produced non-finite factors; step undone.",
        )

    def _fit_tensors(self) -> list[Tensor]:
        """The tensors a fit modifies in place."""
        if self.form is PsgdForm.KRON:
            return [q for g in self.groups for q in (g.q1, g.q2) if q is not None]
        if self.form is PsgdForm.DIAG:
            return list(self.d)
        return list(self.lra.values())

    def _fit(self, v: list[Tensor], h: list[Tensor], rows: list[int] | None = None) -> None:
        """One fit on pairs of the parameters ``rows``; the others' parts are kept.

        ``rows`` are indices into ``precond_params`` (``None``: all of them).
        """
        lr = self.config.precond_lr
        at = {i: k for k, i in enumerate(range(len(v)) if rows is None else rows)}
        if self.form is PsgdForm.KRON:
            self._fit_kron(v, h, rows)
        elif self.form is PsgdForm.DIAG:
            fit.diag_fit([self.d[i] for i in at], v, h, lr)
        else:
            which = "u" if self.num_fits % 2 == 0 else "v"
            flat_v = torch.cat([t.reshape(-1) for t in v])
            flat_h = torch.cat([t.reshape(-1) for t in h])
            lra = self.lra
            idx = self._lra_coords()
            if idx is None:
                fit.lra_fit(lra["d"], lra["u"], lra["v"], flat_v, flat_h, lr, which)
                return
            d, u, vv = lra["d"][idx], lra["u"][idx], lra["v"][idx]
            fit.lra_fit(d, u, vv, flat_v, flat_h, lr, which)
            lra["d"][idx], lra["u"][idx], lra["v"][idx] = d, u, vv

    def _fit_kron(
        self, v: list[Tensor], h: list[Tensor], rows: list[int] | None
    ) -> tuple[int, int]:
        """Fit every Kronecker group with trained members.

        Returns:
            How many groups stepped and how many were skipped (non-finite relative gradient).
        """
        lr = self.config.precond_lr
        at = {i: k for k, i in enumerate(range(len(v)) if rows is None else rows)}
        pos = {id(p): i for i, p in enumerate(self.precond_params)}
        todo: list[tuple[_KronGroup, list[int] | None, tuple[Tensor, Tensor]]] = []
        for group in self.groups:
            members = [m for m, p in enumerate(group.params) if pos[id(p)] in at]
            if not members:
                continue
            ks = [at[pos[id(group.params[m])]] for m in members]
            vs, hs = group.stack([v[k] for k in ks]), group.stack([h[k] for k in ks])
            which = None if len(members) == len(group.params) else members
            todo.append((group, which, group.relative_grads(vs, hs, which)))
        if not todo:
            return 0, 0
        # every group's relative gradients checked at once (one host sync per fit); a group
        # whose check fails keeps its factors, the others step
        finite = finite_flags([g for _, _, grads in todo for g in grads])
        stepped = failed = 0
        for k, (group, which, (grad1, grad2)) in enumerate(todo):
            if finite[2 * k] and finite[2 * k + 1]:
                group.step(grad1, grad2, lr, which)
                stepped += 1
            else:
                failed += 1
        return stepped, failed

    def _lra_coords(self) -> Tensor | None:
        """Coordinates of the trained parameters in the ``lra`` form (``None``: all trained)."""
        flags = tuple(p.requires_grad for p in self.precond_params)
        if all(flags):
            return None
        if self._lra_index is None or self._lra_index[0] != flags:
            dev = self.precond_params[0].device
            mask = torch.cat(
                [
                    torch.full((p.numel(),), on, dtype=torch.bool, device=dev)
                    for p, on in zip(self.precond_params, flags)
                ]
            )
            self._lra_index = (flags, mask.nonzero().squeeze(1))
        return self._lra_index[1]

    def _scale(self, v: Tensor, h: Tensor, dims: tuple[int, ...]) -> Tensor:
        if self.config.init_scale is not None:
            shape = [v.shape[i] for i in range(v.dim()) if i not in dims]
            return torch.full(shape, self.config.init_scale, dtype=v.dtype, device=v.device)
        return fit.initial_scale(v, h, dims)

    def _initialize(self, v: list[Tensor], h: list[Tensor], rows: list[int] | None = None) -> None:
        """Initial factors from the first pairs (of the parameters ``rows``; all if ``None``).

        A parameter without a pair (frozen at the first fit) gets the placeholder pair
        ``h = v``, i.e. the scale 1 (or ``init_scale``); the ``lra`` form takes its single scale
        from the trained coordinates.
        """
        trained_v = trained_h = None
        if rows is not None:
            trained_v = torch.cat([t.reshape(-1) for t in v])
            trained_h = torch.cat([t.reshape(-1) for t in h])
            at = {i: k for k, i in enumerate(rows)}
            ones = [torch.ones_like(p, dtype=stat_dtype(p.dtype)) for p in self.precond_params]
            v = [v[at[i]] if i in at else ones[i] for i in range(len(ones))]
            h = [h[at[i]] if i in at else ones[i] for i in range(len(ones))]
        if self.form is PsgdForm.KRON:
            pos = {id(p): i for i, p in enumerate(self.precond_params)}
            for group in self.groups:
                idx = [pos[id(p)] for p in group.params]
                vs, hs = group.stack([v[i] for i in idx]), group.stack([h[i] for i in idx])
                group.init(self._scale(vs, hs, (1, 2)))
        elif self.form is PsgdForm.DIAG:
            self.d = [
                self._scale(vi, hi, tuple(range(vi.dim()))).sqrt() * torch.ones_like(vi)
                for vi, hi in zip(v, h)
            ]
        else:
            flat_v = torch.cat([t.reshape(-1) for t in v])
            flat_h = torch.cat([t.reshape(-1) for t in h])
            if trained_v is None or trained_h is None:
                scale = self._scale(flat_v, flat_h, (0,))
            else:
                scale = self._scale(trained_v, trained_h, (0,))
            total, r = flat_v.numel(), self.config.rank
            sigma = 0.1 / math.sqrt(total * r)
            u, w = gaussian_like([flat_v.new_empty(total, r)] * 2, self.generator)
            self.lra = {"d": scale.sqrt() * torch.ones_like(flat_v), "u": u * sigma, "v": w * sigma}
        self.initialized = True

    def update_preconditioner(self) -> None:  # noqa: D102
        if not self.initialized or self._refreshed_at == self.num_fits:
            return  # nothing new to refresh from (no fit since the last refresh)
        self._refreshed_at = self.num_fits
        if self.form is PsgdForm.KRON:
            for group in self.groups:
                group.refresh()
        elif self.form is PsgdForm.DIAG:
            self.p_diag = [d.square() for d in self.d]
        # lra: P is applied from the fitted factors directly (O(N·rank), nothing to cache)

    def precondition(self) -> None:  # noqa: D102
        if self.form is PsgdForm.KRON:
            for group in self.groups:
                group.apply()
            return
        params = self.precond_params
        if self.form is PsgdForm.DIAG:
            for p, pd in zip(params, self.p_diag):
                if p.grad is not None and p.requires_grad:
                    p.grad.mul_(pd.to(p.grad.dtype))
            return
        if not self.lra:
            return
        lra = self.lra
        d, u, vv = lra["d"], lra["u"], lra["v"]
        idx = self._lra_coords()
        if idx is not None:
            # Restricted to the trained coordinates (the frozen rows stay out of P).
            params = [p for p in params if p.requires_grad]
            d, u, vv = d[idx], u[idx], vv[idx]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).to(d.dtype) for g in grads])
        out = fit.lra_apply(d, u, vv, flat)
        for p, o in zip(params, torch.split(out, [p.numel() for p in params])):
            if p.grad is not None:
                p.grad.copy_(o.view(p.shape))

    # ---- inspection -----------------------------------------------------------------------------
    def preconditioner_apply(self, tensors: list[Tensor]) -> list[Tensor]:
        """``P`` applied to parameter-shaped tensors (aligned with ``precond_params``).

        Args:
            tensors: One tensor per preconditioned parameter.

        Returns:
            ``P`` times them (unchanged where no preconditioner exists yet).
        """
        saved = [p.grad for p in self.precond_params]
        try:
            for p, t in zip(self.precond_params, tensors):
                p.grad = t.detach().clone().to(p.dtype)
            self.precondition()
            return [p.grad.clone() for p in self.precond_params if p.grad is not None]
        finally:
            for p, g in zip(self.precond_params, saved):
                p.grad = g

    # ---- state ----------------------------------------------------------------------------------
    def preconditioner_state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            "initialized": self.initialized,
            "num_fits": self.num_fits,
            "groups": [g.state_dict() for g in self.groups],
            "d": [t.clone() for t in self.d],
            "p_diag": [t.clone() for t in self.p_diag],
            "lra": {k: t.clone() for k, t in self.lra.items()},
        }

    def load_preconditioner_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        if len(state["groups"]) != len(self.groups):
            raise invalid(
                "state",
                f"{len(state['groups'])} Kronecker groups",
                f"This model has {len(self.groups)}",
            )
        self.initialized = bool(state["initialized"])
        self.num_fits = int(state["num_fits"])
        self._refreshed_at = -1
        for g, s in zip(self.groups, state["groups"]):
            g.load_state_dict(s)
        self.d = [t.clone() for t in state["d"]]
        self.p_diag = [t.clone() for t in state["p_diag"]]
        self.lra = {k: t.clone() for k, t in state["lra"].items()}

    def cost_model(self) -> CostModel:
        """Unavoidable kernels: one HVP (Newton) per fit, the factor fit, refresh and apply."""
        cm = CostModel(state_dtype=stat_dtype(self.precond_params[0].dtype))
        if self.config.fit is PsgdFit.NEWTON:
            cm.add(Phase.EXTRA_BACKWARD, "hvp", (1,))
        total = sum(p.numel() for p in self.precond_params)
        # The fit's probe v ~ N(0, I), and the damping noise ε of h + λε when λ > 0.
        cm.add(Phase.EXTRA_BACKWARD, "randn", (total,), count=2 if self.damping > 0 else 1)
        workspace = 0
        if self.form is PsgdForm.KRON:
            for group in self.groups:
                b, m, n = len(group.params), group.m, group.n
                # a fit holds A = Q₁HQ₂ᵀ, B = Q₁^{-T}VQ₂^{-1} and both relative gradients,
                # then one block's product of a factor's update
                grads = sum(s * s if d else s for s, d in zip((m, n), group.dense))
                block = max(
                    (
                        (hi - lo) * (hi_j - lo_j)
                        for size, d in zip((m, n), group.dense)
                        if d
                        for lo, hi, lo_j, hi_j in fit.triangular_update_blocks(size)
                    ),
                    default=0,
                )
                workspace = max(workspace, b * (2 * m * n + grads + block))
                for size, dense in zip((m, n), group.dense):
                    if dense:
                        # Q h Qᵀ and Q^{-T} v Q^{-1} (one side each), two Gram products, Q update
                        cm.add(Phase.CURVATURE, "bmm", (b, size, size, m * n // size), count=2)
                        cm.add(Phase.CURVATURE, "bmm", (b, size, m * n // size, size), count=2)
                        for lo, hi, lo_j, hi_j in fit.triangular_update_blocks(size):
                            # the Q update, S[I, I..J] Q[I..J, J]
                            cm.add(Phase.CURVATURE, "bmm", (b, hi - lo, hi_j - lo, hi_j - lo_j))
                        for lo, hi in fit.triangular_chunks(size):  # P = QᵀQ, mirrored
                            cm.add(Phase.REFRESH, "bmm", (b, hi - lo, hi, size - lo))
                        cm.add(Phase.APPLY, "bmm", (b, size, size, m * n // size))
                        cm.state_numel += 2 * b * size * size
                    else:
                        cm.add(Phase.CURVATURE, "elementwise", (4 * b * m * n,))
                        cm.add(Phase.APPLY, "elementwise", (b * m * n,))
                        cm.state_numel += 2 * b * size
        elif self.form is PsgdForm.DIAG:
            cm.add(Phase.CURVATURE, "elementwise", (4 * total,))
            cm.add(Phase.APPLY, "elementwise", (total,))
            cm.state_numel += 2 * total
        else:
            r = self.config.rank
            cm.add(Phase.CURVATURE, "matmul", (r, total, 1), count=8)
            cm.add(Phase.CURVATURE, "matmul", (total, r, r), count=1)
            cm.add(Phase.APPLY, "matmul", (r, total, 1), count=2)
            cm.add(Phase.APPLY, "matmul", (total, r, 1), count=2)
            cm.state_numel += 2 * total * (2 * r + 1)
        cm.transient_numel += 2 * total + workspace  # the pair (v, h) and the fit's workspace
        # The Newton fit's Hessian-vector product is a double backward: it must keep the
        # gradient's graph (the tensors its backward saved, mostly the activations' gradients).
        cm.transient_numel += self.graph_numel
        return cm
