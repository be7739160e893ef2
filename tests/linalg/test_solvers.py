"""Solvers on closed-form matrices."""

from __future__ import annotations

import torch
from tests.helpers import inverse_each

from precond.linalg.solvers import (
    cg,
    damped_cholesky,
    eigh_psd,
    gram_diagonal,
    inverse_root_eigh,
    neumann,
    psd_power,
    smw_solve,
)
from precond.numerics import finite_flags

D = torch.float64


def _spd(n, cond=10.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    evals = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=D)
    return q @ torch.diag(evals) @ q.T, evals


def test_inverse_roots_of_diag_1_4():
    m = torch.diag(torch.tensor([1.0, 4.0], dtype=D))
    torch.testing.assert_close(
        inverse_root_eigh(m, 2.0), torch.diag(torch.tensor([1.0, 0.5], dtype=D))
    )
    torch.testing.assert_close(
        inverse_root_eigh(m, 1.0), torch.diag(torch.tensor([1.0, 0.25], dtype=D))
    )
    torch.testing.assert_close(
        inverse_root_eigh(m, 4.0), torch.diag(torch.tensor([1.0, 2**-0.5], dtype=D))
    )
    torch.testing.assert_close(
        inverse_root_eigh(m, 2.0, damping=5.0), torch.diag(torch.tensor([6**-0.5, 1 / 3], dtype=D))
    )


def test_psd_power_batched_matches_definition():
    m, evals = _spd(5)
    batch = torch.stack([m, 2 * m])
    dec = eigh_psd(batch)
    assert dec is not None
    half = psd_power(dec[0], dec[1], 0.5)
    torch.testing.assert_close(half @ half, batch)


def test_eigh_psd_clamps_and_rejects_non_finite():
    m = torch.diag(torch.tensor([-1e-9, 2.0], dtype=D))
    evals, _ = eigh_psd(m)
    assert float(evals.min()) == 0.0
    assert eigh_psd(torch.full((2, 2), float("nan"), dtype=D)) is None


def test_damped_cholesky_raises_damping_for_singular_matrices():
    m = torch.ones(3, 3, dtype=D)  # rank one
    factor, used = damped_cholesky(m, 0.0)
    assert used > 0
    torch.testing.assert_close(factor @ factor.T, m + used * torch.eye(3, dtype=D))
    assert damped_cholesky(torch.full((2, 2), float("inf"), dtype=D), 1.0) is None


def test_smw_equals_dense_solve():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(2, 30, 4, generator=g, dtype=D)
    v = torch.randn(2, 30, generator=g, dtype=D)
    lam = 0.3
    dense = u @ u.transpose(-1, -2) + lam * torch.eye(30, dtype=D)
    want = torch.linalg.solve(dense[0], v[0]), torch.linalg.solve(dense[1], v[1])
    got = smw_solve(u, lam, v)
    torch.testing.assert_close(got, torch.stack(want))
    many = torch.randn(2, 30, 3, generator=g, dtype=D)
    torch.testing.assert_close(smw_solve(u, lam, many)[0], torch.linalg.solve(dense[0], many[0]))


def test_cg_converges_in_at_most_n_steps_and_to_tolerance():
    m, _ = _spd(12, cond=100.0)
    b = torch.randn(12, dtype=D)
    x, iters = cg(lambda v: m @ v, b, max_iters=100, tol=1e-12)
    torch.testing.assert_close(x, torch.linalg.solve(m, b), rtol=1e-9, atol=1e-10)
    assert iters <= 20  # n = 12 in exact arithmetic; rounding costs a few more
    # a loose tolerance stops early with the promised residual
    x, iters = cg(lambda v: m @ v, b, max_iters=100, tol=1e-2)
    assert float((m @ x - b).norm()) <= 1e-2 * float(b.norm()) and iters < 12


def test_cg_stops_on_negative_curvature():
    m = torch.diag(torch.tensor([1.0, -1.0], dtype=D))
    x, iters = cg(lambda v: m @ v, torch.tensor([0.0, 1.0], dtype=D))
    assert iters == 0 and torch.equal(x, torch.zeros(2, dtype=D))


