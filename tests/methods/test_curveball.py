"""CurveBall theorems: the direction converges to the damped Newton (GGN) solution."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import dense_ggn, flat_grad
from tests.methods._second_order_cases import plain_grad, regression, run_step, tanh_mlp

from precond import make_gradient_maker
from precond.methods.curveball import CurveBallConfig, solve_rho_beta


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("case", ["regression", "mlp"])
def test_direction_converges_to_damped_newton_on_a_fixed_quadratic(case):
    # Parameters held fixed (no optimizer step): every iteration sees the same quadratic model
    # f̂(z) = gᵀz + ½ zᵀ(G + λI)z, whose minimiser is the damped Newton direction.
    if case == "regression":
        model, x, t = regression()
        loss_fn = F.mse_loss
    else:
        model, x, t = tanh_mlp()
        loss_fn = F.cross_entropy
    lam = 0.05
    a = dense_ggn(model, loss_fn, x, t) + lam * torch.eye(
        sum(p.numel() for p in model.parameters())
    )
    g = plain_grad(model, loss_fn, x, t)
    want = -torch.linalg.solve(a, g)
    gm = make_gradient_maker("curveball", model, damping=lam, adapt_damping=False)
    errors = []
    for _ in range(120):
        run_step(gm, model, x, t, loss_fn)
        errors.append(float((gm.z - want) @ a @ (gm.z - want)) ** 0.5)
        torch.testing.assert_close(flat_grad(model), -gm.z)
    # The automatic ρ, β minimise f̂ over a plane containing the previous iterate: f̂ never
    # increases, i.e. the A-norm error is monotone.
    assert all(e2 <= e1 * (1 + 1e-9) + 1e-14 for e1, e2 in pairwise(errors))
    assert errors[-1] <= 1e-8 * errors[0]
    torch.testing.assert_close(gm.z, want, rtol=1e-7, atol=1e-9)


def test_rho_beta_minimise_the_model_on_the_plane():
    torch.manual_seed(0)
    q = torch.randn(5, 5)
    a = q @ q.T + 0.1 * torch.eye(5)
    g, z = torch.randn(5), torch.randn(5)
    d = a @ z + g
    rho, beta = solve_rho_beta(
        float(z @ a @ z), float(z @ a @ d), float(d @ a @ d), float(g @ z), float(g @ d)
    )
    new = rho * z - beta * d
    grad = a @ new + g  # model gradient at the new point is orthogonal to the plane
    assert abs(float(grad @ z)) < 1e-10 and abs(float(grad @ d)) < 1e-10
    # z = 0: the 1-D line search along d = g
    rho0, beta0 = solve_rho_beta(0.0, 0.0, float(g @ a @ g), 0.0, float(g @ g))
    assert rho0 == 0.0 and beta0 == pytest.approx(float(g @ g) / float(g @ a @ g))
    assert solve_rho_beta(1.0, 0.0, -1.0, 0.0, 1.0) is None


def test_sgd_with_lr_one_applies_the_paper_update():
    model, x, t = tanh_mlp()
    gm = make_gradient_maker("curveball", model, damping=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(3):
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        run_step(gm, model, x, t, F.cross_entropy)
        opt.step()
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(after, before + gm.z)


def test_intermediate_steps_are_heavy_ball_with_the_stored_rho_beta():
    model, x, t = tanh_mlp()
    gm = make_gradient_maker("curveball", model, damping=0.1, curvature_upd_interval=3)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    run_step(gm, model, x, t, F.cross_entropy)
    opt.step()
    z0, rho, beta = gm.z.clone(), gm.rho, gm.beta
    g1 = plain_grad(model, F.cross_entropy, x, t)
    run_step(gm, model, x, t, F.cross_entropy)
    torch.testing.assert_close(flat_grad(model), -(rho * z0 - beta * g1))
    assert (gm.rho, gm.beta) == (rho, beta)


def test_damping_ratio_matches_the_exact_quadratic():
    # Linear regression with MSE: the loss change of the step z is exactly gᵀz + ½ zᵀHz (H = G)
    # while the paper's damped model predicts gᵀz + ½ zᵀ(H + λI)z.
    from tests.methods._second_order_cases import dense_hessian

    model, x, t = regression()
    gm = make_gradient_maker("curveball", model, damping=1.0, damping_growth=2.0)
    h = dense_hessian(model, F.mse_loss, x, t)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ratios, expected = [], []
    orig = gm.lm.observe
    gm.lm.observe = lambda *a: ratios.append(orig(*a)) or ratios[-1]
    for _ in range(4):
        g = plain_grad(model, F.mse_loss, x, t)
        run_step(gm, model, x, t)
        z, lam = gm.z, gm.damping
        actual = g @ z + 0.5 * z @ h @ z
        expected.append(float(actual / (actual + 0.5 * lam * z @ z)))
        opt.step()
    assert ratios == [pytest.approx(r, rel=1e-8) for r in expected[:3]]
    lam = 1.0
    for r in ratios:
        lam = lam * 2.0 if r < 0.5 else (lam / 2.0 if r > 1.5 else lam)
    assert gm.damping == pytest.approx(lam)


def test_cost_model_two_products_per_curvature_step():
    model, _, _ = tanh_mlp()
    (op,) = [
        op for op in make_gradient_maker("curveball", model).cost_model().ops if op.kind == "hvp"
    ]
    assert op.shape == (2,)


CONFIG_ERRORS = [
    (
        dict(curvature="fisher_mc"),
        r"Invalid curvature: 'fisher_mc'. Supported: \('ggn', 'hessian'\).",
    ),
    (dict(adapt_damping="yes"), r"Invalid adapt_damping: 'yes'. Must be True or False."),
    (dict(damping_growth=0.5), r"Invalid damping_growth: 0.5. Must be > 1.0."),
    (dict(damping=0.0), r"Invalid damping: 0.0. adapt_damping=True scales the damping"),
]


@pytest.mark.parametrize("kwargs,match", CONFIG_ERRORS)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CurveBallConfig(**kwargs)


def test_hessian_mode_runs_on_an_indefinite_problem():
    model, x, t = tanh_mlp(seed=1)
    gm = make_gradient_maker("curveball", model, curvature="hessian", damping=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(5):
        run_step(gm, model, x, t, F.cross_entropy)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()


def _nan_batch(x):
    bad = x.clone()
    bad[0, 0] = float("nan")
    return bad


def test_non_finite_curvature_step_keeps_z_rho_beta_and_damping_and_warns():
    from precond import NumericalWarning

    model, x, t = tanh_mlp()
    gm = make_gradient_maker("curveball", model, damping=0.1)
    run_step(gm, model, x, t, F.cross_entropy)
    run_step(gm, model, x, t, F.cross_entropy)
    z, rho, beta, lam = gm.z.clone(), gm.rho, gm.beta, gm.damping
    with pytest.warns(NumericalWarning, match="CurveBall: non-finite loss, gradient or curvature"):
        run_step(gm, model, _nan_batch(x), t, F.cross_entropy)
    assert torch.equal(gm.z, z)
    assert (gm.rho, gm.beta, gm.damping) == (rho, beta, lam)
    assert gm.lm.record is None  # the next ratio is not measured against a NaN loss
    torch.testing.assert_close(flat_grad(model), -z, rtol=0, atol=0)  # the previous step
    run_step(gm, model, x, t, F.cross_entropy)
    assert torch.isfinite(gm.z).all()


def test_non_finite_gradient_between_curvature_steps_keeps_z_without_a_sync():
    # Intermediate steps have no host check: the device-side guard alone keeps z.
    import warnings

    model, x, t = tanh_mlp()
    gm = make_gradient_maker("curveball", model, damping=0.1, curvature_upd_interval=3)
    run_step(gm, model, x, t, F.cross_entropy)
    z = gm.z.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_step(gm, model, _nan_batch(x), t, F.cross_entropy)
    assert torch.equal(gm.z, z)
    run_step(gm, model, x, t, F.cross_entropy)
    assert torch.isfinite(gm.z).all()
