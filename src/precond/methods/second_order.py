r"""Shared machinery of the Hessian/GGN methods (Newton, Hessian-free, LiSSA, CurveBall).

These methods need second derivatives of the loss, not layer statistics: they set
``needs_adapter = False`` (any module with parameters is handled), install no capture hooks and
override :meth:`PreconditionedGradientMaker._backward`:

* on curvature steps the gradient is computed with a graph (``create_graph=True``), written into
  ``p.grad`` like ``loss.backward()`` would, and the step's :class:`BatchCurvature` (matrix-free
  Hessian and GGN products on this batch) is kept until the step ends, for
  ``update_curvature`` to use;
* on the other steps the backward pass is the plain ``loss.backward()``.

Vectors are flat: the preconditioned parameters flattened and concatenated in order
(:class:`ParamVector`). This layout is fixed at construction.

Parameters frozen after construction (``requires_grad_(False)``, e.g. a fine-tuning schedule):
at every step the methods work on the loss as a function of the parameters trained *now*.
Only those are differentiated; a frozen parameter's slot of every flat vector is a zero
gradient, the curvature products have zero rows and columns there (the products are those of
the loss restricted to the trained parameters), and nothing is written to its ``p.grad``.
State vectors that persist across steps keep their frozen slots unchanged (see each method),
so un-freezing resumes them. Nothing of this costs anything while no parameter is frozen.

Two amortisation tools live here too. :class:`SecantInverse` turns one solve
``x ≈ (C + λI)^{-1} g`` into a linear operator applied on the steps in between (memoryless
BFGS from the exact curvature pair ``(s, y) = (x, g)``), and :class:`DampingAdapter` is the
Levenberg-Marquardt rule that compares the loss change between two curvature steps with the
change the quadratic model predicted for the step actually taken.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import PreconditioningConfig
from ..curvature import products
from ..enums import CurvatureType
from ..validation import invalid
from .base import PreconditionedGradientMaker, accumulate_grads

__all__ = [
    "BatchCurvature",
    "DampingAdapter",
    "ParamVector",
    "SecantInverse",
    "SecondOrderGradientMaker",
    "coerce_curvature",
]


def coerce_curvature(value: Any) -> CurvatureType:
    """Validate a ``curvature`` field of a product-based method (``ggn`` or ``hessian``).

    Args:
        value: A :class:`~precond.enums.CurvatureType` or its string.

    Returns:
        The member.

    Raises:
        ValueError: For anything but ``ggn`` and ``hessian``.
    """
    allowed = (CurvatureType.GGN, CurvatureType.HESSIAN)
    for member in allowed:
        if value in (member, member.value):
            return member
    shown = value.value if isinstance(value, CurvatureType) else value
    raise invalid("curvature", shown, "Supported: ('ggn', 'hessian')")


class ParamVector:
    """Flat views of a list of parameters (coordinates: parameters flattened in order).

    Args:
        params: The parameters.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.sizes = [p.numel() for p in params]
        self.numel = sum(self.sizes)
        self._masks: dict[tuple[int, int, tuple[bool, ...]], Tensor] = {}

    def active(self) -> list[bool]:
        """Whether each parameter is trained now (``requires_grad``; no host sync)."""
        return [p.requires_grad for p in self.params]

    def mask(self, start: int = 0, stop: int | None = None) -> Tensor | None:
        """Coordinates of the trained parameters among ``params[start:stop]``, as a bool vector.

        Returns ``None`` when all of them are trained (the common case: callers then skip
        masking altogether). Masks are cached per frozen pattern.
        """
        stop = len(self.params) if stop is None else stop
        flags = tuple(p.requires_grad for p in self.params[start:stop])
        if all(flags):
            return None
        key = (start, stop, flags)
        if key not in self._masks:
            ref = self.params[0]
            self._masks[key] = torch.cat(
                [
                    torch.full((n,), on, dtype=torch.bool, device=ref.device)
                    for n, on in zip(self.sizes[start:stop], flags)
                ]
            )
        return self._masks[key]

    def flatten(self, tensors: list[Tensor | None], dtype: torch.dtype) -> Tensor:
        """Concatenate parameter-shaped tensors (``None`` counts as zeros) into ``[P]``."""
        ref = self.params[0]
        parts = [
            torch.zeros(p.numel(), dtype=dtype, device=ref.device)
            if t is None
            else t.detach().reshape(-1).to(dtype)
            for p, t in zip(self.params, tensors)
        ]
        return torch.cat(parts)

    def unflatten(self, vec: Tensor) -> list[Tensor]:
        """Split ``[P]`` into parameter-shaped tensors in the parameters' dtypes."""
        return [c.view_as(p).to(p.dtype) for c, p in zip(torch.split(vec, self.sizes), self.params)]

    def grads(self, dtype: torch.dtype) -> Tensor:
        """The current ``p.grad`` as a flat vector.

        Zeros where ``p.grad`` is ``None`` or the parameter is frozen.
        """
        return self.flatten([p.grad if p.requires_grad else None for p in self.params], dtype)

    def write_grads(self, vec: Tensor) -> None:
        """Copy a flat vector into ``p.grad``.

        Frozen parameters and parameters without a gradient are left alone.
        """
        for p, u in zip(self.params, self.unflatten(vec)):
            if p.grad is not None and p.requires_grad:
                p.grad.copy_(u)

    def dot_params(self, vec: Tensor) -> float:
        """``⟨θ, v⟩`` in float64 (host sync; curvature steps only)."""
        theta = self.flatten(list(self.params), torch.float64)
        return float(theta.dot(vec.to(torch.float64)))


