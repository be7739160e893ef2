"""LiSSA theorems: the recursion is the truncated Neumann series and converges to the solve."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import dense_ggn, flat_grad
from tests.methods._second_order_cases import (
    dense_hessian,
    plain_grad,
    regression,
    run_step,
    tanh_mlp,
)

from precond import NumericalWarning, make_gradient_maker
from precond.methods.lissa import LissaConfig
from precond.methods.probes import rademacher_like


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_recursion_is_the_neumann_series_and_converges_to_the_damped_solve(curvature):
    model, x, t = regression()
    lam = 0.2
    h = dense_hessian(model, F.mse_loss, x, t)
    g = plain_grad(model, F.mse_loss, x, t)
    a = h + lam * torch.eye(len(g))
    evals = torch.linalg.eigvalsh(a)
    s = 1.0 / float(evals[-1])
    want = torch.linalg.solve(a, g)
    errors = []
    for depth in (1, 4, 16, 64, 256):
        gm = make_gradient_maker(
            "lissa", model, curvature=curvature, damping=lam, scale=s, depth=depth
        )
        run_step(gm, model, x, t)
        got = flat_grad(model)
        step = torch.eye(len(g)) - s * a
        series = s * sum(torch.linalg.matrix_power(step, k) @ g for k in range(depth + 1))
        torch.testing.assert_close(got, series, rtol=1e-10, atol=1e-12)
        errors.append(float((got - want).norm()))
        # The error is exactly −(I − sA)^{J+1} A⁻¹ g.
        bound = (1 - s * float(evals[0])) ** (depth + 1) * float(want.norm())
        assert errors[-1] <= bound * (1 + 1e-9) + 1e-13 * float(want.norm())
    assert all(e2 < e1 for e1, e2 in pairwise(errors)), errors
    assert errors[-1] <= 1e-8 * float(want.norm())


def test_automatic_scale_is_inverse_of_the_power_iteration_estimate():
    model, x, t = regression()
    lam = 0.2
    a = dense_hessian(model, F.mse_loss, x, t) + lam * torch.eye(10)
    top = float(torch.linalg.eigvalsh(a)[-1])
    gm = make_gradient_maker("lissa", model, damping=lam, power_iters=30, depth=200)
    run_step(gm, model, x, t)
    assert 1.0 / top * (1 - 1e-12) <= gm.last_scale <= 1.0 / (0.99 * top)
    g = plain_grad(model, F.mse_loss, x, t)
    gm2 = make_gradient_maker("lissa", model, damping=lam, power_iters=30, depth=200)
    run_step(gm2, model, x, t)
    torch.testing.assert_close(flat_grad(model), torch.linalg.solve(a, g), rtol=1e-6, atol=1e-8)


def test_sampled_products_are_hessians_of_the_subsampled_loss():
    model, x, t = regression(n=12)
    gm = make_gradient_maker("lissa", model)
    out = {}

    def grab(stats):
        batch = gm.batch
        v = torch.randn(batch.vec.numel)
        w = torch.zeros(12)
        w[[1, 4, 7]] = 4.0
        out["full"] = batch.product(gm.config.curvature, v, torch.ones(12))
        out["hvp"] = batch.hvp(v)
        out["sub"] = batch.sampled_hvp(v, w)
        out["sub_ggn"] = batch.ggn(v, w)
        out["v"] = v

    gm.update_curvature = grab
    run_step(gm, model, x, t)
    idx = [1, 4, 7]
    # mean-reduced MSE on the subset, re-weighted by N / k = 4: same normalisation as the batch
    h_sub = dense_hessian(model, lambda y, tt: F.mse_loss(y[idx], tt[idx]) * 3 / 12 * 4, x, t)
    torch.testing.assert_close(out["full"], out["hvp"])
    torch.testing.assert_close(out["sub"], h_sub @ out["v"])
    torch.testing.assert_close(out["sub_ggn"], h_sub @ out["v"])  # linear model: GGN = H


def test_repetitions_with_sampling_are_reproducible_and_seeded():
    model, x, t = tanh_mlp()
    opts = dict(damping=0.5, depth=5, num_repetitions=3, sample_fraction=0.5)

    def direction(seed):
        gm = make_gradient_maker("lissa", model, seed=seed, **opts)
        run_step(gm, model, x, t, F.cross_entropy)
        return flat_grad(model)

    torch.testing.assert_close(direction(1), direction(1), rtol=0, atol=0)
    assert not torch.allclose(direction(1), direction(2))


def test_sampled_estimate_is_unbiased_for_depth_one():
    # X_1 = 2g − s A_1 g is linear in the sample, so its mean over all subsets is exact.
    model, x, t = regression(n=8)
    lam, s = 0.3, 0.5
    g = plain_grad(model, F.mse_loss, x, t)
    a = dense_hessian(model, F.mse_loss, x, t) + lam * torch.eye(len(g))
    want = s * (2 * g - s * a @ g)
    got = torch.zeros_like(g)
    n = 400
    gm = make_gradient_maker(
        "lissa",
        model,
        damping=lam,
        scale=s,
        depth=1,
        num_repetitions=n,
        sample_fraction=0.5,
        seed=0,
    )
    run_step(gm, model, x, t)
    got = flat_grad(model)
    assert float((got - want).norm()) < 0.1 * float(want.norm())


def test_divergent_series_is_rejected():
    model, x, t = tanh_mlp(seed=1)
    h = dense_hessian(model, F.cross_entropy, x, t)
    assert torch.linalg.eigvalsh(h)[0] < -1e-3  # indefinite: the series diverges
    g = plain_grad(model, F.cross_entropy, x, t)
    gm = make_gradient_maker("lissa", model, curvature="hessian", damping=1e-4, depth=60)
    with pytest.warns(NumericalWarning, match="LiSSA: the Neumann estimate"):
        run_step(gm, model, x, t, F.cross_entropy)
    assert gm.diverged
    torch.testing.assert_close(flat_grad(model), g)  # plain gradient, nothing stored


def test_intermediate_steps_apply_the_stored_inverse_action():
    from precond.methods.second_order import SecantInverse

    model, x, t = tanh_mlp()
    gm = make_gradient_maker("lissa", model, damping=0.5, curvature_upd_interval=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run_step(gm, model, x, t, F.cross_entropy)
    x0, g0 = gm.solution.clone(), gm.rhs.clone()
    torch.testing.assert_close(flat_grad(model), x0)
    opt.step()
    g1 = plain_grad(model, F.cross_entropy, x, t)
    run_step(gm, model, x, t, F.cross_entropy)
    ref = SecantInverse()
    ref.set(x0, g0)
    torch.testing.assert_close(flat_grad(model), ref.apply(g1))


def test_cost_model_counts_products():
    model, _, _ = tanh_mlp()
    gm = make_gradient_maker("lissa", model, depth=7, num_repetitions=2, sample_fraction=0.5)
    (op,) = [op for op in gm.cost_model().ops if op.kind == "grad"]
    assert op.shape == (2 * (7 * 2 + 10),)  # GGN products: two first-order passes each
    gm = make_gradient_maker("lissa", model, curvature="hessian", depth=7)
    (op,) = [op for op in gm.cost_model().ops if op.kind == "hvp"]
    assert op.shape == (7 + 10,)


def _textbook_scale(gm, batch, g, iters):
    """1/μ̂ of the textbook power iteration (normalise by a fresh norm every iteration)."""
    a = rademacher_like([g], gm.generator)[0].clone()  # the start: random signs
    mu = 0.0
    for _ in range(iters):
        a = a / a.norm()
        b = gm._matvec(batch, a, out=torch.empty_like(a))
        mu = max(mu, float(b.norm()))
        a = b
    return 1.0 / mu


@pytest.mark.parametrize("damping", [1e-3, 1e9])
def test_power_iteration_matches_the_normalised_loop(damping):
    """Unnormalised iterates give the textbook estimate; at λ = 1e9 (in float32) their norm
    passes 1e12 after two iterations and is rescaled (without it, it would overflow by the
    fifth)."""
    model, x, t = tanh_mlp()
    if damping > 1.0:
        model, x = model.float(), x.float()
    gm = make_gradient_maker("lissa", model, power_iters=8, damping=damping)
    seen = []
    orig = gm.estimate_scale

    def spy(batch, g):
        state = gm.generator.get_state()
        s = orig(batch, g)
        gm.generator.set_state(state)
        seen.append((s, _textbook_scale(gm, batch, g, 8)))
        return s

    gm.estimate_scale = spy
    run_step(gm, model, x, t, F.cross_entropy)
    ((s, ref),) = seen
    assert s == pytest.approx(ref, rel=1e-6)
    if damping > 1.0:
        assert s == pytest.approx(1.0 / damping, rel=1e-6)  # A ≈ λI


def test_ggn_default_matches_dense_ggn_solve():
    model, x, t = tanh_mlp()
    lam = 0.5
    a = dense_ggn(model, F.cross_entropy, x, t) + lam * torch.eye(43)
    g = plain_grad(model, F.cross_entropy, x, t)
    gm = make_gradient_maker("lissa", model, damping=lam, depth=300, power_iters=20)
    run_step(gm, model, x, t, F.cross_entropy)
    torch.testing.assert_close(flat_grad(model), torch.linalg.solve(a, g), rtol=1e-6, atol=1e-8)


CONFIG_ERRORS = [
    (
        dict(curvature="fisher_emp"),
        r"Invalid curvature: 'fisher_emp'. Supported: \('ggn', 'hessian'\).",
    ),
    (dict(depth=0), r"Invalid depth: 0. Must be >= 1."),
    (dict(num_repetitions=0), r"Invalid num_repetitions: 0. Must be >= 1."),
    (
        dict(num_repetitions=2),
        r"Invalid num_repetitions: 2. Repetitions differ only with sampled curvature; set sample_fraction < 1.",
    ),
    (dict(scale=0.0), r"Invalid scale: 0.0. Must be > 0.0."),
    (dict(power_iters=0), r"Invalid power_iters: 0. Must be >= 1."),
    (dict(sample_fraction=0.0), r"Invalid sample_fraction: 0.0. Must be > 0.0 and <= 1.0."),
]


@pytest.mark.parametrize("kwargs,match", CONFIG_ERRORS)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LissaConfig(**kwargs)


@pytest.mark.parametrize("scale", [0.5, None])
def test_frozen_parameter_recursion_is_the_neumann_series_over_the_trained_parameters(scale):
    model, x, t = tanh_mlp()
    lam, depth = 0.5, 6
    gm = make_gradient_maker("lissa", model, damping=lam, depth=depth, scale=scale)
    run_step(gm, model, x, t, F.cross_entropy)
    model[0].weight.requires_grad_(False)
    a = dense_ggn(model, F.cross_entropy, x, t)  # over the trained parameters only
    a = a + lam * torch.eye(a.shape[0])
    g = plain_grad(model, F.cross_entropy, x, t)
    run_step(gm, model, x, t, F.cross_entropy)
    assert model[0].weight.grad is None
    s = gm.last_scale
    if scale is None:  # power iteration on A restricted: never above its largest eigenvalue
        assert 1.0 / s <= float(torch.linalg.eigvalsh(a)[-1]) * (1 + 1e-9)
    step = torch.eye(len(g)) - s * a
    series = s * sum(torch.linalg.matrix_power(step, k) @ g for k in range(depth + 1))
    torch.testing.assert_close(flat_grad(model), series, rtol=1e-10, atol=1e-12)
    assert torch.equal(gm.solution[:20], torch.zeros(20))
