"""Oracle tests: every (curvature × representation × layer kind × loss × reduction) that exists
equals a dense float64 matrix built by torch.func, to 1e-8 relative error."""

from __future__ import annotations

import pytest
import torch
from tests.curvature.cases import PAIR_IDS, PAIRS, make

import precond
from precond.curvature import exact
from precond.curvature.representation import canonical_permutation, unit_blocks_from_layer

ALL_SHAPES = ["full", "layer_wise", "unit_wise", "diag", "kron", "kfe"]
FISHER_TYPES = ["fisher_exact", "ggn", "fisher_emp"]


def rel_err(got, want):
    return float((got - want).norm() / want.norm().clamp(min=1e-300))


def assert_rel(got, want, tol=1e-8, what=""):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = rel_err(got, want)
    assert err < tol, f"{what}: relative error {err:.2e}"


def _oracle_layer_checks(result, want_full, tag):
    """Every per-layer representation against the dense matrix's slices."""
    slices = result.param_slices()
    for name, lc in result.items():
        block = want_full[slices[name], slices[name]]
        if lc.canonical:
            perm = canonical_permutation(lc.layer)
            canon = block[perm][:, perm]
        else:
            canon = block
        if "layer_wise" in lc:
            assert_rel(lc.layer_wise, canon, what=f"{tag} {name} layer_wise")
            assert_rel(lc.to_param_order(lc.layer_wise), block, what=f"{tag} {name} param order")
        if "diag" in lc:
            assert_rel(lc.diag.reshape(-1), canon.diagonal(), what=f"{tag} {name} diag")
            flat = torch.cat([d.reshape(-1) for d in lc.diag_params()])
            assert_rel(flat, block.diagonal(), what=f"{tag} {name} diag_params")
        if "unit_wise" in lc:
            want_units = unit_blocks_from_layer(canon, lc.layer.shape)
            assert_rel(lc.unit_wise, want_units, what=f"{tag} {name} unit_wise")
        if "kfe" in lc:
            assert_rel(
                lc.kfe.scale, _kfe_oracle(lc.kfe, canon, lc.layer.shape), what=f"{tag} {name} kfe"
            )


def _kfe_oracle(kfe, canon, shape):
    """EKFAC scaling = diag((Q_B ⊗ Q_A)ᵀ F_layer (Q_B ⊗ Q_A)) per group."""
    g, o, i = shape
    out = []
    for k in range(g):
        qa = kfe.qa[k] if kfe.qa.dim() == 3 else torch.eye(i, dtype=canon.dtype)
        q = torch.kron(kfe.qb[k].contiguous(), qa.contiguous())
        blk = canon[k * o * i : (k + 1) * o * i, k * o * i : (k + 1) * o * i]
        out.append((q.T @ blk @ q).diagonal().reshape(o, i))
    return torch.stack(out)


@pytest.mark.parametrize("curvature", FISHER_TYPES)
@pytest.mark.parametrize("case,reduction", PAIRS, ids=PAIR_IDS)
def test_fisher_types_match_torch_func(case, reduction, curvature):
    model, x, t = make(case)
    kw = dict(case.get("kwargs", {}), reduction=reduction)
    if curvature in case.get("skip", ()):
        # weighted losses are not likelihoods: the Fisher is undefined and says so
        with pytest.raises(ValueError, match="is undefined; use curvature='ggn' or 'fisher_emp'"):
            precond.fisher(model, case["loss"], x, t, curvature=curvature, shapes=ALL_SHAPES, **kw)
        return
    want = exact.dense_curvature(curvature, model, case["loss"], x, t, **kw)
    got = precond.fisher(model, case["loss"], x, t, curvature=curvature, shapes=ALL_SHAPES, **kw)
    assert list(got.params) == [p for _, p in exact.trained_params(model)]
    assert_rel(got.full, want, what="full")
    _oracle_layer_checks(got, want, curvature)


@pytest.mark.parametrize("case,reduction", PAIRS, ids=PAIR_IDS)
def test_hessian_matches_torch_func(case, reduction):
    model, x, t = make(case)
    kw = dict(case.get("kwargs", {}), reduction=reduction)
    want = exact.dense_hessian(model, case["loss"], x, t, **kw)
    got = precond.hessian(
        model, case["loss"], x, t, shapes=["full", "layer_wise", "unit_wise", "diag"], **kw
    )
    assert_rel(got.full, want, what="hessian full")
    _oracle_layer_checks(got, want, "hessian")
    # layer blocks from per-layer HVPs (no full matrix) agree too
    per_layer = precond.hessian(model, case["loss"], x, t, shapes=["layer_wise"], **kw)
    for name, lc in per_layer.items():
        assert_rel(lc.layer_wise, got[name].layer_wise, what=f"hessian {name} per-layer HVPs")


@pytest.mark.parametrize("case,reduction", PAIRS, ids=PAIR_IDS)
def test_matrix_free_products_match_torch_func(case, reduction):
    model, x, t = make(case)
    loss, kw = case["loss"], dict(case.get("kwargs", {}), reduction=reduction)
    n = sum(p.numel() for _, p in exact.trained_params(model))
    v = torch.randn(n, dtype=torch.float64)
    assert_rel(
        precond.hvp(model, loss, x, t, v, **kw),
        exact.dense_hessian(model, loss, x, t, **kw) @ v,
        what="hvp",
    )
    assert_rel(
        precond.ggn_vp(model, loss, x, t, v, **kw),
        exact.dense_ggn(model, loss, x, t, **kw) @ v,
        what="ggn_vp",
    )
    for curvature in ("fisher_exact", "fisher_emp"):
        if curvature in case.get("skip", ()):
            continue
        want = exact.dense_curvature(curvature, model, loss, x, t, **kw) @ v
        got = precond.fisher_vp(model, loss, x, t, v, curvature=curvature, **kw)
        assert_rel(got, want, what=f"fisher_vp {curvature}")
    if "fisher_mc" not in case.get("skip", ()):
        # the operator samples its labels once: the same labels as FisherMaker with the same seed
        dense_mc = precond.fisher(
            model, loss, x, t, curvature="fisher_mc", n_mc_samples=3, seed=5, shapes="full", **kw
        ).full
        got = precond.fisher_vp(
            model, loss, x, t, v, curvature="fisher_mc", n_mc_samples=3, seed=5, **kw
        )
        assert_rel(got, dense_mc @ v, what="fisher_vp mc")


@pytest.mark.parametrize("case,reduction", PAIRS, ids=PAIR_IDS)
def test_exact_fisher_equals_ggn(case, reduction):
    """Ladder: for CE (incl. label smoothing, ignore_index, sequence logits), MSE and BCE the
    Fisher of the predictive distribution, computed by enumeration, is the GGN."""
    model, x, t = make(case)
    kw = dict(case.get("kwargs", {}), reduction=reduction)
    if "fisher_exact" in case.get("skip", ()):
        with pytest.raises(ValueError):
            exact.dense_fisher_exact(model, case["loss"], x, t, **kw)
        return
    fisher = exact.dense_fisher_exact(model, case["loss"], x, t, **kw)
    ggn = exact.dense_ggn(model, case["loss"], x, t, **kw)
    assert_rel(fisher, ggn, tol=1e-10, what="F_exact vs GGN")
