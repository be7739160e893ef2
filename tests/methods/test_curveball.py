"""CurveBall theorems: the direction converges to the damped Newton (GGN) solution."""

from __future__ import annotations

import math
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


def _dense_operator(inverse, n):
    return torch.stack([inverse.apply(e) for e in torch.eye(n)], dim=1)


def test_amortised_operator_is_spd_and_satisfies_the_exact_secant_pair():
    # The curvature step stores (s, y) = (d, Ĉd), Ĉ = G + λI: check y against the dense GGN
    # oracle, then M = Mᵀ ≻ 0 and M y = s (so M is an inverse of Ĉ along d).
    model, x, t = tanh_mlp()
    lam = 0.1
    gm = make_gradient_maker(
        "curveball", model, damping=lam, adapt_damping=False, curvature_upd_interval=3
    )
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(4):  # curvature steps 0 and 3; the pair of step 3 starts from z ≠ 0
        a = dense_ggn(model, F.cross_entropy, x, t)
        a = a + lam * torch.eye(a.shape[0])
        g = plain_grad(model, F.cross_entropy, x, t)
        z_before = torch.zeros_like(g) if gm.z is None else gm.z.clone()
        run_step(gm, model, x, t, F.cross_entropy)
        opt.step()
    s, y = gm.inverse.s, gm.inverse.y
    torch.testing.assert_close(s, a @ z_before + g)  # d = Ĉz + g at the last curvature step
    torch.testing.assert_close(y, a @ s)
    m = _dense_operator(gm.inverse, g.numel())
    torch.testing.assert_close(m, m.T)
    assert torch.linalg.eigvalsh(0.5 * (m + m.T)).min() > 0
    torch.testing.assert_close(m @ y, s)
    # Its scale off the pair is the measured inverse curvature, within Ĉ's inverse spectrum.
    evals = torch.linalg.eigvalsh(a)
    gamma = float(s @ y / (y @ y))
    assert 1 / float(evals[-1]) <= gamma <= 1 / float(evals[0])


def test_intermediate_steps_write_m_g_and_z_is_the_step_taken(flags):
    model, x, t = tanh_mlp()
    gm = make_gradient_maker("curveball", model, damping=0.1, curvature_upd_interval=3)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    run_step(gm, model, x, t, F.cross_entropy)  # curvature step: the paper's update
    opt.step()
    rho, beta = gm.rho, gm.beta
    for _ in range(2):  # steps in between: M g of the fresh gradient, no momentum
        g = plain_grad(model, F.cross_entropy, x, t)
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        run_step(gm, model, x, t, F.cross_entropy)
        torch.testing.assert_close(flat_grad(model), gm.inverse.apply(g))
        torch.testing.assert_close(gm.z, -gm.inverse.apply(g))
        assert float(g @ gm.z) < 0  # a descent direction
        opt.step()
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(after, before + gm.z)
    assert (gm.rho, gm.beta) == (rho, beta)
    # The next curvature step starts from that z: the paper's update with the dense oracle
    # (with the damping that step adapted first).
    ggn = dense_ggn(model, F.cross_entropy, x, t)
    g = plain_grad(model, F.cross_entropy, x, t)
    z = gm.z.clone()
    run_step(gm, model, x, t, F.cross_entropy)
    a = ggn + gm.damping * torch.eye(z.numel())
    d = a @ z + g
    rho, beta = solve_rho_beta(
        float(z @ a @ z), float(z @ a @ d), float(d @ a @ d), float(g @ z), float(g @ d)
    )
    torch.testing.assert_close(gm.z, rho * z - beta * d)
    torch.testing.assert_close(flat_grad(model), -gm.z)


def test_amortised_steps_stay_finite_and_train_where_heavy_ball_diverged():
    # Regression: MNIST-1D, curvature every 10 steps, damping 1e-3, SGD at lr=1. The former
    # heavy-ball rule between curvature steps reached NaN within 18 steps here.
    pytest.importorskip("mnist1d")
    from precond.data import mnist1d
    from precond.models import MLP
    from precond.training import train_classifier

    torch.set_default_dtype(torch.float32)
    data = mnist1d(num_samples=1500)
    torch.manual_seed(0)
    losses = []
    r = train_classifier(
        "curveball",
        MLP(40, [128, 128], 10),
        data,
        epochs=3,
        batch_size=128,
        lr=1.0,
        momentum=0.0,
        options={"curvature_upd_interval": 10, "damping": 1e-3},
        on_step=lambda _, loss: losses.append(loss),
    )
    assert not r.diverged and r.steps == 27
    assert all(math.isfinite(v) for v in losses)
    assert r.train_loss[-1] < 0.85 * losses[0], (losses[0], r.train_loss)


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
        op for op in make_gradient_maker("curveball", model).cost_model().ops if op.kind == "grad"
    ]
    assert op.shape == (2 * 2,)  # GGN products: two first-order passes each
    gm = make_gradient_maker("curveball", model, curvature="hessian")
    (op,) = [op for op in gm.cost_model().ops if op.kind == "hvp"]
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