class BatchCurvature:
    """Matrix-free curvature products of the current batch, on flat vectors.

    Only the parameters trained at this step are differentiated: the slots of frozen ones are
    zero in every product (inputs there are ignored), i.e. the products are those of the loss
    as a function of the trained parameters, embedded in the fixed layout.

    Args:
        loss: The scalar loss (graph kept).
        params: The preconditioned parameters.
        grads: ``∇_θ L`` for ``params`` built with ``create_graph=True`` (zeros, without a
            graph, for frozen parameters).
        logits: Callable returning the tensor the loss reads (for GGN and sampled products).
        active: Whether each parameter is trained at this step (default: all).
    """

    def __init__(
        self,
        loss: Tensor,
        params: ParamVector,
        grads: list[Tensor],
        logits: Callable[[], Tensor],
        active: list[bool] | None = None,
    ) -> None:
        self.loss = loss
        self.vec = params
        self.grads = grads
        self._logits_fn = logits
        self.active = [True] * len(grads) if active is None else list(active)
        #: Indices of the trained parameters, and those parameters and their gradients.
        self._on = [i for i, a in enumerate(self.active) if a]
        self._diff = [params.params[i] for i in self._on]
        self._dgrads = [grads[i] for i in self._on]
        self._z: Tensor | None = None
        self._gz: Tensor | None = None
        self._u: Tensor | None = None
        self._ju: list[Tensor] | None = None
        #: Number of curvature-vector products computed (for tests and cost accounting).
        self.count = 0

    @property
    def params(self) -> list[nn.Parameter]:
        """The preconditioned parameters."""
        return self.vec.params

    def gradient(self, dtype: torch.dtype) -> Tensor:
        """The batch gradient ``g`` as a flat vector."""
        return self.vec.flatten(list(self.grads), dtype)

    def _out(self, tensors: list[Tensor], like: Tensor) -> Tensor:
        """Flatten products over the trained parameters (frozen slots: zeros)."""
        self.count += 1
        full: list[Tensor | None] = [None] * len(self.active)
        for i, t in zip(self._on, tensors):
            full[i] = t
        return self.vec.flatten(full, like.dtype)

    def _split(self, v: Tensor) -> list[Tensor]:
        """The trained parameters' parts of a flat vector."""
        parts = self.vec.unflatten(v)
        return [parts[i] for i in self._on]

    def hvp(self, v: Tensor) -> Tensor:
        """``H v`` (Hessian of the loss as written)."""
        if not self._diff:
            return self._out([], v)
        return self._out(products.hvp(self._dgrads, self._diff, self._split(v)), v)

    def _logits(self) -> Tensor:
        if self._z is None:
            self._z = self._logits_fn()
            (self._gz,) = torch.autograd.grad(self.loss, self._z, create_graph=True)
        assert self._z is not None
        return self._z

    def product(self, kind: CurvatureType, v: Tensor, row_weights: Tensor | None = None) -> Tensor:
        """``C v`` for ``kind`` (``hessian`` or ``ggn``); sub-sampled if ``row_weights`` is set."""
        if kind is CurvatureType.GGN:
            return self.ggn(v, row_weights)
        if row_weights is None:
            return self.hvp(v)
        return self.sampled_hvp(v, row_weights)

    def ggn(self, v: Tensor, row_weights: Tensor | None = None) -> Tensor:
        """``G v = Jᵀ (∇²_z L) J v``, equal to :func:`precond.curvature.products.ggn_vp`.

        The transposed-Jacobian graph ``Jᵀ u`` (for the double-vjp ``J v``) and ``∇_z L`` are
        built once per batch and reused by every product. ``row_weights`` re-weights the loss
        terms along dimension 0 of the logits (sub-sampled GGN).
        """
        if not self._diff:
            return self._out([], v)
        z = self._logits()
        if self._ju is None:
            self._u = torch.zeros_like(z, requires_grad=True)
            ju = torch.autograd.grad(z, self._diff, self._u, create_graph=True, allow_unused=True)
            self._ju = [torch.zeros_like(p) if g is None else g for p, g in zip(self._diff, ju)]
        assert self._u is not None and self._gz is not None
        vs = self._split(v)
        dot = sum((g * vi).sum() for g, vi in zip(self._ju, vs))
        if not isinstance(dot, Tensor) or not dot.requires_grad:
            self.count += 1
            return torch.zeros_like(v)
        (jv,) = torch.autograd.grad(dot, self._u, retain_graph=True)
        (hjv,) = torch.autograd.grad(self._gz, z, jv, retain_graph=True)
        if row_weights is not None:
            hjv = hjv * row_weights.to(hjv.dtype).reshape(-1, *([1] * (hjv.dim() - 1)))
        return self._out(products.vjp(z, self._diff, hjv), v)

    def sampled_hvp(self, v: Tensor, row_weights: Tensor) -> Tensor:
        """``H_S v``: Hessian of the loss terms re-weighted along dimension 0 of the logits.

        ``row_weights`` (``[rows]``) multiplies the loss's gradient in the logits row-wise, so
        ``∇_θ L_S = Jᵀ (w ⊙ ∇_z L)`` and its derivative is the Hessian of the sub-sampled loss
        (rows with weight 0 are left out). Costs one extra backward pass with graph per call.
        """
        if not self._diff:
            return self._out([], v)
        z = self._logits()
        assert self._gz is not None
        w = row_weights.to(z.dtype).reshape(-1, *([1] * (z.dim() - 1)))
        g_s = torch.autograd.grad(z, self._diff, w * self._gz, create_graph=True, allow_unused=True)
        g_list = [torch.zeros_like(p) if g is None else g for p, g in zip(self._diff, g_s)]
        return self._out(products.hvp(g_list, self._diff, self._split(v)), v)

    def hessian_block(self, start: int, stop: int, chunk: int) -> Tensor:
        """Dense ``∂g_S/∂θ_S`` for the parameters ``params[start:stop]`` (a diagonal block of H).

        Columns come from Hessian-vector products with unit vectors, ``chunk`` at a time through
        ``is_grads_batched`` (vmap); models whose operators have no batching rule fall back to
        one product at a time. Either way the block costs one product per coordinate.

        Args:
            start: First parameter of the block (index into the preconditioned parameters).
            stop: One past its last parameter.
            chunk: Products per autograd call.

        Returns:
            The symmetrised block in float64 (rows and columns of frozen parameters: zero).
        """
        d = sum(self.vec.sizes[start:stop])
        ref = self.params[start]
        full = torch.zeros(d, d, dtype=torch.float64, device=ref.device)
        on = [i for i in range(start, stop) if self.active[i]]
        if len(on) < stop - start:
            if not on:
                return full
            # Only the trained parameters' sub-block; embedded at their coordinates.
            keep = self.vec.mask(start, stop)
            assert keep is not None
            idx = keep.nonzero().squeeze(1)
            sub = self._hessian_rows(on, chunk)
            full[idx[:, None], idx] = sub
            return full
        return self._hessian_rows(on, chunk)

    def _hessian_rows(self, on: list[int], chunk: int) -> Tensor:
        """The symmetrised Hessian block of the parameters ``on`` (all trained), float64."""
        params = [self.params[i] for i in on]
        grads = [self.grads[i] for i in on]
        d = sum(self.vec.sizes[i] for i in on)
        ref = params[0]
        out = torch.zeros(d, d, dtype=torch.float64, device=ref.device)
        self.count += d
        flat_g = torch.cat([g.reshape(-1) for g in grads])
        if not flat_g.requires_grad:
            return out
        batched = chunk > 1
        for lo in range(0, d, chunk):
            hi = min(lo + chunk, d)
            eye = torch.zeros(hi - lo, d, dtype=flat_g.dtype, device=ref.device)
            eye[:, lo:hi].fill_diagonal_(1.0)
            rows = None
            if batched:
                try:
                    rows = self._rows_batched(flat_g, params, eye)
                except RuntimeError:
                    batched = False
            if rows is None:
                rows = torch.stack([self._rows_batched(flat_g, params, e[None])[0] for e in eye])
            out[lo:hi] = rows.to(torch.float64)
        return 0.5 * (out + out.T)

    @staticmethod
    def _rows_batched(flat_g: Tensor, params: list[nn.Parameter], eye: Tensor) -> Tensor:
        cols = torch.autograd.grad(
            flat_g,
            params,
            eye if eye.shape[0] > 1 else eye[0],
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=eye.shape[0] > 1,
        )
        k = eye.shape[0]
        return torch.cat(
            [
                torch.zeros(k, p.numel(), dtype=eye.dtype, device=eye.device)
                if c is None
                else c.reshape(k, -1)
                for p, c in zip(params, cols)
            ],
            dim=1,
        )

    def rows(self) -> int:
        """Rows of the logits (dimension 0), the units of Hessian sub-sampling."""
        return int(self._logits().shape[0])


