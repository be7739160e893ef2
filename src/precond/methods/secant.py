"""Amortisation tools of the Hessian/GGN methods (see :mod:`precond.methods.second_order`).

:class:`SecantInverse` turns one solve ``x ≈ (C + λI)^{-1} g`` into a linear operator applied
on the steps in between, :class:`PairPool` recycles the buffers of its pairs, and
:class:`DampingAdapter` is the Levenberg-Marquardt damping rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .flat import ParamVector, row, stack_rows

__all__ = ["DampingAdapter", "PairPool", "SecantInverse"]


class PairPool:
    """``[2, P]`` buffers for new secant pairs, reused once the state no longer holds them.

    A curvature step solves into a fresh pair while the previous one is still held (it is kept
    if the new solve is rejected); reusing the pairs the state has let go avoids allocating
    (and page-faulting) parameter-sized memory on every curvature step.

    Args:
        vec: The flat layout.
        dtype: The pairs' dtype.
    """

    def __init__(self, vec: ParamVector, dtype: torch.dtype) -> None:
        self.vec = vec
        self.dtype = dtype
        self._pairs: list[Tensor] = []

    def take(self, *held: Tensor | None) -> Tensor:
        """A pair that is none of ``held`` (uninitialised)."""
        for pair in self._pairs:
            if not any(pair is t for t in held):
                return pair
        pair = self.vec.empty(2, dtype=self.dtype)
        self._pairs = [*self._pairs[-2:], pair]
        return pair

    def clear(self) -> None:
        """Forget the buffers (after loading a state)."""
        self._pairs = []


#: Elements from which :meth:`SecantInverse.apply_to_grads` reads and updates a CPU
#: parameter's slot one row of the pair at a time (below, one matrix-vector product per pass
#: costs fewer operator calls than the two rows' four).
ROW_PASS_MIN = 4096


class SecantInverse:
    r"""Memoryless BFGS inverse from one exact curvature pair: the stored inverse action.

    A solve ``x = A^{-1} g`` (``A = C + λI``) is an exact secant pair ``(s, y) = (x, g)`` of
    ``A``. The operator

    .. math::

        M = (I - ρ s yᵀ)\, γ I\, (I - ρ y sᵀ) + ρ s sᵀ,\quad ρ = 1/(yᵀs),\ γ = sᵀy / yᵀy

    (L-BFGS with memory 1 and its usual initial scaling; Nocedal & Wright, Numerical
    Optimization, 2006, §7.2) is symmetric positive definite when ``yᵀs > 0``, satisfies
    ``M g = x`` exactly, and scales directions orthogonal to ``g`` by ``γ``, the inverse
    curvature along ``g``. Expanded, ``M = γI + W K Wᵀ`` with ``W = [s, y]`` and the constant
    ``K = [[2ρ, −1/yᵀy], [−1/yᵀy, 0]]``, so that applying it costs one pass for ``Wᵀv`` and
    one for ``γv + W(KWᵀv)`` (``γ`` and ``K`` are computed when the pair is set), no host sync.

    Attributes:
        pair: ``[2, P]``: rows ``s`` and ``y``, or ``None`` before the first pair.
    """

    def __init__(self) -> None:
        self.pair: Tensor | None = None
        self._gamma = 0.0
        self._k: Tensor | None = None

    @property
    def s(self) -> Tensor | None:
        """The solution ``x`` (flat)."""
        return row(self.pair, 0)

    @property
    def y(self) -> Tensor | None:
        """The right-hand side ``g``."""
        return row(self.pair, 1)

    @staticmethod
    def curvature(s: Tensor, y: Tensor) -> float | None:
        """``sᵀy`` if ``(s, y)`` gives a positive definite operator, else ``None``; syncs.

        The pair is acceptable when both vectors are finite and ``sᵀy > 0``. The one inner
        product decides both: a non-finite ``sᵢ`` or ``yᵢ`` makes the term ``sᵢyᵢ`` NaN
        (``∞·0``, or a NaN factor) or infinite, and a sum with such a term is never finite, so
        no separate pass checks the entries (finite vectors whose product overflows are
        rejected too, as they should be). Callers pass the value on to :meth:`set_pair`.
        """
        sy = float(s.dot(y))
        return sy if math.isfinite(sy) and sy > 0.0 else None

    @staticmethod
    def acceptable(s: Tensor, y: Tensor) -> bool:
        """Whether ``(s, y)`` gives a positive definite operator (see :meth:`curvature`)."""
        return SecantInverse.curvature(s, y) is not None

    def set(self, s: Tensor, y: Tensor) -> None:
        """Store a new pair (copied; checked with :meth:`acceptable` by the caller)."""
        self.set_pair(stack_rows([s, y.to(s.dtype)]))

    def set_pair(self, pair: Tensor, sy: float | None = None) -> None:
        """Store ``pair = [s; y]`` (``[2, P]``, not copied) and its constants (one host sync).

        Args:
            pair: The rows ``s`` and ``y``.
            sy: ``sᵀy`` when the caller has it (:meth:`curvature`, the same inner product
                bit for bit); only ``yᵀy`` is then computed. Inner products rather than one
                two-row matrix-vector product, which MKL runs at a third of their speed.
        """
        s, y = pair[0], pair[1]
        if sy is None:
            sy, yy = torch.stack([s.dot(y), y.dot(y)]).tolist()  # one host sync
        else:
            yy = float(y.dot(y))
        self._gamma = sy / yy
        k = [[2.0 / sy, -1.0 / yy], [-1.0 / yy, 0.0]]
        self._set(pair, torch.tensor(k, dtype=pair.dtype, device=pair.device))

    def _set(self, pair: Tensor, k: Tensor) -> None:
        self.pair, self._k = pair, k

    @property
    def ready(self) -> bool:
        """Whether a pair is stored."""
        return self.pair is not None

    def apply(self, v: Tensor) -> Tensor:
        """``M v`` for a flat ``v`` (a new vector)."""
        assert self.pair is not None and self._k is not None
        v = v.to(self.pair.dtype)
        c = self._k @ (self.pair @ v)
        return torch.addmv(v, self.pair.T, c, beta=self._gamma)

    def apply_to_grads(self, vec: ParamVector, scale: float = 1.0) -> Tensor | None:
        """``p.grad ← scale · M p.grad`` in place (flat coordinates of ``vec``).

        Frozen parameters and those without a gradient count as zeros of ``g`` and are not
        written. Two passes over the gradients, one reading ``Wᵀg`` and one writing
        ``γ g + W c`` per parameter; no flat copy of ``g``, no host sync. On a CPU, parameters
        of at least :data:`ROW_PASS_MIN` elements take the pair's two rows one at a time
        (two dot products, then a scaling and two ``addcmul_``): MKL's matrix-vector product
        with a two-row matrix runs well below the memory bandwidth (a 401k-element parameter:
        54 µs for ``mv`` and 68 µs for ``addmv_``, against 36 µs for the dot products and
        44 µs for the update); smaller ones, and other devices, use one matrix-vector product
        per pass. Both give ``M g`` to float rounding.

        Returns:
            ``c = scale · K Wᵀg`` (``[2]``): ``scale · M g`` is ``W c`` at the coordinates
            without a gradient; ``None`` when no parameter has one (nothing written).
        """
        assert self.pair is not None and self._k is not None
        items = []
        for g, a, b in vec.trained_grads():
            inplace = g.dtype == self.pair.dtype and g.is_contiguous()
            flat = g.view(-1) if inplace else g.reshape(-1).to(self.pair.dtype)
            rows = flat.device.type == "cpu" and flat.numel() >= ROW_PASS_MIN
            items.append((flat, g, self.pair[:, a:b], inplace, rows))
        if not items:
            return None
        parts = [
            torch.stack([w[0].dot(flat), w[1].dot(flat)]) if rows else torch.mv(w, flat)
            for flat, _, w, _, rows in items
        ]
        wv = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
        c = self._k @ wv
        if scale != 1.0:
            c.mul_(scale)
        c0, c1 = c.unbind()
        beta = scale * self._gamma
        for flat, g, w, inplace, rows in items:
            if rows:
                flat.mul_(beta).addcmul_(w[0], c0).addcmul_(w[1], c1)
            else:
                flat.addmv_(w.T, c, beta=beta)
            if not inplace:
                g.copy_(flat.view(g.shape))
        return c

    def state_dict(self) -> dict[str, Any]:
        """The pair and its constants, cloned."""
        return {
            "s": None if self.s is None else self.s.clone(),
            "y": None if self.y is None else self.y.clone(),
            "gamma": self._gamma,
            "k": None if self._k is None else self._k.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if state["s"] is None:
            self.pair, self._k, self._gamma = None, None, 0.0
            return
        self._gamma = float(state["gamma"])
        self._set(stack_rows([state["s"], state["y"]]), state["k"].clone())


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
