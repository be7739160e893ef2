"""Newton theorems: one step solves a quadratic; layer-wise = block-diagonal solve; safe rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import flat_grad
from tests.methods._second_order_cases import (
    dense_hessian,
    plain_grad,
    regression,
    run_step,
    tanh_mlp,
)
from torch import nn

from precond import NumericalWarning, make_gradient_maker
from precond.methods.newton import NewtonConfig, NewtonGradientMaker
from precond.methods.second_order import BatchCurvature


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_one_step_with_lr_1_solves_least_squares():
    model, x, t = regression()
    gm = make_gradient_maker("newton", model, damping=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    run_step(gm, model, x, t)
    opt.step()
    design = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    solution = torch.linalg.lstsq(design, t).solution
    torch.testing.assert_close(model.weight.detach(), solution[:-1].T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.bias.detach(), solution[-1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", ["full", "layer_wise"])
def test_damped_step_equals_dense_solve(shape):
    model, x, t = regression()
    lam = 0.3
    h = dense_hessian(model, F.mse_loss, x, t)
    g = plain_grad(model, F.mse_loss, x, t)
    want = torch.linalg.solve(h + lam * torch.eye(len(g)), g)
    gm = make_gradient_maker("newton", model, damping=lam, hessian_shape=shape)
    run_step(gm, model, x, t)
    # One module: its layer-wise block is the full Hessian.
    torch.testing.assert_close(flat_grad(model), want, rtol=1e-10, atol=1e-12)


def test_layer_wise_equals_solve_with_diagonal_blocks():
    model, x, t = tanh_mlp()
    lam = 2.0
    h = dense_hessian(model, F.cross_entropy, x, t)
    g = plain_grad(model, F.cross_entropy, x, t)
    spans = [(0, 25), (25, 43)]
    want = torch.cat(
        [torch.linalg.solve(h[a:b, a:b] + lam * torch.eye(b - a), g[a:b]) for a, b in spans]
    )
    for a, b in spans:  # the blocks are PD after damping: no shift involved
        assert torch.linalg.eigvalsh(h[a:b, a:b])[0] + lam > 0
    gm = make_gradient_maker("newton", model, damping=lam, hessian_shape="layer_wise")
    run_step(gm, model, x, t, F.cross_entropy)
    torch.testing.assert_close(flat_grad(model), want, rtol=1e-9, atol=1e-11)
    for block, (a, b) in zip(gm.blocks, spans):
        torch.testing.assert_close(block.matrix, h[a:b, a:b], rtol=1e-9, atol=1e-11)


def _indefinite_case():
    model, x, t = tanh_mlp(seed=1)
    h = dense_hessian(model, F.cross_entropy, x, t)
    evals, evecs = torch.linalg.eigh(h)
    assert evals[0] < -1e-3  # the case is really indefinite
    return model, x, t, h, evals, evecs


def test_shift_rule_raises_damping_to_positive_definite():
    model, x, t, h, evals, _ = _indefinite_case()
    g = plain_grad(model, F.cross_entropy, x, t)
    lam = 1e-3
    gm = make_gradient_maker("newton", model, damping=lam, indefinite="shift")
    run_step(gm, model, x, t, F.cross_entropy)
    shift = max(lam, 1e-7 * float(evals.abs().max())) - float(evals[0])
    assert gm.blocks[0].damping_used == pytest.approx(shift, rel=1e-9)
    want = torch.linalg.solve(h + shift * torch.eye(len(g)), g)
    got = flat_grad(model)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    assert got.dot(g) > 0  # a descent direction
    assert torch.linalg.eigvalsh(h + shift * torch.eye(len(g)))[0] == pytest.approx(lam, rel=1e-6)


def test_saddle_free_rule_uses_absolute_eigenvalues():
    model, x, t, h, evals, evecs = _indefinite_case()
    g = plain_grad(model, F.cross_entropy, x, t)
    lam = 1e-2
    gm = make_gradient_maker("newton", model, damping=lam, indefinite="abs")
    run_step(gm, model, x, t, F.cross_entropy)
    want = evecs @ ((evecs.T @ g) / (evals.abs() + lam))
    torch.testing.assert_close(flat_grad(model), want, rtol=1e-8, atol=1e-10)


def test_intermediate_steps_reuse_the_factorisation(monkeypatch):
    model, x, t = tanh_mlp()
    lam = 0.5
    h0 = dense_hessian(model, F.cross_entropy, x, t)
    gm = make_gradient_maker(
        "newton", model, damping=lam, curvature_upd_interval=3, indefinite="abs"
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run_step(gm, model, x, t, F.cross_entropy)
    opt.step()
    calls = []
    orig = BatchCurvature.hessian_block
    monkeypatch.setattr(BatchCurvature, "hessian_block", lambda *a: calls.append(1) or orig(*a))
    g1 = plain_grad(model, F.cross_entropy, x, t)
    run_step(gm, model, x, t, F.cross_entropy)  # step 1: no products, stored inverse
    evals, evecs = torch.linalg.eigh(h0)
    want = evecs @ ((evecs.T @ g1) / (evals.abs() + lam))
    torch.testing.assert_close(flat_grad(model), want, rtol=1e-8, atol=1e-10)
    assert calls == [] and gm.batch is None


@pytest.mark.parametrize("model_name", ["mlp", "cnn_bn", "seq"])
def test_batched_and_single_products_build_the_same_hessian(model_name):
    # vmapped products (or their fallback, e.g. grouped convolutions) equal single HVPs.
    from tests.helpers import zoo

    model_fn, data_fn, task = zoo()[model_name]
    model = model_fn().double()
    x, t = data_fn(6)
    x = x.double() if x.is_floating_point() else x

    def loss_fn(y, tt):
        return F.cross_entropy(y.reshape(-1, y.shape[-1]), tt.reshape(-1))

    gms = [make_gradient_maker("newton", model, damping=1.0, hvp_batch_size=b) for b in (1, 16)]
    for gm in gms:
        run_step(gm, model, x, t, loss_fn)
    torch.testing.assert_close(gms[1].blocks[0].matrix, gms[0].blocks[0].matrix)


def test_bad_hessian_keeps_previous_factorisation():
    model, x, t = tanh_mlp()
    gm = make_gradient_maker("newton", model, damping=1.0, curvature_upd_interval=1)
    run_step(gm, model, x, t, F.cross_entropy)
    factor = gm.blocks[0].factor.clone()
    gm.blocks[0].matrix.fill_(float("nan"))
    with pytest.warns(NumericalWarning, match="could not factorise"):
        gm.update_preconditioner()
    assert torch.equal(gm.blocks[0].factor, factor)


def test_cost_model_counts_one_product_per_parameter():
    model, _, _ = tanh_mlp()
    cm = make_gradient_maker("newton", model, hessian_shape="layer_wise").cost_model()
    hvps = [op for op in cm.ops if op.kind == "hvp"]
    assert [op.shape for op in hvps] == [(43,)]
    assert sorted(op.shape for op in cm.ops if op.kind == "cholesky") == [(1, 18), (1, 25)]


def test_too_many_parameters_is_rejected_at_construction():
    with pytest.raises(
        ValueError,
        match=r"Invalid model size: 43. NewtonGradientMaker builds a dense Hessian with one "
        r"Hessian-vector product per preconditioned parameter and allows at most max_params=40",
    ):
        NewtonGradientMaker(tanh_mlp()[0], NewtonConfig(max_params=40))


CONFIG_ERRORS = [
    (
        dict(hessian_shape="diag"),
        r"Invalid hessian_shape: 'diag'. Supported: \('full', 'layer_wise'\).",
    ),
    (
        dict(hessian_shape="blocks"),
        r"Invalid hessian_shape: 'blocks'. Supported: \('full', 'layer_wise', 'unit_wise', 'diag'",
    ),
    (dict(indefinite="clip"), r"Invalid indefinite: 'clip'. Supported: \('shift', 'abs'\)."),
    (dict(max_params=0), r"Invalid max_params: 0. Must be >= 1."),
    (dict(hvp_batch_size=0), r"Invalid hvp_batch_size: 0. Must be >= 1."),
]


@pytest.mark.parametrize("kwargs,match", CONFIG_ERRORS)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NewtonConfig(**kwargs)


def test_any_module_is_handled_without_adapters():
    class Scale(nn.Module):  # no capture adapter exists for this module
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.s

    model = nn.Sequential(nn.Linear(4, 3), Scale())
    x, t = torch.randn(6, 4), torch.randn(6, 3)
    gm = make_gradient_maker("newton", model, damping=0.1)
    run_step(gm, model, x, t)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["newton", "hessian_free", "lissa", "curveball"])
def test_intermediate_steps_run_no_second_derivatives(name, monkeypatch):
    # Shared by the four Hessian/GGN methods: between curvature steps the backward pass is the
    # plain loss.backward() (no create_graph) and no product runs.
    model, x, t = tanh_mlp()
    gm = make_gradient_maker(name, model, curvature_upd_interval=3, damping=0.5)
    calls = []
    orig = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(kwargs.get("create_graph", False))
        return orig(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    per_step = []
    for _ in range(4):
        calls.clear()
        run_step(gm, model, x, t, F.cross_entropy)
        per_step.append(len(calls))
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert per_step[0] > 0 and per_step[3] > 0
    assert per_step[1] == per_step[2] == 0


@pytest.mark.parametrize("shape", ["full", "layer_wise"])
def test_frozen_parameter_leaves_the_newton_step_of_the_others_and_keeps_its_curvature(shape):
    # Frozen mid-run: the trained parameters get (H_AA + δI)⁻¹ g_A (the Newton step of the loss
    # as a function of them alone), the frozen rows/columns of the running Hessian are kept
    # (even with zero_grad(set_to_none=False) leaving a zero p.grad behind), and un-freezing
    # returns to the full step.
    model, x, t = tanh_mlp()
    lam = 0.5
    gm = make_gradient_maker("newton", model, damping=lam, hessian_shape=shape)
    run_step(gm, model, x, t, F.cross_entropy)
    before = [b.matrix.clone() for b in gm.blocks]
    model[0].weight.requires_grad_(False)
    h = dense_hessian(model, F.cross_entropy, x, t)  # over the trained parameters only
    g = plain_grad(model, F.cross_entropy, x, t)
    if shape == "layer_wise":  # modules: bias of layer 0 (5), weight and bias of layer 2 (18)
        h = torch.block_diag(h[:5, :5], h[5:, 5:])
    want = torch.linalg.solve(h + lam * torch.eye(len(g)), g)
    model.zero_grad(set_to_none=False)
    model[0].weight.grad = torch.zeros_like(model[0].weight)  # a zeroed buffer left behind
    d = gm.setup_model_call(model, x)
    gm.setup_loss_call(F.cross_entropy, d, t)
    gm.forward_and_backward()
    assert torch.equal(model[0].weight.grad, torch.zeros_like(model[0].weight))
    torch.testing.assert_close(flat_grad(model), want, rtol=1e-9, atol=1e-12)
    frozen = slice(0, 20)  # model[0].weight's coordinates (first in the full / first block)
    for b0, b1 in zip(before[:1], gm.blocks[:1]):
        assert torch.equal(b1.matrix[frozen], b0[frozen])
        assert torch.equal(b1.matrix[:, frozen], b0[:, frozen])
    model[0].weight.requires_grad_(True)
    h = dense_hessian(model, F.cross_entropy, x, t)
    g = plain_grad(model, F.cross_entropy, x, t)
    if shape == "layer_wise":
        h = torch.block_diag(h[:25, :25], h[25:, 25:])
    run_step(gm, model, x, t, F.cross_entropy)
    want = torch.linalg.solve(h + lam * torch.eye(len(g)), g)
    torch.testing.assert_close(flat_grad(model), want, rtol=1e-9, atol=1e-12)


def test_cost_model_adds_the_eigenvalues_of_a_shifted_refresh():
    model, x, t = tanh_mlp()
    gm = make_gradient_maker("newton", model, hessian_shape="layer_wise", damping=1e-3)
    run_step(gm, model, x, t, F.cross_entropy)
    block = gm.blocks[0]
    n = block.matrix.shape[0]
    block.matrix = torch.diag(torch.linspace(-1.0, 1.0, n, dtype=block.matrix.dtype))
    gm.update_preconditioner()
    assert block.shifted and not gm.blocks[1].shifted
    evs = [op.shape for op in gm.cost_model().ops if op.kind == "eigvalsh"]
    assert evs == [(1, n)]