class SecondOrderGradientMaker(PreconditionedGradientMaker):
    """Base of the methods built on Hessian or GGN products (no capture hooks, any module).

    Subclasses read :attr:`batch` in ``update_curvature``; it exists on curvature steps only and
    is released when the step ends.

    Args:
        model: The model.
        config: The method's config.
    """

    needs_adapter = False

    def __init__(self, model: nn.Module, config: PreconditioningConfig | None = None) -> None:
        super().__init__(model, config)
        self.vec = ParamVector([p for layer in self.layers for p in layer.params])
        self.batch: BatchCurvature | None = None
        self._loss: Tensor | None = None

    def _capture(self) -> bool:
        return False

    def _backward(self, loss: Tensor, curvature_step: bool) -> None:
        if not curvature_step:
            loss.backward()
            return
        params = self.params
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        used = [(p, g) for p, g in zip(params, grads) if g is not None]
        # Clones: p.grad must not share storage with the graph the products differentiate.
        accumulate_grads([p for p, _ in used], [g.detach().clone() for _, g in used])
        by_id = {id(p): g for p, g in zip(params, grads)}
        own = [by_id.get(id(p)) for p in self.vec.params]
        graph_grads = [
            torch.zeros_like(p) if g is None else g for p, g in zip(self.vec.params, own)
        ]
        self.batch = BatchCurvature(
            loss,
            self.vec,
            graph_grads,
            lambda: self.loss_inputs().logits,
            active=self.vec.active(),
        )
        self._loss = loss.detach()

    def _forward_and_backward(self) -> tuple[Any, Tensor]:
        try:
            return super()._forward_and_backward()
        finally:
            self.batch = None  # frees the double-backward graph

    def _trained_part(self, v: Tensor) -> Tensor:
        """``v`` with the slots of frozen parameters zeroed (``v`` itself if none is frozen)."""
        mask = self.vec.mask()
        return v if mask is None else torch.where(mask, v, torch.zeros_like(v))

    @property
    def _curvature_loss(self) -> float | None:
        """The loss of this curvature step as a host float (a sync; damping adaptation)."""
        return None if self._loss is None else float(self._loss)

    @property
    def work_dtype(self) -> torch.dtype:
        """Precision of solver vectors: the parameters' dtype, at least float32."""
        return torch.promote_types(self.vec.params[0].dtype, torch.float32)


