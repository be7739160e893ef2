"""Spectral tools on operators with known spectra."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import precond
from precond.curvature.spectral import lanczos

D = torch.float64


def known(evals, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(evals)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    return q @ torch.diag(torch.tensor(evals, dtype=D)) @ q.T


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


SPECTRUM = [float(i) for i in range(1, 31)]


@pytest.mark.parametrize("method,which", [("lanczos", "LA"), ("lanczos", "LM"), ("power", "LM")])
def test_top_eigenvalues_of_known_spectrum(method, which):
    m = known(SPECTRUM)
    vals, vecs = precond.top_eigenvalues(
        m,
        3,
        method=method,
        which=which,
        max_iters=500,
        tol=1e-12,
        generator=gen(),
        return_vectors=True,
    )
    torch.testing.assert_close(
        vals, torch.tensor([30.0, 29.0, 28.0], dtype=D), rtol=1e-8, atol=1e-8
    )
    # the power method's vectors converge like (29/30)^k: looser than its eigenvalues
    tol = 1e-6 if method == "lanczos" else 1e-4
    torch.testing.assert_close(m @ vecs, vecs * vals, rtol=tol, atol=tol)


def test_largest_algebraic_vs_largest_magnitude_for_indefinite_operators():
    m = known([-50.0, -1.0, 0.5, 2.0, 7.0, 9.0])
    la = precond.top_eigenvalues(m, 2, which="LA", generator=gen())
    lm = precond.top_eigenvalues(m, 2, which="LM", generator=gen())
    pw = precond.top_eigenvalues(
        m, 2, method="power", which="LM", max_iters=2000, tol=1e-13, generator=gen()
    )
    torch.testing.assert_close(la, torch.tensor([9.0, 7.0], dtype=D))
    torch.testing.assert_close(lm, torch.tensor([-50.0, 9.0], dtype=D))
    torch.testing.assert_close(pw, torch.tensor([-50.0, 9.0], dtype=D))


def test_callables_on_flat_vectors_and_on_parameter_lists():
    m = known(SPECTRUM[:6])
    flat = precond.top_eigenvalues(lambda v: m @ v, 2, dim=6, dtype=D, generator=gen())
    params = [torch.zeros(2, 2, dtype=D), torch.zeros(2, dtype=D)]

    def listed(vs):
        out = m @ torch.cat([v.reshape(-1) for v in vs])
        return [out[:4].reshape(2, 2), out[4:]]

    lists = precond.top_eigenvalues(listed, 2, params=params, generator=gen())
    torch.testing.assert_close(flat, torch.tensor([6.0, 5.0], dtype=D))
    torch.testing.assert_close(lists, flat)


def test_top_eigenvalues_of_a_model_ggn_operator():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, t = torch.randn(7, 4, dtype=D), torch.randint(0, 3, (7,))
    op = precond.curvature_operator(model, F.cross_entropy, x, t, curvature="ggn")
    dense = precond.curvature.dense_ggn(model, F.cross_entropy, x, t)
    want = torch.linalg.eigvalsh(dense).flip(0)[:4]
    torch.testing.assert_close(
        precond.top_eigenvalues(op, 4, generator=gen()), want, rtol=1e-8, atol=1e-10
    )
    torch.testing.assert_close(op.to_dense(), dense, rtol=1e-10, atol=1e-12)


def test_hutchinson_is_exact_for_diagonal_and_unbiased_otherwise():
    d = torch.tensor([1.0, -2.0, 3.5, 4.0], dtype=D)
    torch.testing.assert_close(precond.hutchinson_trace(torch.diag(d), 3, generator=gen()), d.sum())
    torch.testing.assert_close(precond.hutchinson_diagonal(torch.diag(d), 3, generator=gen()), d)
    m = known([float(i) for i in range(1, 11)], seed=2)
    s = 4000
    off = m - torch.diag(m.diagonal())
    # Var(vᵀMv) = 2 Σ_{i≠j} M_ij², Var((v⊙Mv)_i) = Σ_{j≠i} M_ij² for Rademacher v
    se_trace = (2 * off.square().sum() / s).sqrt()
    se_diag = (off.square().sum(1) / s).sqrt()
    tr = precond.hutchinson_trace(m, s, generator=gen(1))
    diag = precond.hutchinson_diagonal(m, s, generator=gen(2))
    assert abs(float(tr - m.trace())) < 4 * float(se_trace)
    assert bool(((diag - m.diagonal()).abs() < 4 * se_diag).all())


def test_lanczos_quadrature_is_exact_for_low_degree_polynomials():
    m = known(SPECTRUM[:12], seed=3)
    v0 = torch.randn(12, generator=gen(4), dtype=D)
    alpha, beta, q = lanczos(lambda v: m @ v, v0, 5)
    t = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    torch.testing.assert_close(q.T @ q, torch.eye(5, dtype=D), atol=1e-12, rtol=0)
    torch.testing.assert_close(q.T @ m @ q, t, atol=1e-10, rtol=0)
    theta, s = torch.linalg.eigh(t)
    w = s[0].square()
    u = v0 / v0.norm()
    for p in range(10):  # Gauss quadrature with m = 5 nodes: exact up to degree 2m − 1 = 9
        want = u @ torch.linalg.matrix_power(m, p) @ u
        torch.testing.assert_close((w * theta**p).sum(), want, rtol=1e-8, atol=0)


def test_slq_density_of_two_clusters():
    evals = [1.0] * 30 + [10.0] * 10
    m = known(evals, seed=5)
    dens = precond.slq_density(m, n_probes=40, n_steps=20, sigma=0.2, generator=gen(6))
    dx = float(dens.grid[1] - dens.grid[0])
    assert abs(float(dens.density.sum()) * dx - 1.0) < 1e-3
    low = float(dens.density[dens.grid < 5.5].sum()) * dx
    # E[mass near 1] = 30/40; the probes' scatter is ~ sqrt(3/16/ (40·40/2)) ≈ 0.015
    assert abs(low - 0.75) < 0.06
    # moments: E[vᵀ M² v / ‖v‖²] = tr(M²)/P for Gaussian probes
    second = float(dens.expectation(lambda x: x**2))
    assert abs(second - float((torch.tensor(evals) ** 2).mean())) < 0.1 * second


SPECTRAL_ERRORS = [
    (dict(k=0), r"Invalid k: 0. Must be >= 1."),
    (dict(k=7), r"Invalid k: 7. Must be <= the operator's dimension 6."),
    (dict(which="SA"), r"Invalid which: 'SA'. Supported: \('LA', 'LM'\)."),
    (dict(method="arnoldi"), r"Invalid method: 'arnoldi'. Supported: \('lanczos', 'power'\)."),
    (
        dict(method="power", which="LA"),
        r"Invalid which: 'LA'. Power iteration finds the largest magnitude",
    ),
]


@pytest.mark.parametrize("kwargs,match", SPECTRAL_ERRORS)
def test_spectral_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        precond.top_eigenvalues(known(SPECTRUM[:6]), **kwargs)


def test_operator_errors():
    with pytest.raises(ValueError, match=r"Invalid dim: None. A callable operator needs dim="):
        precond.hutchinson_trace(lambda v: v)
    with pytest.raises(
        ValueError, match=r"Invalid op: 'tensor of shape \(2, 3\)'. Must be a square matrix."
    ):
        precond.hutchinson_trace(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"Invalid op: 'int'. Pass a matrix"):
        precond.slq_density(3)