def test_neumann_series_converges_geometrically():
    m, evals = _spd(6, cond=4.0)
    b = torch.randn(6, dtype=D)
    want = torch.linalg.solve(m, b)
    scale = 1.0 / float(evals.max())
    errs = [
        float((neumann(lambda v: m @ v, b, scale=scale, iters=k) - want).norm())
        for k in (10, 40, 160)
    ]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-8


def test_damped_cholesky_rejects_non_finite_input_without_raising():
    from precond.linalg.solvers import damped_cholesky

    for bad in (float("nan"), float("inf")):
        m = torch.eye(3, dtype=torch.float64)
        m[2, 2] = bad
        assert damped_cholesky(m, 1e-3) is None
        m = torch.eye(3, dtype=torch.float64)
        m[0, 2] = m[2, 0] = bad
        assert damped_cholesky(m, 1e-3) is None


def test_eigh_psd_retries_in_the_input_precision_with_a_shift(monkeypatch):
    """A float32 decomposition returning NaN is redone shifted in float32 (not float64)."""
    m64, evals = _spd(6, cond=100.0)
    m = m64.float()
    real = torch.linalg.eigh
    calls = []

    def flaky(x, *args, **kwargs):
        calls.append(x.dtype)
        out = real(x, *args, **kwargs)
        if len(calls) == 1:
            return out[0].fill_(float("nan")), out[1]
        return out

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    dec = eigh_psd(m)
    assert dec is not None and calls == [torch.float32, torch.float32]
    lam, q = dec
    assert lam.dtype == torch.float32 and q.dtype == torch.float32
    torch.testing.assert_close(lam.double(), evals, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close((q * lam) @ q.T, m, rtol=1e-4, atol=1e-4)
    assert m.equal(m64.float())  # the input is untouched


def test_damped_cholesky_inverse_is_the_damped_inverse():
    from precond.linalg.solvers import damped_cholesky_inverse

    m, _ = _spd(5)
    batch = torch.stack([m, 3 * m])
    inv = damped_cholesky_inverse(batch, torch.tensor([0.5, 2.0], dtype=D))
    eye = torch.eye(5, dtype=D)
    torch.testing.assert_close(inv[0] @ (m + 0.5 * eye), eye)
    torch.testing.assert_close(inv[1] @ (3 * m + 2.0 * eye), eye)
    assert damped_cholesky_inverse(torch.full((2, 2), float("nan"), dtype=D), 1.0) is None


def test_padded_orders_round_up_to_a_multiple_of_16_and_step_over_multiples_of_256():
    from precond.linalg.solvers import padded_order

    assert [padded_order(n, "cpu") for n in (10, 127, 128, 129, 145, 160, 255, 256)] == [
        10,
        127,
        128,
        144,
        160,
        160,
        272,
        272,
    ]
    assert [padded_order(n, "cpu") for n in (513, 784, 785, 1024, 2049)] == [
        528,
        784,
        800,
        1040,
        2064,
    ]
    assert padded_order(2049, "meta") == 2049  # devices other than the CPU: as they are


def test_orders_that_lapack_factorises_slowly_are_padded_on_a_cpu_with_the_same_results():
    from precond.linalg.solvers import (
        CPU_PAD_AVOID,
        cholesky_ex,
        damped_buffer,
        damped_cholesky_inverse,
        damped_factor,
        factor_inverse,
        pads,
    )

    n = CPU_PAD_AVOID  # factorised at order 272
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, n, n + 3, generator=g, dtype=D)
    m = x @ x.mT / n
    assert pads(m) and pads(m[..., 1:, 1:]) and not pads(m[..., 16:, 16:])
    assert not pads(m[..., :100, :100])
    lam = torch.tensor([0.5, 2.0], dtype=D)
    buf = damped_buffer(m, lam)
    assert buf.shape == (2, n + 16, n + 16)
    eye = torch.eye(n, dtype=D)
    torch.testing.assert_close(buf[:, :n, :n], m + lam[:, None, None] * eye, rtol=0, atol=0)
    assert buf[:, n:, :n].eq(0).all() and buf[:, :n, n:].eq(0).all()
    assert torch.equal(buf[:, n:, n:], torch.eye(16, dtype=D).expand(2, 16, 16))
    factor = damped_factor(m, lam)
    lower = factor[:, :n, :n]
    torch.testing.assert_close(lower @ lower.mT, m + lam[:, None, None] * eye)
    assert factor[:, n:, :n].eq(0).all()  # block-diagonal: the corner is factorised apart
    inv = factor_inverse(factor, n)
    assert inv.shape == (2, n, n)
    want = inverse_each(m + lam[:, None, None] * eye)
    torch.testing.assert_close(inv, want)
    torch.testing.assert_close(damped_cholesky_inverse(m, lam), want)
    # a failed factorisation falls back to a larger damping, unpadded
    singular = torch.zeros(n, n, dtype=D)
    singular[0, 0] = 1.0
    inv = damped_cholesky_inverse(singular, 0.0)
    assert inv is not None and inv.shape == (n, n) and torch.isfinite(inv).all()
    assert damped_cholesky_inverse(torch.full((n, n), float("nan"), dtype=D), 1.0) is None
    # damped_cholesky (dense blocks, Newton) factorises in the padded layout too: the factor
    # of order n, column-major and dense (as LAPACK takes it), as unpadded
    res = damped_cholesky(m[0], 0.5)
    assert res is not None and res[1] == 0.5
    assert res[0].shape == (n, n) and res[0].mT.is_contiguous()
    torch.testing.assert_close(res[0], torch.linalg.cholesky(m[0] + 0.5 * eye))
    for order in (n, n + 3):  # padded and not: the same factor, the input left as it was
        y = torch.randn(order, order + 3, generator=g, dtype=D)
        a = y @ y.T / order
        before = a.clone()
        factor, info = cholesky_ex(a, 0.25)
        assert int(info) == 0 and factor.shape == (order, order) and factor.mT.is_contiguous()
        torch.testing.assert_close(factor, torch.linalg.cholesky(a + 0.25 * torch.eye(order)))
        assert torch.equal(a, before)


