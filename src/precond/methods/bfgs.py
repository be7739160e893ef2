r"""Damped BFGS and L-BFGS updates of inverse-Hessian approximations, batched.

All functions take a batch of ``G`` independent problems: vectors ``[G, d]``, matrices
``[G, d, d]``. ``H`` approximates an inverse Hessian; a pair ``(s, y)`` with ``y ≈ B s`` updates
it by

.. math::

    H^+ = (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ, \qquad ρ = 1 / sᵀy,

which satisfies the secant condition ``H⁺ y = s`` and stays positive definite when ``H`` is and
``sᵀy > 0``. Stochastic pairs need not have ``sᵀy > 0``; *double damping* (Goldfarb, Ren &
Bahamou 2020, Algorithm 3) makes them so:

1. Powell damping on ``H``: if ``sᵀy < μ₁ yᵀHy``, ``s ← θ s + (1 − θ) H y`` with
   ``θ = (1 − μ₁) yᵀHy / (yᵀHy − sᵀy)``, so that ``sᵀy = μ₁ yᵀHy``;
2. Levenberg-Marquardt-type damping (Powell's rule with ``B = I``): if ``sᵀy < μ₂ sᵀs``,
   ``y ← θ y + (1 − θ) s`` with ``θ = (1 − μ₂) sᵀs / (sᵀs − sᵀy)``, so that ``sᵀy = μ₂ sᵀs``.

After both, ``sᵀy ≥ μ₂ sᵀs > 0`` (for ``s ≠ 0``), so every update keeps ``H`` positive definite.
The L-BFGS form keeps the last ``m`` pairs and applies ``H`` by the two-loop recursion from
``H₀ = h₀ I``; with ``m`` at least the number of pairs it equals the BFGS matrix.

Reference:
    D. Goldfarb, Y. Ren, A. Bahamou. Practical Quasi-Newton Methods for Training Deep Neural
    Networks. NeurIPS 2020. https://arxiv.org/abs/2006.08877
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..numerics import is_finite

__all__ = [
    "bfgs_update",
    "double_damping",
    "lbfgs_apply",
    "lbfgs_append",
    "lm_damping",
    "powell_damping",
]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.linalg.vecdot(a, b)


def powell_damping(s: Tensor, y: Tensor, hy: Tensor, mu: float) -> Tensor:
    """Powell's damping on the inverse approximation: returns the damped ``s``.

    Args:
        s: ``[G, d]``.
        y: ``[G, d]``.
        hy: ``H y`` ``[G, d]``.
        mu: ``μ₁ ∈ (0, 1)``.

    Returns:
        ``s̃`` with ``s̃ᵀy ≥ μ₁ yᵀHy``.
    """
    sy, yhy = _dot(s, y), _dot(y, hy)
    return torch.lerp(hy, s, _powell_theta(sy, yhy, mu))


def lm_damping(s: Tensor, y: Tensor, mu: float) -> Tensor:
    """Powell's rule with ``B = I``: returns the damped ``y`` with ``sᵀỹ ≥ μ₂ sᵀs``.

    Args:
        s: ``[G, d]``.
        y: ``[G, d]``.
        mu: ``μ₂ ∈ (0, 1)``.

    Returns:
        ``ỹ``.
    """
    ss, sy = _dot(s, s), _dot(s, y)
    return torch.lerp(s, y, _powell_theta(sy, ss, mu))


def _powell_theta(lhs: Tensor, rhs: Tensor, mu: float) -> Tensor:
    """Powell's weight ``θ = (1 − μ) r / (r − l)`` where ``l < μ r``, else 1, as ``[G, 1]``.

    Where damped, ``r − l > (1 − μ) r ≥ 0`` (``r`` is a squared norm in ``H``'s or the
    identity's metric; for ``r = 0``, ``r − l = −l > 0``); elsewhere the quotient, whose
    denominator may be 0, is discarded by the selection. ``θ s + (1 − θ) t`` is then
    ``lerp(t, s, θ)``, which returns ``s`` itself where ``θ = 1``.
    """
    damp = lhs < mu * rhs
    return torch.where(damp, (1.0 - mu) * rhs / (rhs - lhs), 1.0).unsqueeze(-1)


def double_damping(
    s: Tensor, y: Tensor, hy: Tensor, mu1: float, mu2: float
) -> tuple[Tensor, Tensor]:
    """Double damping (Powell on ``H``, then Levenberg-Marquardt-type).

    Args:
        s: ``[G, d]``.
        y: ``[G, d]``.
        hy: ``H y``.
        mu1: Powell's ``μ₁``.
        mu2: The Levenberg-Marquardt ``μ₂``.

    Returns:
        ``(s̃, ỹ)``.
    """
    s = powell_damping(s, y, hy, mu1)
    return s, lm_damping(s, y, mu2)


def bfgs_update(h: Tensor, s: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The BFGS update of inverse approximations ``[G, d, d]``.

    Batch entries with ``sᵀy ≤ 0`` or a non-finite result keep ``H``. One pass over the
    matrices (a rank-2 ``baddbmm``) and one host synchronisation (whether every entry updated).

    Args:
        h: Symmetric ``H`` ``[G, d, d]``.
        s: ``[G, d]``.
        y: ``[G, d]``.

    Returns:
        ``(H⁺, updated)`` with ``updated`` a ``[G]`` boolean mask.
    """
    sy = _dot(s, y)
    ok = sy > 0
    # ρ = 1 / sᵀy where positive, else 0 (the discarded reciprocal may be infinite)
    rho = torch.where(ok, sy.reciprocal(), 0.0).unsqueeze(-1)  # [G, 1]
    hy = (h @ y.unsqueeze(-1)).squeeze(-1)
    coef = rho * (rho * _dot(y, hy).unsqueeze(-1) + 1.0)  # ρ² yᵀHy + ρ
    # Expanded, H⁺ = H + coef·s sᵀ − ρ (s (Hy)ᵀ + Hy sᵀ) = H + U Vᵀ, a rank-2 update in one
    # pass over H: U = [s, Hy], V = [coef·s − ρ Hy, −ρ s].
    u = torch.stack([s, hy], dim=-1)  # [G, d, 2]
    rs = rho * s
    v = torch.stack([torch.addcmul(coef * s, rho, hy, value=-1.0), rs.neg_()], dim=-2)
    new = torch.baddbmm(h, u, v)
    # A sum is non-finite whenever an entry is (or the sum overflows: then H⁺ is useless too).
    ok = ok & is_finite(new.sum(dim=(-2, -1)))
    if bool(ok.all()):  # the common case: no second pass over the matrices
        return new, ok
    return torch.where(ok[:, None, None], new, h), ok


def lbfgs_apply(s: Tensor, y: Tensor, h0: float, x: Tensor) -> Tensor:
    """``H x`` by the two-loop recursion, for matrices ``x`` ``[G, d, k]`` (columns).

    Args:
        s: Stored pairs ``[G, m, d]`` (oldest first; ``m`` may be 0).
        y: ``[G, m, d]``.
        h0: Scale of ``H₀ = h₀ I``.
        x: ``[G, d, k]``.

    Returns:
        ``H x`` ``[G, d, k]``.
    """
    m = s.shape[1]
    sy = _dot(s, y)  # [G, m]
    # A pair with sᵀy ≤ 0 (stored as zeros where a batch entry had no usable pair) is a no-op.
    rho = torch.where(sy > 0, 1.0 / torch.where(sy > 0, sy, 1.0), 0.0)
    q = x
    alphas = []
    for i in range(m - 1, -1, -1):
        a = rho[:, i, None] * (s[:, i, :, None] * q).sum(1)  # [G, k]
        q = q - y[:, i, :, None] * a.unsqueeze(1)
        alphas.append(a)
    r = h0 * q
    for i in range(m):
        b = rho[:, i, None] * (y[:, i, :, None] * r).sum(1)
        r = r + s[:, i, :, None] * (alphas[m - 1 - i] - b).unsqueeze(1)
    return r


def lbfgs_append(
    s_mem: Tensor, y_mem: Tensor, s: Tensor, y: Tensor, memory: int
) -> tuple[Tensor, Tensor]:
    """Append a pair to the memory, dropping the oldest beyond ``memory``.

    Every batch entry gets the pair; callers store zeros where an entry has no usable pair
    (``sᵀy ≤ 0``), which :func:`lbfgs_apply` treats as a no-op.

    Args:
        s_mem: ``[G, m, d]``.
        y_mem: ``[G, m, d]``.
        s: ``[G, d]``.
        y: ``[G, d]``.
        memory: Maximum number of pairs.

    Returns:
        The new ``(S, Y)``.
    """
    s_mem = torch.cat([s_mem, s.unsqueeze(1)], dim=1)[:, -memory:]
    y_mem = torch.cat([y_mem, y.unsqueeze(1)], dim=1)[:, -memory:]
    return s_mem, y_mem
