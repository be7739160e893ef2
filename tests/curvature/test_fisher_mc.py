"""Monte-Carlo Fisher: a statistical test that the estimate converges to the exact Fisher.

``F̂_n`` averages ``n`` sampled-label outer products, so ``E[F̂_n] = F`` and
``E‖F̂_n − F‖² = v / n``. The tests check (1) unbiasedness by t-tests on the quadratic forms
``uᵀ F̂_n u`` of independent replicates and (2) the ``1/n`` decay of the mean squared error (the
``1/√n`` decay of the error). Generators are seeded, so the outcome is deterministic.
"""

from __future__ import annotations

import pytest
import torch
from tests.curvature.cases import CASES, make

import precond

BY_ID = {c["id"]: c for c in CASES}


def _estimates(case, reduction, n, seeds):
    model, x, t = make(case)
    kw = dict(case.get("kwargs", {}), reduction=reduction)
    exact = precond.fisher(
        model, case["loss"], x, t, curvature="fisher_exact", shapes="full", **kw
    ).full
    est = torch.stack(
        [
            precond.fisher(
                model,
                case["loss"],
                x,
                t,
                curvature="fisher_mc",
                n_mc_samples=n,
                seed=s,
                shapes="full",
                **kw,
            ).full
            for s in seeds
        ]
    )
    return est, exact


def _check_unbiased(est, exact, sigmas, probes=4):
    """t-tests of ``uᵀ F̂ u`` (i.i.d. over replicates, mean ``uᵀ F u``) for fixed random ``u``."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(probes):
        u = torch.randn(exact.shape[0], generator=gen, dtype=exact.dtype)
        vals = torch.einsum("i,rij,j->r", u, est, u)
        want = u @ exact @ u
        t_stat = (vals.mean() - want).abs() / (vals.std() / len(vals) ** 0.5)
        assert float(t_stat) < sigmas, f"t statistic {float(t_stat):.2f}"


def _mse(est, exact):
    return float(((est - exact) ** 2).sum(dim=(1, 2)).mean())


def _check_rate(case, reduction, n_small, n_large, replicates, seeds_offset=0):
    small, exact = _estimates(
        case, reduction, n_small, range(seeds_offset, seeds_offset + replicates)
    )
    large, _ = _estimates(
        case, reduction, n_large, range(seeds_offset + 1000, seeds_offset + 1000 + replicates)
    )
    ratio = _mse(small, exact) / _mse(large, exact)
    expected = n_large / n_small
    # error ∝ 1/√n ⇔ squared error ∝ 1/n; allow the scatter of a few replicates
    assert expected / 2 < ratio < expected * 2, f"MSE ratio {ratio:.2f}, expected ≈ {expected}"
    return small, exact


@pytest.mark.parametrize(
    "case_id,reduction",
    [("mlp-ce", "mean"), ("linear3d-ce_nct_ignore", "sum"), ("mlp-mse", "mean")],
)
def test_mc_fisher_converges_to_exact_fast(case_id, reduction):
    small, exact = _check_rate(BY_ID[case_id], reduction, n_small=2, n_large=32, replicates=12)
    _check_unbiased(small, exact, sigmas=5.0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", [c for c in CASES if "fisher_mc" not in c.get("skip", ())], ids=lambda c: c["id"]
)
def test_mc_fisher_converges_to_exact_every_case(case):
    small, exact = _check_rate(case, "mean", n_small=8, n_large=256, replicates=24)
    _check_unbiased(small, exact, sigmas=5.0)


def test_mc_samples_depend_only_on_the_seed():
    case = BY_ID["mlp-ce"]
    model, x, t = make(case)
    a = precond.fisher(model, case["loss"], x, t, curvature="fisher_mc", seed=3, shapes="diag")
    b = precond.fisher(model, case["loss"], x, t, curvature="fisher_mc", seed=3, shapes="diag")
    c = precond.fisher(model, case["loss"], x, t, curvature="fisher_mc", seed=4, shapes="diag")
    assert torch.equal(a["0"].diag, b["0"].diag)
    assert not torch.equal(a["0"].diag, c["0"].diag)


def test_sampled_classes_follow_the_probabilities():
    from precond.curvature.loss import sample_classes

    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 2.0], [0.5, 0.5, 0.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    n = 20000
    draws = sample_classes(probs.expand(n, -1, -1), gen)  # [n, 3]
    assert draws.shape == (n, 3) and draws.dtype == torch.int64
    freq = torch.stack([torch.bincount(draws[:, r], minlength=4) for r in range(3)]).double() / n
    want = (probs / probs.sum(-1, keepdim=True)).double()  # unnormalised rows are normalised
    assert (freq - want).abs().max() < 0.015  # 4.5 standard deviations at most
    assert freq[want == 0].eq(0).all()  # classes without mass are never drawn
    # invalid rows give a class, not an error; the statistics built on them stay non-finite
    bad = torch.tensor([[float("nan"), 0.5], [float("inf"), 1.0], [0.0, 0.0]])
    got = sample_classes(bad, gen)
    assert got.shape == (3,) and ((got >= 0) & (got <= 1)).all()