def test_a_gram_matrix_is_finite_exactly_when_its_diagonal_is():
    """Σ xxᵀ, batched sums of them and Hadamard products of them (the forms the methods check
    by their diagonals): NaN, ±∞ or overflowing entries anywhere in the factors, next to
    zeros or not, make the diagonal non-finite whenever any entry is."""
    g = torch.Generator().manual_seed(0)
    bad_values = [float("nan"), float("inf"), -float("inf"), 1e20, -3e19]
    seen = {True: 0, False: 0}
    for trial in range(300):
        k, n = 1 + trial % 4, 2 + trial % 5
        x = torch.randn(2, k, n, generator=g)
        y = torch.randn(2, k, n, generator=g)
        x[torch.rand(x.shape, generator=g) < 0.3] = 0.0  # zeros next to the bad entries
        for t in (x, y):
            for _ in range(int(torch.randint(0, 3, (1,), generator=g))):
                i = [int(torch.randint(0, s, (1,), generator=g)) for s in t.shape]
                t[i[0], i[1], i[2]] = bad_values[int(torch.randint(0, 5, (1,), generator=g))]
        grams = [
            x.mT @ x,  # [2, n, n]: one Gram matrix per batch entry
            (x.mT @ x).sum(0) * 0.5,  # a positive multiple of their sum
            (x @ x.mT) * (y @ y.mT),  # Hadamard product (a sketched factored Gram matrix)
        ]
        for m in grams:
            whole = bool(torch.isfinite(m).all())
            assert bool(torch.isfinite(gram_diagonal(m)).all()) == whole
            assert finite_flags([gram_diagonal(m)]) == [whole]
            seen[whole] += 1
    assert min(seen.values()) > 100  # both outcomes exercised
