"""LossInputs vectors: Σ_k v_k v_kᵀ equals the loss Hessian in the logits, example by example."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian

from precond.curvature.loss import LossInputs, LossSpec
from precond.enums import CurvatureType, LossKind


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_weighted_ce_ggn_vectors_match_loss_hessian(reduction, label_smoothing):
    # Regression: with class weights AND label smoothing the Hessian's row factor is
    # (1 − ε) w_t + ε·mean(w), not w_t.
    torch.manual_seed(0)
    z = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([0, 2, -100, 1])
    w = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)

    def loss(z):
        return F.cross_entropy(z, t, weight=w, label_smoothing=label_smoothing, reduction=reduction)

    want = hessian(loss)(z).reshape(12, 12)
    spec = LossSpec(LossKind.CROSS_ENTROPY, reduction, -100, label_smoothing, w)
    inputs = LossInputs(spec, z, t, 4)
    vecs = torch.stack([v.reshape(4, 3) for v in inputs.exact_vectors(CurvatureType.GGN)])
    got = torch.zeros(12, 12, dtype=torch.float64)
    for n in range(4):
        got[3 * n : 3 * n + 3, 3 * n : 3 * n + 3] = vecs[:, n].T @ vecs[:, n]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
