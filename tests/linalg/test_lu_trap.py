"""The package never reaches the batched LU routines that hang on the tested CPU build.

With the thread count set (as the bench workers and tests do), ``torch.linalg.inv``/``solve``/
``lu_factor`` on a batch of two or more matrices of order about 200 or more hang inside MKL
(DESIGN.md §8). The package solves with Cholesky or eigh; these tests keep it that way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import precond
from precond.linalg.blocks import DenseBlock, KronBlock

LU_NAMES = {
    "inv",
    "inv_ex",
    "inverse",
    "solve",
    "solve_ex",
    "lu",
    "lu_factor",
    "lu_factor_ex",
    "lu_solve",
    "ldl_factor",
    "ldl_solve",
    "matrix_power",
    "pinv",
    "det",
    "slogdet",
}
# (module path relative to the package, enclosing function): single small matrices only
ALLOWED = {("methods/psgd_fit.py", "_solve_small")}


def _lu_calls() -> set[tuple[str, str]]:
    root = Path(precond.__file__).parent
    found = set()
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module)):
                continue
            name = getattr(func, "name", "<module>")
            for node in ast.walk(func):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in LU_NAMES
                    and isinstance(node.func.value, ast.Attribute | ast.Name)
                    and ast.unparse(node.func.value) in {"torch", "torch.linalg", "linalg"}
                ):
                    found.add((path.relative_to(root).as_posix(), name))
    return found


def test_package_calls_no_lu_routine_outside_the_allowed_small_solve():
    calls = _lu_calls()
    # nested functions are reported with their enclosing ones; keep the innermost names only
    assert {c for c in calls if c not in ALLOWED and c[1] != "<module>"} == set()
    assert calls >= ALLOWED, "the allowed list names a call that no longer exists: trim it"


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("solver", ["cholesky", "eigh"])
def test_batched_dense_blocks_of_order_256_do_not_hang_with_threads_set(two_threads, solver):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, 300, generator=g, dtype=torch.float64)
    m = x @ x.mT / 300
    block = DenseBlock(solver)
    block.update(m)
    assert block.refresh(1e-2)
    v = torch.randn(2, 256, generator=g, dtype=torch.float64)
    got = block.apply(v, -1)
    want = torch.stack(
        [torch.linalg.solve(mi + 1e-2 * torch.eye(256, dtype=m.dtype), vi) for mi, vi in zip(m, v)]
    )  # one matrix per call: safe
    torch.testing.assert_close(got, want)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("solver", ["cholesky", "eigh"])
def test_batched_kron_blocks_of_order_256_do_not_hang_with_threads_set(two_threads, solver):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 256, 400, generator=g, dtype=torch.float64)
    b = torch.randn(2, 256, 400, generator=g, dtype=torch.float64)
    block = KronBlock(solver, "pi")
    block.update(a @ a.mT / 400, b @ b.mT / 400)
    assert block.refresh(1e-2)
    v = torch.randn(2, 256, 256, generator=g, dtype=torch.float64)
    got = block.apply(v, -1)
    # (B ⊗ A)⁻¹ vec(V) with the damping split between the factors, one matrix per call
    da, db = block._split(1e-2)
    eye = torch.eye(256, dtype=torch.float64)
    for k in range(2):
        left = torch.linalg.solve(b[k] @ b[k].T / 400 + db[k] * eye, v[k])
        want = torch.linalg.solve(a[k] @ a[k].T / 400 + da[k] * eye, left.T).T
        torch.testing.assert_close(got[k], want)
