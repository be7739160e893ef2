"""Blocks: apply(power) equals the dense matrix power of to_dense(); state_dict round trips."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import inverse_each

from precond.linalg.blocks import DenseBlock, DiagBlock, KfeBlock, KronBlock, KronDamping, Solver
from precond.linalg.solvers import padded_order

LAM = 0.1


def _spd(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(*shape, shape[-1] + 2, generator=g, dtype=torch.float64)
    return m @ m.transpose(-1, -2) / shape[-1]


def _dense_power(m, power, damping):
    evals, evecs = torch.linalg.eigh(m)
    return evecs @ torch.diag_embed((evals + damping) ** power) @ evecs.transpose(-1, -2)


def _flat_apply(block, v, power):
    return block.apply(v, power)


@pytest.mark.parametrize(
    "solver,power", [("cholesky", -1.0), ("eigh", -1.0), ("eigh", -0.5), ("eigh", 0.25)]
)
def test_dense_block_powers(solver, power):
    m = _spd(2, 5)
    block = DenseBlock(solver)
    block.update(m)
    assert block.refresh(LAM)
    v = torch.randn(2, 5, dtype=torch.float64)
    want = (_dense_power(m, power, LAM) @ v.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(block.apply(v, power), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(block.apply(v, 1.0), (m @ v.unsqueeze(-1)).squeeze(-1))
    assert torch.equal(block.to_dense(), m)


@pytest.mark.parametrize("n", [5, 256])  # unpadded and padded (factorised at order 272)
def test_cholesky_dense_block_inverts_its_factor_in_place(n, monkeypatch):
    inverted = []
    real = torch.cholesky_inverse

    def spy(factor, upper=False, *, out=None):
        inverted.append(out is not None and out.data_ptr() == factor.data_ptr())
        return real(factor, upper, out=out) if out is not None else real(factor, upper)

    monkeypatch.setattr(torch, "cholesky_inverse", spy)
    m = _spd(2, n)
    block = DenseBlock("cholesky")
    block.update(m)
    assert block.refresh(LAM)
    assert inverted == [True]  # no buffer for the inverse beside the factor
    inv = block.inverse
    assert inv is not None and inv.shape == (2, n, n)
    # a padded factor is inverted in its own buffer too: the inverse is a view of it
    order = padded_order(n, "cpu")
    assert inv.is_contiguous() == (order == n)
    assert inv.untyped_storage().nbytes() == 2 * order * order * inv.element_size()
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(inv, inverse_each(m + LAM * eye))


def test_cholesky_dense_block_rejects_other_powers():
    block = DenseBlock("cholesky")
    block.update(_spd(3))
    block.refresh(LAM)
    with pytest.raises(
        ValueError, match=r"Invalid power: -0.5. The cholesky solver supports -1 and 1."
    ):
        block.apply(torch.randn(3, dtype=torch.float64), -0.5)


def test_diag_block_powers():
    values = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)
    block = DiagBlock()
    block.update(values)
    assert block.refresh(0.0)
    v = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(
        block.apply(v, -0.5), torch.tensor([1.0, 0.5, 1 / 3], dtype=torch.float64)
    )
    torch.testing.assert_close(block.to_dense(), torch.diag(values))


@pytest.mark.parametrize(
    "solver,mode,power",
    [("eigh", "exact", -1.0), ("eigh", "exact", -0.5), ("eigh", "exact", 0.5)],
)
def test_kron_block_exact_damping_powers_equal_dense(solver, mode, power):
    a, b = _spd(2, 4, seed=1), _spd(2, 3, seed=2)
    block = KronBlock(solver, mode)
    block.update(a, b)
    assert block.refresh(LAM)
    dense = block.to_dense()
    want_m = _dense_power(dense, power, LAM)
    v = torch.randn(2, 3, 4, dtype=torch.float64)
    got = block.apply(v, power).reshape(-1)
    torch.testing.assert_close(got, want_m @ v.reshape(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(block.apply(v, 1.0).reshape(-1), dense @ v.reshape(-1))


@pytest.mark.parametrize("solver", ["cholesky", "eigh"])
@pytest.mark.parametrize("mode", ["pi", "sqrt"])
def test_kron_block_split_damping_inverse(solver, mode):
    a, b = _spd(1, 4, seed=3), _spd(1, 3, seed=4)
    block = KronBlock(solver, mode)
    block.update(a, b)
    assert block.refresh(LAM)
    da, db = block._split(LAM)
    eye_a, eye_b = torch.eye(4, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    damped = torch.kron(b[0] + db[0] * eye_b, a[0] + da[0] * eye_a)
    v = torch.randn(1, 3, 4, dtype=torch.float64)
    want = torch.linalg.solve(damped, v.reshape(-1))
    torch.testing.assert_close(block.apply(v, -1.0).reshape(-1), want, rtol=1e-10, atol=1e-12)


def test_kron_block_diagonal_input_factor():
    a = torch.tensor([[1.0, 0.0, 3.0]], dtype=torch.float64)  # a token never seen: 0
    b = _spd(1, 2)
    block = KronBlock("eigh", "exact")
    block.update(a, b)
    block.refresh(LAM)
    dense = block.to_dense()
    assert torch.equal(dense, torch.kron(b[0], torch.diag(a[0])))
    v = torch.randn(1, 2, 3, dtype=torch.float64)
    want = torch.linalg.solve(dense + LAM * torch.eye(6, dtype=torch.float64), v.reshape(-1))
    torch.testing.assert_close(block.apply(v, -1.0).reshape(-1), want)


@pytest.mark.parametrize("diag_a", [False, True])
def test_kfe_block_dense_and_powers(diag_a):
    # Regression: to_dense used torch.kron on non-contiguous eigh slices and crashed.
    a = torch.rand(2, 6, dtype=torch.float64) if diag_a else _spd(2, 6, seed=5)
    b = _spd(2, 3, seed=6)
    block = KfeBlock()
    assert block.set_basis(a, b)
    scale = torch.rand(2, 3, 6, dtype=torch.float64) + 0.1
    block.update(scale)
    assert block.refresh(LAM)
    dense = block.to_dense()
    torch.testing.assert_close(torch.linalg.eigvalsh(dense), scale.reshape(-1).sort().values)
    v = torch.randn(2, 3, 6, dtype=torch.float64)
    for power in (-1.0, -0.5, 1.0):
        damp = 0.0 if power == 1.0 else LAM
        want = _dense_power(dense, power, damp) @ v.reshape(-1)
        torch.testing.assert_close(block.apply(v, power).reshape(-1), want, rtol=1e-9, atol=1e-11)


def _blocks():
    a, b = _spd(2, 4, seed=7), _spd(2, 3, seed=8)
    dense = DenseBlock("eigh")
    dense.update(_spd(5))
    diag = DiagBlock()
    diag.update(torch.rand(2, 3, dtype=torch.float64))
    kron = KronBlock(Solver.EIGH, KronDamping.EXACT)
    kron.update(a, b)
    kron_chol = KronBlock()
    kron_chol.update(a, b)
    kfe = KfeBlock()
    kfe.set_basis(a, b)
    kfe.update(torch.rand(2, 3, 4, dtype=torch.float64))
    return {
        "dense": (dense, (5,)),
        "diag": (diag, (2, 3)),
        "kron": (kron, (2, 3, 4)),
        "kron_chol": (kron_chol, (2, 3, 4)),
        "kfe": (kfe, (2, 3, 4)),
    }


@pytest.mark.parametrize("name", ["dense", "diag", "kron", "kron_chol", "kfe"])
def test_state_dict_round_trip_gives_identical_products(name):
    block, shape = _blocks()[name]
    assert block.refresh(LAM)
    state = block.state_dict()
    fresh = type(block)(*([block.solver] if hasattr(block, "solver") else []))
    if isinstance(block, KronBlock):
        fresh = KronBlock(block.solver, block.damping_mode)
    fresh.load_state_dict(state)
    v = torch.randn(*shape, dtype=torch.float64)
    assert torch.equal(fresh.apply(v, -1.0), block.apply(v, -1.0))
    assert torch.equal(fresh.to_dense(), block.to_dense())
    # the state is a copy: later updates of the original leave it alone
    with pytest.raises(ValueError, match=r"Invalid block state: missing"):
        fresh.load_state_dict({})


def test_kron_block_with_padded_factor_orders_applies_the_damped_inverse():
    from precond.linalg.solvers import padded_order

    n = 145  # the output factor is factorised at order 160 on a CPU
    assert padded_order(n, "cpu") == 160
    a, b = _spd(1, 5, seed=3), _spd(1, n, seed=4)
    block = KronBlock("cholesky", "pi")
    block.update(a, b)
    assert block.refresh(LAM)
    assert block.b_inv.shape == (1, n, n)
    da, db = block._split(LAM)
    torch.testing.assert_close(
        block.b_inv[0] @ (b[0] + db[0] * torch.eye(n, dtype=torch.float64)),
        torch.eye(n, dtype=torch.float64),
    )
    v = torch.randn(1, n, 5, dtype=torch.float64)
    want = torch.linalg.solve(b[0] + db[0] * torch.eye(n, dtype=torch.float64), v[0])
    want = torch.linalg.solve(a[0] + da[0] * torch.eye(5, dtype=torch.float64), want.T).T
    torch.testing.assert_close(block.apply(v, -1.0)[0], want)
    state = block.state_dict()
    other = KronBlock("cholesky", "pi")
    other.load_state_dict(state)
    torch.testing.assert_close(other.apply(v, -1.0), block.apply(v, -1.0))