def test_non_finite_gradient_between_curvature_steps_keeps_z_without_a_sync(flags):
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


def test_frozen_parameter_keeps_its_part_of_z_and_the_others_follow_the_restricted_update():
    model, x, t = tanh_mlp()
    lam = 0.1
    gm = make_gradient_maker("curveball", model, damping=lam, adapt_damping=False)
    for _ in range(2):  # parameters held fixed: z is a running solve with a frozen part ≠ 0
        run_step(gm, model, x, t, F.cross_entropy)
    z_prev = gm.z.clone()
    model[0].weight.requires_grad_(False)
    a = dense_ggn(model, F.cross_entropy, x, t)  # over the trained parameters only
    a = a + lam * torch.eye(a.shape[0])
    g = plain_grad(model, F.cross_entropy, x, t)
    run_step(gm, model, x, t, F.cross_entropy)
    assert model[0].weight.grad is None
    z = z_prev[20:]  # model[0].weight holds the first 20 coordinates
    d = a @ z + g
    rho, beta = solve_rho_beta(
        float(z @ a @ z), float(z @ a @ d), float(d @ a @ d), float(g @ z), float(g @ d)
    )
    assert torch.equal(gm.z[:20], z_prev[:20])
    torch.testing.assert_close(gm.z[20:], rho * z - beta * d)
    torch.testing.assert_close(flat_grad(model), -gm.z[20:])
    model[0].weight.requires_grad_(True)  # un-frozen: its part of z resumes
    run_step(gm, model, x, t, F.cross_entropy)
    assert torch.isfinite(model[0].weight.grad).all()
    assert not torch.equal(gm.z[:20], z_prev[:20])


def test_intermediate_step_guard_reads_the_gradient_through_the_pair_products(flags):
    # The steps in between flag a non-finite gradient by c = −K Wᵀg: one infinite entry, at a
    # coordinate where s is 0, keeps z. A finite gradient whose −M g overflows leaves z and
    # p.grad finite.
    model, x, t = tanh_mlp()
    gm = make_gradient_maker("curveball", model, damping=0.1, curvature_upd_interval=3)
    run_step(gm, model, x, t, F.cross_entropy)
    assert gm.inverse.ready
    z = gm.z.clone()
    gm.inverse.pair[0, 5] = 0.0
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    params[0].grad.view(-1)[5] = math.inf
    gm._precondition_secant()
    assert torch.equal(gm.z, z)
    torch.testing.assert_close(flat_grad(model), -z, rtol=0, atol=0)
    for p in params:
        p.grad = torch.randn_like(p)
    params[-1].grad.view(-1)[0] = torch.finfo(torch.float64).max
    gm._precondition_secant()
    assert torch.isfinite(gm.z).all() and torch.isfinite(flat_grad(model)).all()


def test_curvature_step_with_a_finite_u_writes_what_the_guarded_path_writes(monkeypatch):
    # uᵀu finite makes every entry of u finite, so the two-pass write (z ← −u, p.grad ← u)
    # must give the guarded path's z and p.grad bit for bit; force the guarded path in a twin.
    from precond.methods.curveball import CurveBallGradientMaker

    def run(guarded: bool):
        model, x, t = tanh_mlp()
        gm = make_gradient_maker("curveball", model, damping=0.1)
        if guarded:
            orig = CurveBallGradientMaker.update_curvature

            def update(self, stats):
                orig(self, stats)
                self._u_finite = False

            monkeypatch.setattr(gm, "update_curvature", update.__get__(gm))
        out = []
        for _ in range(3):
            run_step(gm, model, x, t, F.cross_entropy)
            out.append((gm.z.clone(), flat_grad(model)))
        return out

    for (z_fast, g_fast), (z_ref, g_ref) in zip(run(False), run(True)):
        assert torch.equal(z_fast, z_ref) and torch.equal(g_fast, g_ref)
        assert torch.equal(g_fast, -z_fast)
