"""Ladder tests: representations are consistent with each other, and Kronecker factors are exact
where theory says so (one datum without weight sharing; deep linear networks with MSE)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.curvature.cases import CASES, make
from torch import nn

import precond
from precond.curvature.representation import unit_blocks_from_layer

ALL = ["full", "layer_wise", "unit_wise", "diag", "kron", "kfe"]


def assert_rel(got, want, tol=1e-10, what=""):
    err = float((got - want).norm() / want.norm().clamp(min=1e-300))
    assert err < tol, f"{what}: relative error {err:.2e}"


def group_blocks(matrix, shape):
    """The group-diagonal part of a canonical layer block (what a Kronecker block can hold)."""
    g, o, i = shape
    n = o * i
    out = torch.zeros_like(matrix)
    for k in range(g):
        sl = slice(k * n, (k + 1) * n)
        out[sl, sl] = matrix[sl, sl]
    return out


@pytest.mark.parametrize("curvature", ["ggn", "fisher_mc", "hessian"])
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_blocks_are_slices_and_diagonals_are_diagonals(case, curvature):
    model, x, t = make(case)
    kw = case.get("kwargs", {})
    if curvature in case.get("skip", ()):
        with pytest.raises(ValueError, match="is undefined"):
            precond.fisher(model, case["loss"], x, t, curvature=curvature, shapes=ALL, **kw)
        return
    if curvature == "hessian":
        res = precond.hessian(
            model, case["loss"], x, t, shapes=["full", "layer_wise", "unit_wise", "diag"], **kw
        )
    else:
        mc = dict(n_mc_samples=2, seed=0) if curvature == "fisher_mc" else {}
        res = precond.fisher(model, case["loss"], x, t, curvature=curvature, shapes=ALL, **mc, **kw)
    slices = res.param_slices()
    for name, lc in res.items():
        block = lc.layer_wise
        assert_rel(
            lc.to_param_order(block), res.full[slices[name], slices[name]], what=f"{name} slice"
        )
        assert_rel(lc.diag.reshape(-1), block.diagonal(), what=f"{name} diag")
        assert_rel(
            lc.unit_wise, unit_blocks_from_layer(block, lc.layer.shape), what=f"{name} units"
        )
        if curvature != "hessian":
            # the eigenbasis scaling is the layer block's diagonal in the Kronecker eigenbasis:
            # its total equals the trace of the block (a rotation keeps the trace)
            torch.testing.assert_close(
                lc.kfe.scale.sum(), group_blocks(block, lc.layer.shape).trace()
            )


class OneDatumNet(nn.Module):
    """Layers without weight sharing on a single example: Embedding (one token), Linear,
    LayerNorm, eval-mode BatchNorm1d."""

    def __init__(self, out: int = 3):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.fc1 = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.fc2 = nn.Linear(4, out)
        self.bn = nn.BatchNorm1d(out)

    def forward(self, x):
        return self.bn(self.fc2(torch.tanh(self.norm(self.fc1(self.emb(x))))))


class OneDatumConv(nn.Module):
    """Grouped Conv2d whose kernel covers the input (one output position: no weight sharing)
    → GroupNorm → Linear."""

    def __init__(self, out: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, groups=2)
        self.gn = nn.GroupNorm(2, 6)
        self.fc = nn.Linear(6, out)

    def forward(self, x):
        return self.fc(torch.tanh(self.gn(self.conv(x))).flatten(1))


ONE_DATUM_MODELS = [
    ("emb_linear_ln_bn", OneDatumNet, lambda: torch.tensor([2])),
    ("conv_groups_gn", OneDatumConv, lambda: torch.randn(1, 4, 3, 3, dtype=torch.float64)),
]

ONE_DATUM = [
    ("ce", F.cross_entropy, lambda: torch.randint(0, 3, (1,))),
    ("mse", F.mse_loss, lambda: torch.randn(1, 3, dtype=torch.float64)),
    (
        "bce",
        F.binary_cross_entropy_with_logits,
        lambda: torch.rand(1, 3, dtype=torch.float64).round(),
    ),
]


@pytest.mark.parametrize("curvature", ["fisher_exact", "ggn", "fisher_emp", "fisher_mc"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_id,loss,target", ONE_DATUM, ids=[c[0] for c in ONE_DATUM])
@pytest.mark.parametrize(
    "model_id,model_fn,input_fn", ONE_DATUM_MODELS, ids=[m[0] for m in ONE_DATUM_MODELS]
)
def test_kron_and_kfe_are_exact_for_one_datum(
    model_id, model_fn, input_fn, loss_id, loss, target, reduction, curvature
):
    torch.manual_seed(0)
    model = model_fn().double().eval()
    x, t = input_fn(), target()
    mc = dict(n_mc_samples=3, seed=1) if curvature == "fisher_mc" else {}
    res = precond.fisher(
        model,
        loss,
        x,
        t,
        curvature=curvature,
        shapes=["layer_wise", "kron", "kfe"],
        reduction=reduction,
        **mc,
    )
    for name, lc in res.items():
        want = group_blocks(lc.layer_wise, lc.layer.shape)
        assert_rel(lc.kron.to_dense(), want, what=f"{name} kron")
        assert_rel(lc.kfe.to_dense(), want, tol=1e-9, what=f"{name} kfe")


@pytest.mark.parametrize("curvature", ["fisher_exact", "ggn"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("positions", [None, 3], ids=["2d", "3d_expand"])
def test_kron_is_exact_for_deep_linear_network_with_mse(positions, reduction, curvature):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3, bias=False), nn.Linear(3, 2)).double()
    shape = (6, 4) if positions is None else (6, positions, 4)
    x = torch.randn(*shape, dtype=torch.float64)
    t = torch.randn(*shape[:-1], 2, dtype=torch.float64)
    res = precond.fisher(
        model,
        F.mse_loss,
        x,
        t,
        curvature=curvature,
        shapes=["layer_wise", "kron", "kfe"],
        reduction=reduction,
    )
    for name, lc in res.items():
        assert_rel(lc.kron.to_dense(), lc.layer_wise, what=f"{name} kron")
        assert_rel(lc.kfe.to_dense(), lc.layer_wise, tol=1e-9, what=f"{name} kfe")


def test_reduce_factors_for_weight_sharing_follow_their_definition():
    # K-FAC-reduce: A from position-averaged inputs, B from position-summed output gradients.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x, t = torch.randn(5, 6, 4, dtype=torch.float64), torch.randn(5, 6, 3, dtype=torch.float64)
    res = precond.fisher(
        model,
        F.mse_loss,
        x,
        t,
        curvature="ggn",
        shapes=["kron"],
        weight_sharing="reduce",
        reduction="sum",
    )
    kron = res["0"].kron
    a = torch.cat([x, torch.ones(5, 6, 1, dtype=torch.float64)], -1).mean(1)
    torch.testing.assert_close(kron.a[0], a.T @ a / 5)
    # sum-MSE: one exact vector √2·e_j per (position p, class j), so Σ_s g = √2·e_j for each
    # of the N·T vector-example pairs → B = 2·N·T·I
    torch.testing.assert_close(kron.b[0], 60.0 * torch.eye(3, dtype=torch.float64))


def test_hessian_layer_blocks_equal_ggn_for_relu_network_with_mse():
    # A ReLU network is linear in each layer's parameters (a.e.), so the residual term of the
    # Hessian vanishes within a layer; across layers it does not (the output is multilinear).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    x, t = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    h = precond.hessian(model, F.mse_loss, x, t, shapes=["full", "layer_wise"])
    g = precond.fisher(model, F.mse_loss, x, t, curvature="ggn", shapes=["full", "layer_wise"])
    for name in ("0", "2"):
        assert_rel(h[name].layer_wise, g[name].layer_wise, tol=1e-12, what=f"{name}: H vs GGN")
    assert float((h.full - g.full).norm()) > 1e-3  # the off-diagonal blocks differ
