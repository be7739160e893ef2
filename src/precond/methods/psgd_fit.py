r"""Fitting PSGD preconditioners on Lie groups (Li 2018; Li 2022): the math, as pure functions.

A preconditioner ``P = QᵀQ`` is fitted to pairs ``(v, h)`` (a probe and the curvature applied to
it, ``h = H v``; or, for gradient whitening, ``v`` random and ``h`` the gradient) by descending
the criterion

.. math::

    c(Q) = E[hᵀ P h + vᵀ P^{-1} v],

whose minimiser satisfies ``P E[h hᵀ] P = E[v vᵀ]``: ``P = |H|^{-1}`` for Newton pairs and
``P = (E[g gᵀ])^{-1/2}`` for whitening pairs. With ``a = Q h`` and ``b = Q^{-T} v`` a
multiplicative perturbation ``Q ← (I + E) Q`` changes ``c`` by ``2 tr(E (a aᵀ − b bᵀ))``, so the
*relative* gradient on the group is ``a aᵀ − b bᵀ``. Each factor takes a step of
*normalised* size: the step ``μ < 1`` is divided by a bound of the relative gradient's size, so
``‖η ∇‖ ≈ μ`` (the trust region of Li's papers) and ``Q`` provably stays invertible: triangular
and diagonal factors are normalised by a bound that is at least every ``|∇_ii|``, so the diagonal
of ``I − η ∇`` stays within ``[1 − μ, 1 + μ]``; the low-rank steps are normalised by the Frobenius
norm of the perturbation, which bounds its spectral norm by ``μ``. Three groups are implemented:

* **Kronecker** (per matrix ``G ∈ R^{m×n}``): ``Q = Q₂ ⊗ Q₁`` acting as ``Q₁ G Q₂ᵀ``; each factor
  is upper triangular (dense) or diagonal. With ``A = Q₁ H Q₂ᵀ`` and ``B = Q₁^{-T} V Q₂^{-1}``
  the relative gradients are ``A Aᵀ − B Bᵀ`` and ``AᵀA − BᵀB`` (projected on the upper
  triangle for triangular factors, on the diagonal for diagonal ones).
* **Low-rank plus diagonal** (LRA, Li 2022): ``Q = (I + U Vᵀ) diag(d)`` over the concatenation of
  all parameters, ``U, V ∈ R^{N×r}``; ``d``, ``U`` and ``V`` are updated on the groups of
  diagonal matrices and of matrices ``I + U Vᵀ`` with one of ``U``, ``V`` fixed.
* **Diagonal**: ``Q = diag(d)``, relative gradient ``(d h)² − (v / d)²``.

Shapes: Kronecker functions take a batch of ``b`` same-shaped matrices, ``[b, m, n]``, with
factors ``[b, m, m]`` (dense) or ``[b, m]`` (diagonal). Every function works in the dtype of its
inputs (callers use float32 or better) and never synchronises with the host.

References:
    X.-L. Li. Preconditioned Stochastic Gradient Descent. IEEE TNNLS 2018.
    https://arxiv.org/abs/1512.04202

    X.-L. Li. Black Box Lie Group Preconditioners for SGD. 2022.
    https://arxiv.org/abs/2211.04422
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..numerics import is_finite

__all__ = [
    "diag_fit",
    "initial_scale",
    "kron_apply",
    "kron_fit",
    "kron_precond_factor",
    "kron_relative_grads",
    "kron_step",
    "lra_apply",
    "lra_fit",
    "norm_lower_bound",
    "triangular_chunks",
    "triangular_update_blocks",
]


def _tiny(t: Tensor) -> float:
    return float(torch.finfo(t.dtype).tiny) ** 0.5


def norm_lower_bound(s: Tensor) -> Tensor:
    """A tight lower bound of the spectral norm of symmetric matrices ``[..., d, d]``.

    With ``x`` the row of largest norm, ``‖S‖ ≥ ‖x S‖ / ‖x‖ ≥ ‖x‖ ≥ ‖S‖ / √d``; in practice the
    first bound is within a small factor of ``‖S‖`` (one power-iteration step from a good start).

    Args:
        s: Symmetric matrices.

    Returns:
        ``[...]`` bounds (0 for zero matrices).
    """
    rows = s.norm(dim=-1)
    idx = rows.argmax(dim=-1, keepdim=True).unsqueeze(-1)
    x = torch.gather(s, -2, idx.expand(*s.shape[:-2], 1, s.shape[-1]))
    sx = (x @ s).norm(dim=(-2, -1))
    return torch.maximum(sx / x.norm(dim=(-2, -1)).clamp(min=_tiny(s)), rows.amax(dim=-1))


def initial_scale(v: Tensor, h: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Li's initial ``P = (E v² / E h²)^{1/2} I``: returns that ``P`` scale per batch entry.

    Non-finite or zero ratios (a zero curvature probe) give 1.

    Args:
        v: Probes.
        h: Curvature-vector products (same shape).
        dims: The dimensions to average over.

    Returns:
        The scale of ``P``, reduced over ``dims``.
    """
    ratio = (v.square().mean(dim=dims) / h.square().mean(dim=dims)).sqrt()
    ok = torch.isfinite(ratio) & (ratio > 0)
    return torch.where(ok, ratio, torch.ones_like(ratio))


