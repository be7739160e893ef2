r"""Spectral tools for symmetric operators given only by products.

Each function takes an *operator*: a dense symmetric matrix, a
:class:`~precond.curvature.operators.CurvatureOperator`, or a callable ``v ↦ M v`` on flat
vectors (then pass ``dim=``) or on lists of parameter-shaped tensors (then pass ``params=``).

* :func:`top_eigenvalues`: the ``k`` largest eigenvalues by Lanczos with full
  reorthogonalisation (largest algebraic, or largest magnitude with ``which="LM"``) or by
  block power (subspace) iteration (largest magnitude).
* :func:`hutchinson_trace`, :func:`hutchinson_diagonal`: ``tr M ≈ (1/S) Σ_s v_sᵀ M v_s`` and
  ``diag M ≈ (1/S) Σ_s v_s ⊙ M v_s`` with Rademacher probes (Hutchinson 1989; Bekas et al. 2007).
* :func:`slq_density`: stochastic Lanczos quadrature (Golub & Meurant; Ghorbani et al., "An
  Investigation into Neural Net Optimization via Hessian Eigenvalue Density", ICML 2019,
  https://arxiv.org/abs/1901.10159): each probe's Lanczos tridiagonal gives Gauss quadrature
  nodes ``θ_i`` and weights ``τ_i`` with ``Σ_i τ_i f(θ_i) ≈ vᵀ f(M) v / ‖v‖²``; averaging over
  probes estimates the spectral density ``(1/P) Σ_j δ(λ − λ_j)``, smoothed by a Gaussian.

Iterations check convergence on the host (one sync per iteration): these tools are for
analysis, not for the per-step path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..validation import check_int, invalid
from .operators import CurvatureOperator

__all__ = [
    "SpectralDensity",
    "as_matvec",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "lanczos",
    "slq_density",
    "top_eigenvalues",
]

Matvec = Callable[[Tensor], Tensor]


def as_matvec(
    op: Any,
    *,
    dim: int | None = None,
    params: Sequence[Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Matvec, int, torch.dtype, torch.device]:
    """Normalise an operator to ``(matvec on flat vectors, dim, dtype, device)``.

    Args:
        op: Dense ``[P, P]`` tensor, :class:`CurvatureOperator`, or a callable.
        dim: For a callable on flat vectors: ``P``.
        params: For a callable on parameter lists: the parameters (shapes, dtype, device).
        dtype: For a callable on flat vectors: the vectors' dtype (default: torch's default).

    Returns:
        The normalised operator.

    Raises:
        ValueError: If a callable comes with neither ``dim`` nor ``params``.
    """
    if isinstance(op, Tensor):
        if op.dim() != 2 or op.shape[0] != op.shape[1]:
            raise invalid("op", f"tensor of shape {tuple(op.shape)}", "Must be a square matrix")
        mat = op
        return (lambda v: mat @ v), int(op.shape[0]), op.dtype, op.device
    if isinstance(op, CurvatureOperator):
        return (lambda v: op @ v), op.dim, op.dtype, op.device
    if not callable(op):
        raise invalid("op", type(op).__name__, "Pass a matrix, a CurvatureOperator or a callable")
    if params is not None:
        plist = list(params)
        sizes = [p.numel() for p in plist]

        def flat(v: Tensor) -> Tensor:
            parts = [c.view_as(p) for c, p in zip(torch.split(v, sizes), plist)]
            return torch.cat([o.reshape(-1) for o in op(parts)])

        return flat, sum(sizes), plist[0].dtype, plist[0].device
    if dim is None:
        raise invalid(
            "dim", None, "A callable operator needs dim= (flat vectors) or params= (lists)"
        )
    return op, dim, dtype or torch.get_default_dtype(), torch.device("cpu")


def _rademacher(n: int, dtype: torch.dtype, device: torch.device, gen: Any) -> Tensor:
    bits = torch.randint(0, 2, (n,), generator=gen, device=device)
    return (2 * bits - 1).to(dtype)


def _randn(n: int, dtype: torch.dtype, device: torch.device, gen: Any) -> Tensor:
    return torch.randn(n, generator=gen, device=device, dtype=torch.float64).to(dtype)


def lanczos(
    matvec: Matvec, v0: Tensor, num_steps: int, *, tol: float = 1e-10
) -> tuple[Tensor, Tensor, Tensor]:
    """Lanczos tridiagonalisation with full reorthogonalisation.

    Args:
        matvec: ``v ↦ M v`` on flat vectors (``M`` symmetric).
        v0: Start vector (normalised here).
        num_steps: Maximum Krylov dimension ``m``.
        tol: Stop early when the next residual norm is below ``tol · ‖M‖``-scale (invariant
            subspace found).

    Returns:
        ``(alpha [m'], beta [m'-1], Q [P, m'])`` with ``Qᵀ M Q = tridiag(beta, alpha, beta)``.
    """
    q = v0 / v0.norm()
    basis = [q]
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    scale = 0.0
    for j in range(num_steps):
        w = matvec(basis[-1])
        alpha = basis[-1].dot(w)
        alphas.append(alpha)
        qmat = torch.stack(basis, dim=1)
        for _ in range(2):  # twice is enough (Kahan-Parlett)
            w = w - qmat @ (qmat.T @ w)
        beta = w.norm()
        scale = max(scale, float(alpha.abs()), float(beta))
        if j == num_steps - 1 or float(beta) <= tol * max(scale, 1e-30):
            break
        betas.append(beta)
        basis.append(w / beta)
    qmat = torch.stack(basis, dim=1)
    return torch.stack(alphas), _stack(betas, alphas[0]), qmat


def _stack(values: list[Tensor], like: Tensor) -> Tensor:
    return torch.stack(values) if values else like.new_zeros(0)


def _tridiag(alpha: Tensor, beta: Tensor) -> Tensor:
    t = torch.diag(alpha)
    if beta.numel():
        t = t + torch.diag(beta, 1) + torch.diag(beta, -1)
    return t


def top_eigenvalues(
    op: Any,
    k: int = 1,
    *,
    method: str = "lanczos",
    which: str = "LA",
    max_iters: int = 100,
    tol: float = 1e-8,
    generator: torch.Generator | None = None,
    dim: int | None = None,
    params: Sequence[Tensor] | None = None,
    dtype: torch.dtype | None = None,
    return_vectors: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The ``k`` top eigenvalues (and eigenvectors) of a symmetric operator.

    Args:
        op: The operator (see the module docstring).
        k: How many.
        method: ``lanczos`` (``max_iters`` Krylov steps, at least ``2k + 10`` if possible) or
            ``power`` (block power iteration on ``k`` vectors with Rayleigh-Ritz).
        which: ``LA``: largest algebraic (Lanczos only); ``LM``: largest magnitude.
        max_iters: Krylov dimension (Lanczos) or iteration cap (power).
        tol: Power iteration stops when the eigenvalues change by less than ``tol`` relatively.
        generator: Random generator of the start vectors.
        dim: For callables on flat vectors.
        params: For callables on parameter lists.
        dtype: For callables on flat vectors: the vectors' dtype.
        return_vectors: Also return eigenvectors ``[P, k]``.

    Returns:
        Eigenvalues in descending order (by value for ``LA``, by magnitude for ``LM``), and the
        eigenvectors if requested.

    Raises:
        ValueError: For an unknown ``method``/``which`` or ``k`` out of range.
    """
    matvec, n, dtype, device = as_matvec(op, dim=dim, params=params, dtype=dtype)
    check_int("k", k, minimum=1)
    if k > n:
        raise invalid("k", k, f"Must be <= the operator's dimension {n}")
    if which not in ("LA", "LM"):
        raise invalid("which", which, "Supported: ('LA', 'LM')")
    if method == "lanczos":
        steps = min(n, max(max_iters, 2 * k + 10))
        alpha, beta, q = lanczos(matvec, _randn(n, dtype, device, generator), steps)
        theta, s = torch.linalg.eigh(_tridiag(alpha, beta))
        order = torch.argsort(theta.abs() if which == "LM" else theta, descending=True)[:k]
        vals, vecs = theta[order], q @ s[:, order]
    elif method == "power":
        if which != "LM":
            raise invalid("which", which, "Power iteration finds the largest magnitude ('LM')")
        vals, vecs = _block_power(matvec, n, k, dtype, device, generator, max_iters, tol)
    else:
        raise invalid("method", method, "Supported: ('lanczos', 'power')")
    return (vals, vecs) if return_vectors else vals


def _block_power(
    matvec: Matvec,
    n: int,
    k: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
    max_iters: int,
    tol: float,
) -> tuple[Tensor, Tensor]:
    x = torch.stack([_randn(n, dtype, device, generator) for _ in range(k)], dim=1)
    q, _ = torch.linalg.qr(x)
    prev: Tensor | None = None
    vals = vecs = q
    for _ in range(max_iters):
        mq = torch.stack([matvec(q[:, j]) for j in range(k)], dim=1)
        small = q.T @ mq
        theta, s = torch.linalg.eigh(0.5 * (small + small.T))
        order = torch.argsort(theta.abs(), descending=True)
        vals, vecs = theta[order], q @ s[:, order]
        if prev is not None and bool(
            ((vals - prev).abs() <= tol * vals.abs().clamp(min=1e-30)).all()
        ):
            break
        prev = vals
        q, _ = torch.linalg.qr(mq @ s[:, order])
    return vals, vecs


def hutchinson_trace(
    op: Any,
    n_samples: int = 100,
    *,
    generator: torch.Generator | None = None,
    dim: int | None = None,
    params: Sequence[Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Hutchinson's trace estimate ``(1/S) Σ_s v_sᵀ M v_s`` with Rademacher probes.

    Unbiased; the variance is ``(2/S) Σ_{i≠j} M_ij²``, zero for diagonal ``M``.

    Args:
        op: The operator.
        n_samples: Probes ``S``.
        generator: Random generator of the probes.
        dim: For callables on flat vectors.
        params: For callables on parameter lists.
        dtype: For callables on flat vectors: the vectors' dtype.

    Returns:
        The estimate (0-dim tensor).
    """
    matvec, n, dtype, device = as_matvec(op, dim=dim, params=params, dtype=dtype)
    check_int("n_samples", n_samples, minimum=1)
    total = torch.zeros((), dtype=dtype, device=device)
    for _ in range(n_samples):
        v = _rademacher(n, dtype, device, generator)
        total = total + v.dot(matvec(v))
    return total / n_samples


def hutchinson_diagonal(
    op: Any,
    n_samples: int = 100,
    *,
    generator: torch.Generator | None = None,
    dim: int | None = None,
    params: Sequence[Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Hutchinson's diagonal estimate ``(1/S) Σ_s v_s ⊙ M v_s`` (flat, parameter order).

    Args:
        op: The operator.
        n_samples: Probes ``S``.
        generator: Random generator of the probes.
        dim: For callables on flat vectors.
        params: For callables on parameter lists.
        dtype: For callables on flat vectors: the vectors' dtype.

    Returns:
        ``[P]``.
    """
    matvec, n, dtype, device = as_matvec(op, dim=dim, params=params, dtype=dtype)
    check_int("n_samples", n_samples, minimum=1)
    total = torch.zeros(n, dtype=dtype, device=device)
    for _ in range(n_samples):
        v = _rademacher(n, dtype, device, generator)
        total = total + v * matvec(v)
    return total / n_samples


@dataclass
class SpectralDensity:
    """A stochastic Lanczos quadrature estimate of the eigenvalue density.

    Attributes:
        nodes: ``[S, m]`` Ritz values per probe (Gauss quadrature nodes).
        weights: ``[S, m]`` quadrature weights per probe (each row sums to 1).
        grid: Points where the smoothed density is evaluated.
        density: ``[len(grid)]``, integrating to about 1 (a probability density over
            eigenvalues: ``(1/P) Σ_j N(λ; λ_j, σ²)``).
        sigma: The Gaussian smoothing width.
    """

    nodes: Tensor
    weights: Tensor
    grid: Tensor
    density: Tensor
    sigma: float

    def expectation(self, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """Estimate ``(1/P) tr f(M)`` from the quadrature (e.g. ``fn=lambda x: x**2``).

        Args:
            fn: Element-wise function of the eigenvalues.

        Returns:
            The estimate (0-dim tensor).
        """
        return (self.weights * fn(self.nodes)).sum(-1).mean()


def slq_density(
    op: Any,
    *,
    n_probes: int = 10,
    n_steps: int = 80,
    grid_size: int = 1000,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
    dim: int | None = None,
    params: Sequence[Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> SpectralDensity:
    """Spectral density by stochastic Lanczos quadrature.

    Args:
        op: The operator.
        n_probes: Random probes ``S`` (Gaussian start vectors).
        n_steps: Lanczos steps ``m`` per probe (capped at ``P``).
        grid_size: Evaluation points between the extreme nodes (padded by ``5σ``).
        sigma: Gaussian smoothing width (default: 1% of the spectral range, at least 1e-6).
        generator: Random generator of the probes.
        dim: For callables on flat vectors.
        params: For callables on parameter lists.
        dtype: For callables on flat vectors: the vectors' dtype.

    Returns:
        The :class:`SpectralDensity`.
    """
    matvec, n, dtype, device = as_matvec(op, dim=dim, params=params, dtype=dtype)
    check_int("n_probes", n_probes, minimum=1)
    check_int("n_steps", n_steps, minimum=1)
    steps = min(n_steps, n)
    nodes, weights = [], []
    for _ in range(n_probes):
        alpha, beta, _ = lanczos(matvec, _randn(n, dtype, device, generator), steps)
        theta, s = torch.linalg.eigh(_tridiag(alpha, beta))
        pad = steps - theta.numel()  # early stop: the extra nodes get zero weight
        w = s[0].square()
        nodes.append(torch.cat([theta, theta.new_zeros(pad)]))
        weights.append(torch.cat([w, w.new_zeros(pad)]))
    node_t, weight_t = torch.stack(nodes), torch.stack(weights)
    live = node_t[weight_t > 0]
    lo, hi = float(live.min()), float(live.max())
    width = sigma if sigma is not None else max(0.01 * (hi - lo), 1e-6)
    grid = torch.linspace(lo - 5 * width, hi + 5 * width, grid_size, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * ((grid[:, None, None] - node_t) / width) ** 2)
    kernel = kernel / (width * math.sqrt(2 * math.pi))
    density = (kernel * weight_t).sum(-1).mean(-1)
    return SpectralDensity(node_t, weight_t, grid, density, width)