@dataclass
class SecantInverse:
    r"""Memoryless BFGS inverse from one exact curvature pair: the stored inverse action.

    A solve ``x = A^{-1} g`` (``A = C + λI``) is an exact secant pair ``(s, y) = (x, g)`` of
    ``A``. The operator

    .. math::

        M = (I - ρ s yᵀ)\, γ I\, (I - ρ y sᵀ) + ρ s sᵀ,\quad ρ = 1/(yᵀs),\ γ = sᵀy / yᵀy

    (L-BFGS with memory 1 and its usual initial scaling; Nocedal & Wright, Numerical
    Optimization, 2006, §7.2) is symmetric positive definite when ``yᵀs > 0``, satisfies
    ``M g = x`` exactly, and scales directions orthogonal to ``g`` by ``γ``, the inverse
    curvature along ``g``. It costs two inner products and three vector updates, no host sync.

    Attributes:
        s: The solution ``x`` (flat), or ``None`` before the first pair.
        y: The right-hand side ``g``.
    """

    s: Tensor | None = None
    y: Tensor | None = None

    @staticmethod
    def acceptable(s: Tensor, y: Tensor) -> bool:
        """Whether ``(s, y)`` gives a positive definite operator (finite, ``yᵀs > 0``); syncs."""
        sy = s.dot(y)
        return bool(torch.isfinite(s).all() & torch.isfinite(sy) & (sy > 0))

    def set(self, s: Tensor, y: Tensor) -> None:
        """Store a new pair (checked with :meth:`acceptable` by the caller; not copied)."""
        self.s, self.y = s, y

    @property
    def ready(self) -> bool:
        """Whether a pair is stored."""
        return self.s is not None

    def apply(self, v: Tensor) -> Tensor:
        """``M v``."""
        assert self.s is not None and self.y is not None
        s, y = self.s, self.y.to(self.s.dtype)
        v = v.to(s.dtype)
        sy = s.dot(y)
        rho = 1.0 / sy
        gamma = sy / y.dot(y)
        alpha = rho * s.dot(v)
        q = v - alpha * y
        r = gamma * q
        beta = rho * y.dot(r)
        return r + (alpha - beta) * s

    def state_dict(self) -> dict[str, Any]:
        """The pair, cloned."""
        return {
            "s": None if self.s is None else self.s.clone(),
            "y": None if self.y is None else self.y.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.s = None if state["s"] is None else state["s"].clone()
        self.y = None if state["y"] is None else state["y"].clone()


@dataclass
class DampingAdapter:
    r"""Levenberg-Marquardt damping from the reduction ratio, measured across curvature steps.

    On a curvature step the method records the loss ``L₀``, the direction ``u`` written into
    ``p.grad``, ``gᵀu``, ``uᵀCu`` (the curvature the method's model uses) and ``⟨θ₀, u⟩``. The
    optimizer then moves the parameters; at the next curvature step the length ``c`` of the
    move along ``-u`` is ``(⟨θ₀, u⟩ − ⟨θ₁, u⟩) / ‖u‖²`` (the learning rate for plain SGD), the
    model predicts the change ``m(c) = −c gᵀu + c²/2 uᵀCu`` and the ratio is
    ``ρ = (L₁ − L₀) / m(c)``. ``ρ < low`` multiplies the damping by ``growth``, ``ρ > high``
    divides it. The ratio is exact for full-batch training with SGD and a curvature update
    every step; with mini-batches, momentum or intervals it compares different batches or
    includes other moves, which makes it a heuristic (turn it off with ``adapt_damping=False``).

    Attributes:
        damping: The current damping ``λ``.
        low: Ratio below which the damping grows.
        high: Ratio above which it shrinks.
        growth: Multiplicative factor ``> 1``.
        record: The scalars of the last curvature step (``None`` before the first).
    """

    damping: float
    low: float
    high: float
    growth: float
    record: dict[str, float] | None = None
    #: The damping stays within these bounds.
    bounds: tuple[float, float] = (1e-8, 1e8)

    def observe(self, loss: float, theta_dot_u: float) -> float | None:
        """Adapt the damping from the loss at the new point; returns the ratio (or ``None``).

        Args:
            loss: The loss of the current curvature step (at the new parameters).
            theta_dot_u: ``⟨θ₁, u⟩`` for the previous step's ``u``.
        """
        rec = self.record
        if rec is None or rec["uu"] <= 0.0:
            return None
        c = (rec["theta_u"] - theta_dot_u) / rec["uu"]
        predicted = -c * rec["gu"] + 0.5 * c * c * rec["ucu"]
        if not c > 0.0 or not predicted < 0.0:
            return None
        ratio = (loss - rec["loss"]) / predicted
        if ratio < self.low:
            self.damping = min(self.damping * self.growth, self.bounds[1])
        elif ratio > self.high:
            self.damping = max(self.damping / self.growth, self.bounds[0])
        return ratio

    def remember(self, loss: float, gu: float, ucu: float, uu: float, theta_u: float) -> None:
        """Record the scalars of this curvature step's direction."""
        self.record = {"loss": loss, "gu": gu, "ucu": ucu, "uu": uu, "theta_u": theta_u}

    def state_dict(self) -> dict[str, Any]:
        """Damping and the last record."""
        return {
            "damping": self.damping,
            "record": None if self.record is None else dict(self.record),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.damping = float(state["damping"])
        self.record = None if state["record"] is None else dict(state["record"])