# ---- Kronecker --------------------------------------------------------------------------------
def _left(q: Tensor, x: Tensor) -> Tensor:
    """``Q₁ X``."""
    return q @ x if q.dim() == 3 else q.unsqueeze(-1) * x


def _right_t(x: Tensor, q: Tensor) -> Tensor:
    """``X Q₂ᵀ``."""
    return x @ q.transpose(-1, -2) if q.dim() == 3 else x * q.unsqueeze(-2)


def _left_inv_t(q: Tensor, x: Tensor) -> Tensor:
    """``Q₁^{-T} X`` (triangular solve, never LU)."""
    if q.dim() == 3:
        return torch.linalg.solve_triangular(q.transpose(-1, -2), x, upper=False)
    return x / q.unsqueeze(-1)


def _right_inv(x: Tensor, q: Tensor) -> Tensor:
    """``X Q₂^{-1}``."""
    if q.dim() == 3:
        return torch.linalg.solve_triangular(q, x, upper=True, left=False)
    return x / q.unsqueeze(-2)


#: Blocks per side of the triangular products ``S Q`` and ``QᵀQ`` (:func:`triangular_chunks`).
TRIANGULAR_CHUNKS = 4

#: Smallest factor order whose triangular products are formed in blocks: below it, the blocks'
#: extra operators cost more than the multiply-adds they save (cnn_small's factors).
TRIANGULAR_MIN_ORDER = 256


