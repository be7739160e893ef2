"""Solvers on symmetric positive (semi-)definite matrices: pure functions on tensors.

Everything here is Cholesky- or eigendecomposition-based: curvature matrices are symmetric PSD,
and batched LU routines hang with MKL on the tested CPU build (DESIGN.md §8). All functions
accept leading batch dimensions. Failures never raise mid-training: the ``*_safe`` variants
return ``None`` (or add damping) and callers keep their previous state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..numerics import all_sums_finite, is_finite

__all__ = [
    "CPU_PAD_AVOID",
    "CPU_PAD_MIN_ORDER",
    "CPU_PAD_MULTIPLE",
    "add_diagonal",
    "cg",
    "cholesky_ex",
    "damped_cholesky",
    "damped_buffer",
    "damped_cholesky_inverse",
    "damped_factor",
    "eigh_psd",
    "factor_inverse",
    "factor_ok",
    "gram_diagonal",
    "inverse_root_eigh",
    "neumann",
    "padded_order",
    "pads",
    "psd_power",
    "smw_solve",
    "symmetrize",
]


def symmetrize(m: Tensor) -> Tensor:
    """``(M + Mᵀ) / 2`` over the last two dimensions."""
    return torch.add(m, m.transpose(-1, -2)).mul_(0.5)


def add_diagonal(m: Tensor, value: float | Tensor) -> Tensor:
    """``M + value·I`` (out of place, one copy; ``value`` may be a tensor over the batch)."""
    out = m.clone()
    diag = out.diagonal(dim1=-2, dim2=-1)
    if isinstance(value, Tensor):
        diag.add_(value.to(m.dtype).unsqueeze(-1))
    else:
        diag.add_(value)
    return out


def gram_diagonal(m: Tensor) -> Tensor:
    """The entries of Gram matrices that decide whether all their entries are finite.

    For ``M = Σ_k x_k x_kᵀ`` (and for sums, positive multiples and Hadamard products of such
    matrices, which are positive semi-definite too) ``|M_ij| ≤ √(M_ii M_jj)`` (Cauchy-Schwarz),
    and an entry of some ``x_k`` that is NaN or infinite makes the diagonal entry that squares
    it NaN or infinite. So ``M`` is finite exactly when its diagonal is, up to rounding at the
    edge of the dtype's range, where the diagonal is already useless to every solver. A
    finiteness check (:func:`~precond.numerics.finite_sums` and the like) then reads ``n``
    entries per matrix instead of ``n²``.

    Args:
        m: Gram matrices ``[..., n, n]`` (formed as sums of outer products, never arbitrary
            symmetric matrices: the bound needs positive semi-definiteness).

    Returns:
        Their diagonals ``[..., n]`` (a view).
    """
    return m.diagonal(dim1=-2, dim2=-1)


def factor_ok(factor: Tensor, info: Tensor) -> bool:
    """Whether ``cholesky_ex`` succeeded: ``info == 0`` and a finite factor (one host sync).

    An infinite diagonal entry factorises with ``info = 0`` into an infinite factor; checking
    the factor's diagonal (O(n)) catches it.

    Args:
        factor: The factor returned by ``torch.linalg.cholesky_ex``.
        info: Its ``info``.

    Returns:
        ``True`` if the factor is usable.
    """
    ok = (info == 0).all() & is_finite(factor.diagonal(dim1=-2, dim2=-1)).all()
    return bool(ok)


def damped_cholesky(
    m: Tensor,
    damping: float,
    *,
    retries: int = 4,
    growth: float = 10.0,
    padded: bool = False,
) -> tuple[Tensor, float] | None:
    """Cholesky factor of ``M + δI``, raising ``δ`` until the factorisation succeeds.

    Args:
        m: Symmetric PSD matrices ``[..., n, n]``.
        damping: Initial ``δ ≥ 0``.
        retries: How many times ``δ`` may grow.
        growth: Factor by which ``δ`` grows per retry, starting from
            ``max(δ, 1e-7 · mean |diag M|)``.
        padded: Return the factor in the buffer it was made in, of order
            :func:`padded_order` (its leading ``n × n`` block is the factor; for
            :func:`factor_inverse`), instead of a copy of order ``n``.

    Returns:
        ``(L, δ_used)`` with ``L Lᵀ = M + δ_used I``, or ``None`` if every attempt failed
        (non-finite input included).
    """
    # The happy path is one factorisation: Cholesky itself fails on NaN/Inf (info > 0), so the
    # finiteness check (a full pass and a host sync) runs only after a failure. Each attempt
    # factorises the damped copy in the layout of damped_buffer (see cholesky_ex).
    factorise = _factor_in_buffer if padded else cholesky_ex
    factor, info = factorise(m, damping)
    if factor_ok(factor, info):
        return factor, float(damping)
    del factor
    if not bool(torch.isfinite(m).all()):
        return None
    scale = float(m.diagonal(dim1=-2, dim2=-1).abs().mean())
    delta = max(float(damping), scale * 1e-7 or 1e-12)
    for _ in range(retries):
        factor, info = factorise(m, delta)
        if factor_ok(factor, info):
            return factor, delta
        del factor
        delta *= growth
    return None


#: On a CPU, matrices of at least this order are factorised at :func:`padded_order`.
CPU_PAD_MIN_ORDER = 128

#: ... whose order is rounded up to a multiple of this ...
CPU_PAD_MULTIPLE = 16

#: ... and moved one multiple further where it lands on a multiple of this (see
#: :func:`damped_buffer`).
CPU_PAD_AVOID = 256


def padded_order(n: int, device: torch.device | str) -> int:
    """The order at which :func:`damped_buffer` factorises a matrix of order ``n``.

    On a CPU, from order :data:`CPU_PAD_MIN_ORDER` on: ``n`` rounded up to a multiple of
    :data:`CPU_PAD_MULTIPLE`, one multiple more if that is a multiple of
    :data:`CPU_PAD_AVOID`. Elsewhere ``n``.
    """
    if torch.device(device).type != "cpu" or n < CPU_PAD_MIN_ORDER:
        return n
    order = -(-n // CPU_PAD_MULTIPLE) * CPU_PAD_MULTIPLE
    if order % CPU_PAD_AVOID == 0:
        order += CPU_PAD_MULTIPLE
    return order


def pads(m: Tensor) -> bool:
    """Whether :func:`damped_buffer` factorises ``m`` (``[..., n, n]``) at a larger order."""
    n = m.shape[-1]
    return padded_order(n, m.device) != n


def cholesky_ex(m: Tensor, damping: float | Tensor = 0.0) -> tuple[Tensor, Tensor]:
    """``torch.linalg.cholesky_ex`` of ``M + δI``, factorised where its damped copy lies.

    Out of place: ``m`` is read, not written. The damped copy (:func:`damped_buffer`, at a
    padded order where that is faster) is symmetric, so its row-major buffer read column-major is
    the same matrix: LAPACK factorises it there, without the column-major copy that
    ``torch.linalg.cholesky_ex`` makes of a row-major input (a transposing copy: 0.95 ms of
    4.5 ms for three matrices of order 512 on the development machine). ``L`` is returned
    column-major (``L.mT`` is contiguous), which triangular solves take as they are. A padded
    buffer's leading block holds ``Lᵀ`` row by row, and a copy of those rows gives the order-``n``
    factor (0.04 ms there, against 0.15 ms for a contiguous copy of the column-major view).

    Args:
        m: Symmetric ``[..., n, n]``.
        damping: ``δ`` (a float or a tensor over the batch).

    Returns:
        ``(L, info)`` as ``torch.linalg.cholesky_ex`` returns them (``L`` of order ``n``).
    """
    n = m.shape[-1]
    lower, info = _factor_in_buffer(m, damping)
    if lower.shape[-1] == n:
        return lower, info
    return lower.mT[..., :n, :n].contiguous().mT, info


def _factor_in_buffer(m: Tensor, damping: float | Tensor) -> tuple[Tensor, Tensor]:
    """``(L, info)``: :func:`damped_buffer`'s copy factorised where it lies.

    ``L`` is column-major and of the buffer's order (its leading ``n × n`` block is the factor).
    """
    lower = damped_buffer(m, damping).mT
    info = torch.empty(m.shape[:-2], dtype=torch.int32, device=m.device)
    torch.linalg.cholesky_ex(lower, out=(lower, info))
    return lower, info


def damped_buffer(m: Tensor, damping: float | Tensor) -> Tensor:
    """``M + δI`` in a new buffer, laid out for the fastest Cholesky factorisation.

    On a CPU, a matrix of order ``n`` is written into the block-diagonal ``diag(M + δI, I)``
    of order :func:`padded_order` (``n`` rounded up to a multiple of 16 from order 128 on,
    stepping over multiples of 256): LAPACK's Cholesky factorisation and inverse run 10-30%
    faster at such orders (chol and inverse together, ms, torch 2.13 with MKL 2024.2 on the
    development machine's AMD EPYC, 2 threads: 145 → 160: 0.42 → 0.29; 513 → 528: 3.21 →
    2.66; 785 → 800: 7.33 → 6.81; 1025 → 1040: 16.4 → 12.3; 2049 → 2064: 95 → 71; K-FAC's
    whole refresh at B = 32: mlp512 21.6-22.8 → 18.5-18.9, cnn_small 95.8-97.5 → 73.2-74.3,
    alternating in one process). At multiples of 256, ``torch.linalg.cholesky_ex`` also zeroes
    the factor's other triangle (``aten::tril``) on a row stride that thrashes the cache: 0.85
    ms at ``n`` = 512 against 0.07 ms at 513, while LAPACK takes 0.60 ms at both; 512 → 528:
    2.37 → 1.67, 1024 → 1040: 14.4 → 8.8. The factor and the inverse of the block-diagonal
    matrix are block-diagonal, exactly (their extra rows and columns are zero and their
    corner is the identity), so their leading ``n × n`` blocks are those of ``M + δI``. Other
    orders and devices get the plain ``[..., n, n]`` copy.

    Args:
        m: ``[..., n, n]``.
        damping: ``δ`` (a float or a tensor over the batch).

    Returns:
        ``[..., n, n]`` or ``[..., N, N]`` with ``N = padded_order(n)``; the leading block is
        ``M + δI``.
    """
    n = m.shape[-1]
    order = padded_order(n, m.device)
    if order == n:
        return add_diagonal(m, damping)
    out = m.new_empty(*m.shape[:-2], order, order)
    out[..., :n, :n].copy_(m)
    out[..., n:, :].zero_()
    out[..., :n, n:].zero_()
    diag = out.diagonal(dim1=-2, dim2=-1)
    if isinstance(damping, Tensor):
        diag[..., :n].add_(damping.to(m.dtype).unsqueeze(-1))
    else:
        diag[..., :n].add_(damping)
    diag[..., n:].fill_(1.0)
    return out


def damped_factor(m: Tensor, damping: float | Tensor) -> Tensor | None:
    """Lower Cholesky factor of ``M + δI``, made where the damped copy lies.

    The damped copy (:func:`damped_buffer`, possibly of a larger order) is factorised in
    place: LAPACK's column-major layout is the transpose of PyTorch's row-major one and the
    matrix is symmetric, so one buffer holds the copy and then the factor (a column-major
    view). If the factorisation fails, :func:`damped_cholesky` raises ``δ`` (the factor is then
    of ``M + δ' I`` with a larger ``δ'``). Cholesky fails on non-finite input,
    so the happy path makes no separate finiteness pass.

    Args:
        m: Symmetric PSD ``[..., n, n]``.
        damping: ``δ`` (a float or a tensor over the batch).

    Returns:
        The factor (its leading ``n × n`` block is the factor of ``M + δI``; pass it to
        :func:`factor_inverse` with ``n``), or ``None`` if every factorisation failed.
    """
    factor, info = _factor_in_buffer(m, damping)
    if factor_ok(factor, info):
        return factor
    del factor
    delta = float(damping.max()) if isinstance(damping, Tensor) else float(damping)
    fac = damped_cholesky(m, delta, padded=True)
    return None if fac is None else fac[0]


def factor_inverse(factor: Tensor, n: int) -> Tensor:
    """``(L Lᵀ)^{-1}`` from a factor of :func:`damped_factor`, inverted where it lies.

    LAPACK inverts a column-major factor in place; the exactly symmetric inverse is returned
    as the (row-major) transpose of that buffer. Other factors are inverted into a new tensor.

    Args:
        factor: Lower factor, ``[..., n, n]`` or (padded) ``[..., N, N]``.
        n: Order of the matrix it factorises.

    Returns:
        ``[..., n, n]`` (a view of the padded buffer for a padded factor).
    """
    if factor.dim() >= 2 and factor.mT.is_contiguous() and not factor.is_contiguous():
        inverse = torch.cholesky_inverse(factor, out=factor).mT
    else:
        inverse = torch.cholesky_inverse(factor)
    return inverse if inverse.shape[-1] == n else inverse[..., :n, :n]


def damped_cholesky_inverse(m: Tensor, damping: float | Tensor) -> Tensor | None:
    """``(M + δI)^{-1}`` by Cholesky in one buffer per matrix.

    :func:`damped_factor` then :func:`factor_inverse`: the damped copy is factorised and
    inverted where it lies. If the factorisation fails, ``δ`` is raised (the inverse is then
    of ``M + δ' I`` with a larger ``δ'``).

    Args:
        m: Symmetric PSD ``[..., n, n]``.
        damping: ``δ`` (a float or a tensor over the batch).

    Returns:
        The inverse ``[..., n, n]``, or ``None`` if every factorisation failed (non-finite
        input included).
    """
    factor = damped_factor(m, damping)
    return None if factor is None else factor_inverse(factor, m.shape[-1])


def eigh_psd(m: Tensor) -> tuple[Tensor, Tensor] | None:
    """Eigendecomposition of symmetric PSD matrices, eigenvalues clamped at 0.

    LAPACK's ``syevd`` reads the lower triangle only, so no symmetrised copy is made: for a
    matrix that is symmetric up to rounding the result is that of its lower triangle. When the
    decomposition fails in the input precision (multithreaded divide-and-conquer returns NaN
    on some rank-deficient matrices with large clusters of zero eigenvalues), it is retried
    once in the same precision with the diagonal shifted by ``1e-5 · mean |diag|`` (the same
    eigenvectors; the shift is subtracted from the eigenvalues), and only then in float64.

    Args:
        m: ``[..., n, n]``.

    Returns:
        ``(eigenvalues [..., n], eigenvectors [..., n, n])`` in ``m``'s dtype, or ``None``.
    """
    if not all_sums_finite([m]):
        return None
    dec = _eigh_finite(m)
    if dec is None and m.dtype != torch.float64:
        shift = m.diagonal(dim1=-2, dim2=-1).abs().mean(-1).mul_(_RETRY_SHIFT)
        shift = torch.where(shift > 0, shift, torch.full_like(shift, _RETRY_SHIFT))
        dec = _eigh_finite(add_diagonal(m, shift), in_place=True)
        if dec is not None:
            dec = (dec[0].sub_(shift.unsqueeze(-1)), dec[1])
    if dec is None:
        dec = _eigh_finite(m.to(torch.float64))
    if dec is None:
        return None
    return dec[0].clamp_(min=0).to(m.dtype), dec[1].to(m.dtype)


#: Relative diagonal shift of :func:`eigh_psd`'s retry in the input precision.
_RETRY_SHIFT = 1e-5


def _eigh_finite(m: Tensor, *, in_place: bool = False) -> tuple[Tensor, Tensor] | None:
    """``torch.linalg.eigh(m)`` (lower triangle), or ``None`` if it fails or is non-finite.

    ``in_place``: ``m`` is a symmetric working copy of ours, overwritten by the eigenvectors
    (LAPACK works on its column-major view, which is ``m`` itself): no second ``n × n`` buffer.
    """
    try:
        if in_place:
            lower = m.mT
            evals = m.new_empty(m.shape[:-1])
            evals, evecs = torch.linalg.eigh(lower, out=(evals, lower))
        else:
            evals, evecs = torch.linalg.eigh(m)
    except RuntimeError:
        return None
    if not bool(torch.isfinite(evals).all()):
        return None
    return evals, evecs


def psd_power(evals: Tensor, evecs: Tensor, power: float, damping: float | Tensor = 0.0) -> Tensor:
    """``Q diag((λ + δ)^p) Qᵀ`` from an eigendecomposition.

    Args:
        evals: ``[..., n]``.
        evecs: ``[..., n, n]``.
        power: Exponent ``p`` (negative for inverses and inverse roots).
        damping: ``δ`` added to the eigenvalues.

    Returns:
        ``[..., n, n]``.
    """
    if isinstance(damping, Tensor):
        damping = damping.to(evals.dtype)[..., None]
    d = (evals + damping).pow(power)
    return (evecs * d.unsqueeze(-2)) @ evecs.transpose(-1, -2)


def inverse_root_eigh(m: Tensor, root: float, damping: float = 0.0) -> Tensor | None:
    """``(M + δI)^{-1/root}`` via ``eigh`` (Shampoo's inverse p-th root).

    Args:
        m: Symmetric PSD ``[..., n, n]``.
        root: ``p > 0``.
        damping: ``δ``.

    Returns:
        The inverse root, or ``None`` if the decomposition failed.
    """
    dec = eigh_psd(m)
    if dec is None:
        return None
    return psd_power(dec[0], dec[1], -1.0 / root, damping)


def smw_solve(u: Tensor, damping: float, v: Tensor) -> Tensor | None:
    """``(λI + U Uᵀ)^{-1} v`` by Sherman-Morrison-Woodbury, for ``U`` of shape ``[..., P, m]``.

    ``(λI + UUᵀ)^{-1} = (I − U (λI + UᵀU)^{-1} Uᵀ) / λ``: only an ``m × m`` Gram system is solved.

    Args:
        u: Low-rank factor ``[..., P, m]``.
        damping: ``λ > 0``.
        v: Right-hand sides ``[..., P]`` or ``[..., P, r]``.

    Returns:
        The solution (shape of ``v``), or ``None`` if the Gram system could not be factorised.
    """
    vec = v.dim() == u.dim() - 1
    rhs = v.unsqueeze(-1) if vec else v
    gram = u.transpose(-1, -2) @ u
    fac = damped_cholesky(gram, damping)
    if fac is None:
        return None
    chol, used = fac
    if used != damping:
        return None
    inner = torch.cholesky_solve(u.transpose(-1, -2) @ rhs, chol)
    out = (rhs - u @ inner) / damping
    return out.squeeze(-1) if vec else out


def cg(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    x0: Tensor | None = None,
    max_iters: int = 50,
    tol: float = 1e-6,
) -> tuple[Tensor, int]:
    """Conjugate gradient for ``A x = b`` with symmetric positive definite ``A``.

    Stops when ``‖r‖ ≤ tol·‖b‖`` or after ``max_iters``; the norms are checked on the host, so
    each iteration synchronises once (CG runs on refresh-type steps).

    Args:
        matvec: ``x ↦ A x`` on flat vectors.
        b: Right-hand side (flat).
        x0: Initial guess.
        max_iters: Iteration cap.
        tol: Relative residual tolerance.

    Returns:
        ``(x, iterations)``.
    """
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    p = r.clone()
    rs = r.dot(r)
    target = (tol * b.norm()) ** 2
    it = 0
    for it in range(1, max_iters + 1):
        if bool(rs <= target):
            return x, it - 1
        ap = matvec(p)
        curv = p.dot(ap)
        if not bool(curv > 0):  # negative curvature: A is not PD along p; stop
            return x, it - 1
        alpha = rs / curv
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = r.dot(r)
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x, it


def neumann(matvec: Callable[[Tensor], Tensor], b: Tensor, *, scale: float, iters: int) -> Tensor:
    """Truncated Neumann series ``A^{-1} b ≈ s Σ_{j<J} (I − sA)^j b`` (LiSSA's recursion).

    Converges when ``0 < s·λ_max(A) < 2`` and ``A`` is positive definite.

    Args:
        matvec: ``x ↦ A x``.
        b: Right-hand side.
        scale: ``s``.
        iters: Terms ``J``.

    Returns:
        The approximation.
    """
    term = b.clone()
    total = b.clone()
    for _ in range(iters - 1):
        term = term - scale * matvec(term)
        total = total + term
    return scale * total
