"""LossInputs vectors: Σ_k v_k v_kᵀ equals the loss Hessian in the logits, example by example."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian

from precond.curvature.loss import LossInputs, LossSpec, parse_loss_call
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


_W = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
_HESSIAN_CASES = {
    "ce": (LossKind.CROSS_ENTROPY, (4, 3), "index", {}),
    "ce_sum": (LossKind.CROSS_ENTROPY, (4, 3), "index", {"reduction": "sum"}),
    "ce_ignore": (LossKind.CROSS_ENTROPY, (4, 3), "ignore", {}),
    "ce_weight_smooth": (
        LossKind.CROSS_ENTROPY,
        (4, 3),
        "ignore",
        {"weight": _W, "label_smoothing": 0.2},
    ),
    "ce_smooth": (LossKind.CROSS_ENTROPY, (4, 3), "index", {"label_smoothing": 0.1}),
    "ce_spatial": (LossKind.CROSS_ENTROPY, (2, 3, 5), "index", {}),
    "mse": (LossKind.MSE, (4, 2), "float", {}),
    "mse_sum": (LossKind.MSE, (4, 2), "float", {"reduction": "sum"}),
    "bce": (LossKind.BCE_WITH_LOGITS, (4, 3), "float", {}),
    "bce_weights": (
        LossKind.BCE_WITH_LOGITS,
        (4, 3),
        "float",
        {"weight": _W, "pos_weight": _W.flip(0), "reduction": "sum"},
    ),
}


@pytest.mark.parametrize("case", sorted(_HESSIAN_CASES))
def test_closed_form_loss_hessian_products_equal_the_loss_hessian(case):
    # The GGN products' (∇²_z L) v without autograd, against the dense Hessian of the loss.
    kind, shape, targets, kw = _HESSIAN_CASES[case]
    torch.manual_seed(0)
    z = torch.randn(*shape, dtype=torch.float64)
    if targets == "float":
        t = torch.rand(*shape, dtype=torch.float64)
    else:
        classes = shape[1]
        t = torch.randint(0, classes, (shape[0], *shape[2:]))
        if targets == "ignore":
            t[1] = -100
    fn = {
        LossKind.CROSS_ENTROPY: F.cross_entropy,
        LossKind.MSE: F.mse_loss,
        LossKind.BCE_WITH_LOGITS: F.binary_cross_entropy_with_logits,
    }[kind]
    want = hessian(lambda x: fn(x, t, **kw))(z).reshape(z.numel(), z.numel())
    inputs = parse_loss_call(fn, (z, t), dict(kw), shape[0])
    op = inputs.hessian_operator()
    assert op is not None
    v = torch.randn(4, *shape, dtype=torch.float64)
    got = torch.stack([op(vi) for vi in v]).reshape(4, -1)
    torch.testing.assert_close(got, v.reshape(4, -1) @ want.T, rtol=1e-12, atol=1e-14)


def test_closed_form_loss_hessian_declines_probability_targets():
    # −Σ t_j log p_j has Hessian (Σ_j t_j)(diag p − p pᵀ): the GGN products keep autograd.
    z, t = torch.randn(4, 3), torch.softmax(torch.randn(4, 3), dim=-1)
    assert parse_loss_call(F.cross_entropy, (z, t), {}, 4).hessian_operator() is None


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(6, 5), (3, 5, 4)])
@pytest.mark.parametrize("ignored", [False, True])
def test_mc_vectors_read_on_the_host_equal_the_device_path_bit_for_bit(
    monkeypatch, reduction, shape, ignored
):
    """Where nothing is ignored, a CPU reads the targets and scales by one number (cached):
    the vectors equal the tensor path's (every row's factor 1) bit for bit, in float32 and
    float64, with one and with several samples; an ignored row takes the tensor path."""
    from precond import numerics

    for dtype in (torch.float32, torch.float64):
        z = torch.randn(shape, dtype=dtype)
        n, classes = shape[0], shape[1]
        t = torch.randint(0, classes, (n, *shape[2:]))
        if ignored:
            t.view(-1)[1] = -100
        spec = LossSpec(LossKind.CROSS_ENTROPY, reduction=reduction)
        for samples in (1, 3):
            got = []
            for host in (True, False):
                monkeypatch.setattr(numerics, "READ_CPU_FLAGS", host)
                gen = torch.Generator().manual_seed(7)
                got.append(LossInputs(spec, z, t, n).mc_vectors(samples, gen))
            assert got[0].dtype == dtype and got[0].shape == (samples, *shape)
            assert torch.equal(got[0], got[1])
            if ignored:  # the ignored row's vectors are zero
                assert got[0].movedim(2, -1).reshape(samples, -1, classes)[:, 1].eq(0).all()