def triangular_chunks(n: int) -> list[tuple[int, int]]:
    """The ranges ``[lo, hi)`` that split an order-``n`` factor's rows and columns in blocks.

    :data:`TRIANGULAR_CHUNKS` equal ranges from order :data:`TRIANGULAR_MIN_ORDER` on, one
    (the whole factor) below.
    """
    if n < TRIANGULAR_MIN_ORDER:
        return [(0, n)]
    width = -(-n // TRIANGULAR_CHUNKS)
    return [(lo, min(n, lo + width)) for lo in range(0, n, width)]


def triangular_update_blocks(n: int) -> list[tuple[int, int, int, int]]:
    """Blocks ``(lo, hi, lo_j, hi_j)`` of ``S Q`` for upper triangular ``S`` and ``Q``.

    Block ``(I, J)`` (``I ≤ J``, the others are zero) is ``S[I, I..J] Q[I..J, J]``: the only
    non-zero terms of ``Σ_L S[I, L] Q[L, J]`` are ``I ≤ L ≤ J``. With 4 ranges per side the
    ten blocks need 20/64 of the whole product's multiply-adds (the minimum, for fine blocks,
    is 1/6). In the order listed (row blocks ascending), a block reads only rows ``≥ I`` of
    ``Q``, which no earlier block wrote: ``Q`` can be updated in place.
    """
    ranges = triangular_chunks(n)
    return [(lo, hi, lo_j, hi_j) for i, (lo, hi) in enumerate(ranges) for lo_j, hi_j in ranges[i:]]


def _step_dense(q: Tensor, grad: Tensor, lr: float) -> None:
    """``Q ← Q − η triu(∇) Q`` (``grad`` is a temporary: it is overwritten).

    ``Q`` is upper triangular (it starts as a multiple of ``I`` and every step keeps the form),
    so the product is formed in the blocks of :func:`triangular_update_blocks`, in place: a
    block's product (the only temporary, at most a block in size) reads the block it updates
    before writing it.
    """
    eta = lr / norm_lower_bound(grad).clamp(min=_tiny(grad))
    step = grad.triu_().mul_(eta[:, None, None])
    for lo, hi, lo_j, hi_j in triangular_update_blocks(q.shape[-1]):
        q[..., lo:hi, lo_j:hi_j].sub_(step[..., lo:hi, lo:hi_j] @ q[..., lo:hi_j, lo_j:hi_j])


def _step_diag(q: Tensor, grad: Tensor, lr: float) -> None:
    eta = lr / grad.abs().amax(dim=-1).clamp(min=_tiny(grad))
    q.sub_(eta[:, None] * grad * q)


def _max_abs(q: Tensor) -> Tensor:
    # no |q| temporary; amax and amin apart (on CPU, aminmax over a dimension is ~20x slower)
    flat = q.flatten(1)
    return torch.maximum(flat.amax(dim=-1), flat.amin(dim=-1).neg_())


def _balance(q1: Tensor, q2: Tensor) -> None:
    """Rescale the two factors to equal max-abs entries (their product is unchanged)."""
    n1, n2 = _max_abs(q1), _max_abs(q2)
    ok = (n1 > 0) & (n2 > 0) & is_finite(n1 * n2)
    rho = (n1 * n2).sqrt()
    f1 = torch.where(ok, rho / n1, torch.ones_like(n1))
    f2 = torch.where(ok, rho / n2, torch.ones_like(n2))
    q1.mul_(f1.view(-1, *[1] * (q1.dim() - 1)))
    q2.mul_(f2.view(-1, *[1] * (q2.dim() - 1)))


def kron_fit(q1: Tensor, q2: Tensor, v: Tensor, h: Tensor, lr: float) -> None:
    """One normalised Lie-group step of Kronecker factors on pairs ``(V, H)``, in place.

    Args:
        q1: Row factors ``[b, m, m]`` (upper triangular) or ``[b, m]`` (diagonal).
        q2: Column factors ``[b, n, n]`` or ``[b, n]``.
        v: Probes ``[b, m, n]``.
        h: Curvature-vector products ``[b, m, n]``.
        lr: Normalised step size ``μ ∈ (0, 1)``.
    """
    kron_step(q1, q2, *kron_relative_grads(q1, q2, v, h), lr)


def kron_relative_grads(q1: Tensor, q2: Tensor, v: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """The relative gradients ``A Aᵀ − B Bᵀ`` and ``AᵀA − BᵀB`` of both factors.

    ``A = Q₁ H Q₂ᵀ`` and ``B = Q₁^{-T} V Q₂^{-1}``; diagonal factors get the diagonals of the
    relative gradients.

    Args:
        q1: Row factors ``[b, m, m]`` or ``[b, m]``.
        q2: Column factors ``[b, n, n]`` or ``[b, n]``.
        v: Probes ``[b, m, n]``.
        h: Curvature-vector products ``[b, m, n]``.

    Returns:
        ``(∇₁, ∇₂)`` shaped like the factors.
    """
    a = _right_t(_left(q1, h), q2)
    b = _right_inv(_left_inv_t(q1, v), q2)
    # the second Gram product accumulates into the first one's fresh memory (no copy)
    if q1.dim() == 3:
        grad1 = (a @ a.mT).baddbmm_(b, b.mT, alpha=-1.0)
    else:
        grad1 = a.square().sum(-1) - b.square().sum(-1)
    if q2.dim() == 3:
        grad2 = (a.mT @ a).baddbmm_(b.mT, b, alpha=-1.0)
    else:
        grad2 = a.square().sum(-2) - b.square().sum(-2)
    return grad1, grad2


def kron_step(q1: Tensor, q2: Tensor, grad1: Tensor, grad2: Tensor, lr: float) -> None:
    """Normalised steps of both factors along their relative gradients, then rebalancing.

    Args:
        q1: Row factors, updated in place.
        q2: Column factors, updated in place.
        grad1: ``∇₁`` (:func:`kron_relative_grads`), overwritten.
        grad2: ``∇₂``, overwritten.
        lr: Normalised step size ``μ ∈ (0, 1)``.
    """
    for q, grad in ((q1, grad1), (q2, grad2)):
        if q.dim() == 3:
            _step_dense(q, grad, lr)
        else:
            _step_diag(q, grad, lr)
    _balance(q1, q2)


def kron_precond_factor(q: Tensor, out: Tensor | None = None) -> Tensor:
    """``QᵀQ`` of a dense factor or ``q²`` of a diagonal one (into ``out`` if given).

    A dense ``Q`` is upper triangular: row block ``[lo, hi)`` of ``QᵀQ`` right of its diagonal
    start is ``Q[:hi, lo:hi]ᵀ Q[:hi, lo:]`` (only rows ``< hi`` of those columns are non-zero;
    with the ranges of :func:`triangular_chunks`, 20/64 of the whole product's multiply-adds),
    written straight into ``out``; the blocks left of the diagonal are the mirror of those
    above it.
    """
    if q.dim() != 3:
        return torch.square(q, out=out) if out is not None else q.square()
    p = out if out is not None else torch.empty_like(q)
    ranges = triangular_chunks(q.shape[-1])
    for lo, hi in ranges:
        torch.bmm(q[..., :hi, lo:hi].mT, q[..., :hi, lo:], out=p[..., lo:hi, lo:])
    for lo, hi in ranges[:-1]:
        p[..., hi:, lo:hi].copy_(p[..., lo:hi, hi:].mT)
    return p


def kron_apply(p1: Tensor, p2: Tensor, g: Tensor, out: Tensor | None = None) -> Tensor:
    """``P₁ G P₂`` for ``G`` of shape ``[b, m, n]`` (factors dense or diagonal).

    Args:
        p1: ``[b, m, m]`` or ``[b, m]``.
        p2: ``[b, n, n]`` or ``[b, n]``.
        g: ``[b, m, n]``.
        out: Where to write the result (``[b, m, n]``, not overlapping ``g``), or ``None``.

    Returns:
        The result (``out`` if given).
    """
    p1, p2 = p1.to(g.dtype), p2.to(g.dtype)
    left = p1 @ g if p1.dim() == 3 else p1.unsqueeze(-1) * g
    if p2.dim() == 3:  # bmm writes into ``out`` itself (matmul would copy from a temporary)
        return torch.bmm(left, p2, out=out) if out is not None else left @ p2
    return torch.mul(left, p2.unsqueeze(-2), out=out) if out is not None else left * p2[:, None]


# ---- diagonal ---------------------------------------------------------------------------------
def diag_fit(d: list[Tensor], v: list[Tensor], h: list[Tensor], lr: float) -> None:
    """One normalised step of a diagonal ``Q = diag(d)`` split over tensors, in place.

    The step is normalised by the largest entry of the relative gradient over all tensors.

    Args:
        d: Diagonal of ``Q``, one tensor per parameter.
        v: Probes.
        h: Curvature-vector products.
        lr: Normalised step size.
    """
    grads = [(di * hi).square() - (vi / di).square() for di, vi, hi in zip(d, v, h)]
    top = torch.stack([g.abs().amax() for g in grads]).amax()
    eta = lr / top.clamp(min=_tiny(top))
    for di, g in zip(d, grads):
        di.sub_(eta * g * di)


# ---- low rank plus diagonal -------------------------------------------------------------------
def _solve_small(m: Tensor, rhs: Tensor) -> Tensor:
    # One r×r system (r is the rank, small): a single unbatched solve is safe (DESIGN.md §8).
    return torch.linalg.solve(m, rhs)


def lra_fit(d: Tensor, u: Tensor, vv: Tensor, v: Tensor, h: Tensor, lr: float, which: str) -> None:
    """One normalised step of ``Q = (I + U Vᵀ) diag(d)`` on a pair ``(v, h)``, in place.

    ``d`` always moves (group of diagonal matrices, right factor); then ``U`` (``which="u"``,
    group ``{I + U Vᵀ}`` with ``V`` fixed, left factor) or ``V`` (``which="v"``, ``U`` fixed).
    All steps use the same ``a = Q h`` and ``b = Q^{-T} v``.

    Args:
        d: ``[N]``.
        u: ``[N, r]``.
        vv: ``[N, r]`` (the ``V`` of ``U Vᵀ``).
        v: Probe ``[N]``.
        h: Curvature-vector product ``[N]``.
        lr: Normalised step size.
        which: ``"u"`` or ``"v"``.
    """
    r = u.shape[1]
    eye = torch.eye(r, dtype=u.dtype, device=u.device)
    ip_vtu = eye + vv.T @ u  # I + VᵀU
    dh = d * h
    a = dh + u @ (vv.T @ dh)  # Q h
    vd = v / d
    # b = Q^{-T} v = (I + V Uᵀ)^{-1} (v / d) = vd − V (I + UᵀV)^{-1} Uᵀ vd
    b = vd - vv @ _solve_small(ip_vtu.T, u.T @ vd)
    ab = torch.stack([a, b], dim=1)
    ut_ab, vt_ab = u.T @ ab, vv.T @ ab  # [r, 2] each: one pass over U and one over V
    # P h = Qᵀ a = d (a + V Uᵀ a); P^{-1} v = Q^{-1} b = (I + U Vᵀ)^{-1} b / d
    ph = d * (a + vv @ ut_ab[:, 0])
    inv_b = b - u @ _solve_small(ip_vtu, vt_ab[:, 1])
    grad_d = ph * h - (inv_b / d) * v
    eta_d = lr / grad_d.abs().amax().clamp(min=_tiny(grad_d))
    if which == "u":
        # E = −η (a aᵀ − b bᵀ) V, U ← U + E (I + VᵀU); ‖E Vᵀ‖_F normalises the step.
        vta, vtb = vt_ab[:, 0], vt_ab[:, 1]
        xy = vv @ vt_ab
        x, y = xy[:, 0], xy[:, 1]
        norm2 = a.dot(a) * x.dot(x) + b.dot(b) * y.dot(y) - 2 * a.dot(b) * x.dot(y)
        eta = lr / norm2.abs().sqrt().clamp(min=_tiny(norm2))
        # E (I + VᵀU) = −η [a (vta ip)ᵀ − b (vtb ip)ᵀ]: two in-place rank-one updates
        u.addr_(a * -eta, vta @ ip_vtu).addr_(b * eta, vtb @ ip_vtu)
    else:
        # E = −η (I + U Vᵀ)^{-1} (a aᵀ − b bᵀ) U (I + VᵀU), V ← V + E (I + UᵀV);
        # (I + U Vᵀ)^{-1} a = d h, and ‖U Eᵀ‖_F normalises the step.
        t_b = inv_b  # (I + U Vᵀ)^{-1} b
        xa = ut_ab[:, 0] @ ip_vtu  # (aᵀ U (I + VᵀU))ᵀ
        xb = ut_ab[:, 1] @ ip_vtu
        uxy = u @ torch.stack([xa, xb], dim=1)
        ua, ub = uxy[:, 0], uxy[:, 1]
        norm2 = ua.dot(ua) * dh.dot(dh) + ub.dot(ub) * t_b.dot(t_b) - 2 * ua.dot(ub) * dh.dot(t_b)
        eta = lr / norm2.abs().sqrt().clamp(min=_tiny(norm2))
        vv.addr_(dh * -eta, xa @ ip_vtu.T).addr_(t_b * eta, xb @ ip_vtu.T)
    d.sub_(eta_d * grad_d * d)


def lra_apply(d: Tensor, u: Tensor, vv: Tensor, g: Tensor) -> Tensor:
    """``P g = diag(d) (I + V Uᵀ)(I + U Vᵀ) diag(d) g`` for a flat ``g`` ``[N]``."""
    dt = d.dtype
    x = d * g.to(dt)
    x = x + u @ (vv.T @ x)
    x = x + vv @ (u.T @ x)
    return (d * x).to(g.dtype)
