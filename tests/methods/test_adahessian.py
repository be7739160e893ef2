"""AdaHessian theorems: Hutchinson's diagonal converges to the exact one; the update is the paper's."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

from precond import make_gradient_maker
from precond.methods.adahessian import AdaHessianConfig, block_average
from precond.methods.probes import (
    hutchinson_diagonal,
    hvp_with_probes,
    rademacher_like,
    split_grads,
)


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def dense_hessian(model, loss_fn):
    """Hessian of ``loss_fn(params)`` w.r.t. the flattened parameters (torch.func)."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(theta):
        parts = torch.split(theta, sizes)
        params = {n: t.view(s) for n, t, s in zip(names, parts, shapes)}
        return loss_fn(lambda x: functional_call(model, params, (x,)))

    return hessian(f)(flat)


def test_hutchinson_diagonal_converges_at_the_monte_carlo_rate():
    model = _model()
    x, t = torch.randn(8, 3), torch.randn(8, 2)
    h = dense_hessian(model, lambda fn: F.mse_loss(fn(x), t))
    exact = h.diagonal()
    offdiag = (h - torch.diag(exact)).norm()  # E‖error‖² = ‖offdiag(H)‖²_F / n
    params = list(model.parameters())
    loss = F.mse_loss(model(x), t)
    grads = split_grads(loss, params, create_graph=True)
    gen = torch.Generator().manual_seed(0)
    total = torch.zeros_like(exact)
    errors = {}
    for n in range(1, 513):
        z = rademacher_like(params, gen)
        est = hutchinson_diagonal(grads, params, z, retain_graph=True)
        total += torch.cat([e.reshape(-1) for e in est])
        if n in (8, 64, 512):
            errors[n] = float((total / n - exact).norm())
    assert errors[8] > errors[64] > errors[512]
    for n, err in errors.items():
        assert 0.5 < err * math.sqrt(n) / float(offdiag) < 2.0, (n, err, float(offdiag))


def test_unsigned_samples_square_to_the_signed_ones():
    model = _model()
    x, t = torch.randn(8, 3), torch.randn(8, 2)
    params = list(model.parameters())
    grads = split_grads(F.mse_loss(model(x), t), params, create_graph=True)
    z = rademacher_like(params, torch.Generator().manual_seed(3))
    signed = hutchinson_diagonal(grads, params, z, retain_graph=True)
    mixed = [True, False, True, False]
    bare = hutchinson_diagonal(grads, params, z, unsigned=mixed)
    for s, b, z_i, flag in zip(signed, bare, z, mixed):
        if flag:
            assert torch.equal(b * b, s * s)
            assert torch.equal(b * z_i, s)
        else:
            assert torch.equal(b, s)


def test_unsigned_sample_of_an_identity_block_is_not_the_probe():
    # H = I, with a gradient that is a view of the parameter (the gradient of ½‖p‖²): autograd
    # hands back the probe itself, and a sample must still be a tensor of its own
    p = torch.randn(5, requires_grad=True)
    z = rademacher_like([p], torch.Generator().manual_seed(0))
    (h,) = hvp_with_probes([p.view(5)], [p], z)
    assert h is not None and h.untyped_storage().data_ptr() == z[0].untyped_storage().data_ptr()
    for unsigned in ([True], [False]):
        (est,) = hutchinson_diagonal([p.view(5)], [p], z, unsigned=unsigned)
        assert est.untyped_storage().data_ptr() != z[0].untyped_storage().data_ptr()
        torch.testing.assert_close(est, z[0] if unsigned[0] else torch.ones(5))


def test_only_unsmoothed_parameters_are_folded_unsigned():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2))
    gm = make_gradient_maker("adahessian", model)
    assert [gm._unsmoothed(p) for p in model.parameters()] == [False, True, True, True]
    gm = make_gradient_maker("adahessian", model, spatial_average=False, block_size=2)
    assert [gm._unsmoothed(p) for p in model.parameters()] == [False, False, False, False]
    gm = make_gradient_maker("adahessian", model, spatial_average=False)
    assert [gm._unsmoothed(p) for p in model.parameters()] == [True, True, True, True]


def test_block_and_spatial_averaging():
    d = torch.arange(10.0)
    torch.testing.assert_close(
        block_average(d, 4, spatial=True),
        torch.tensor([1.5, 1.5, 1.5, 1.5, 5.5, 5.5, 5.5, 5.5, 8.5, 8.5]),
    )
    kernel = torch.randn(3, 2, 3, 3)
    avg = block_average(kernel, 1, spatial=True)
    torch.testing.assert_close(avg, kernel.mean(dim=(2, 3), keepdim=True).expand_as(kernel))
    assert block_average(kernel, 1, spatial=False) is kernel


def _reference_run(model, batches, cfg, seed, lr):
    """AdaHessian written out from the paper with dense Hessians (the oracle)."""
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    n_hess = 0
    for step, (x, t) in enumerate(batches):
        loss = F.mse_loss(model(x), t)
        grads = torch.autograd.grad(loss, params)
        if step % cfg["interval"] == 0:
            h = dense_hessian(model, lambda fn, x=x, t=t: F.mse_loss(fn(x), t))
            z = rademacher_like(params, gen)
            z_flat = torch.cat([zi.reshape(-1) for zi in z])
            d = z_flat * (h @ z_flat)
            parts = torch.split(d, [p.numel() for p in params])
            b = cfg["block"]
            for i, (p, di) in enumerate(zip(params, parts)):
                di = di.reshape(-1, b).mean(dim=1).repeat_interleave(b).view(p.shape)
                v[i] = cfg["beta2"] * v[i] + (1 - cfg["beta2"]) * di * di
            n_hess += 1
        with torch.no_grad():
            for i, p in enumerate(params):
                m[i] = cfg["beta1"] * m[i] + (1 - cfg["beta1"]) * grads[i]
                mhat = m[i] / (1 - cfg["beta1"] ** (step + 1))
                vhat = v[i] / (1 - cfg["beta2"] ** n_hess)
                p -= lr * mhat / (vhat.sqrt() ** cfg["k"] + cfg["eps"])


@pytest.mark.parametrize("block", [1, 2])
def test_update_equals_the_paper_with_delayed_hessian_updates(block):
    # block 1: the sample is folded in as H z (its square is that of z ⊙ H z)
    torch.manual_seed(1)
    batches = [(torch.randn(6, 3), torch.randn(6, 2)) for _ in range(5)]
    cfg = dict(beta1=0.8, beta2=0.9, k=0.5, eps=1e-3, block=block, interval=2)
    ref = _model()
    _reference_run(ref, batches, cfg, seed=7, lr=0.05)

    model = _model()
    gm = make_gradient_maker(
        "adahessian",
        model,
        momentum=cfg["beta1"],
        ema_decay=cfg["beta2"],
        hessian_power=cfg["k"],
        damping=cfg["eps"],
        block_size=cfg["block"],
        curvature_upd_interval=cfg["interval"],
        seed=7,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, t in batches:
        opt.zero_grad()
        d = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.mse_loss, d, t)
        gm.forward_and_backward()
        opt.step()
    assert gm.num_curvature_updates == 3
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_conv_kernels_are_spatially_averaged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2))
    gm = make_gradient_maker("adahessian", model, ema_decay=0.0)
    d = gm.setup_model_call(model, torch.randn(4, 2, 4, 4))
    gm.setup_loss_call(F.cross_entropy, d, torch.randint(0, 2, (4,)))
    gm.forward_and_backward()
    kernel_stat = gm.curvature[0]
    assert kernel_stat.shape == (3, 2, 3, 3)
    torch.testing.assert_close(kernel_stat, kernel_stat[..., :1, :1].expand_as(kernel_stat))
    assert gm.cost_model().state_numel == 3 * sum(p.numel() for p in model.parameters())


def test_cost_model_declares_the_gradient_graph():
    # The double backward keeps the graph of the gradient: with a hidden tanh layer its
    # backward saves (at least) the hidden layer's output gradient, [N, 5] elements.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    gm = make_gradient_maker("adahessian", model)
    before = gm.cost_model().transient_numel
    d = gm.setup_model_call(model, torch.randn(7, 3))
    gm.setup_loss_call(F.cross_entropy, d, torch.randint(0, 2, (7,)))
    gm.forward_and_backward()
    assert gm.graph_numel >= 7 * 5
    assert gm.cost_model().transient_numel == before + gm.graph_numel


CONFIG_ERRORS = [
    (dict(momentum=1.0), r"Invalid momentum: 1.0. Must be >= 0.0 and < 1.0."),
    (dict(ema_decay=-0.1), r"Invalid ema_decay: -0.1. Must be >= 0.0 and < 1.0."),
    (dict(hessian_power=0.0), r"Invalid hessian_power: 0.0. Must be > 0.0 and <= 1.0."),
    (dict(hessian_power=2.0), r"Invalid hessian_power: 2.0. Must be > 0.0 and <= 1.0."),
    (dict(spatial_average="yes"), r"Invalid spatial_average: 'yes'. Must be True or False."),
    (dict(block_size=0), r"Invalid block_size: 0. Must be >= 1."),
    (dict(n_probes=0), r"Invalid n_probes: 0. Must be >= 1."),
    (dict(damping=-1.0), r"Invalid damping: -1.0. Must be >= 0.0."),
]


@pytest.mark.parametrize("kwargs,match", CONFIG_ERRORS)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaHessianConfig(**kwargs)


def _nan_step_keeps_state(name, match, **options):
    """Shared by AdaHessian and Sophia: a NaN batch leaves the moments and curvature alone."""
    from precond import NumericalWarning

    model = _model()
    gm = make_gradient_maker(name, model, **options)
    x, t = torch.randn(6, model[0].in_features), torch.randint(0, model[-1].out_features, (6,))

    def step(inp):
        model.zero_grad()
        d = gm.setup_model_call(model, inp)
        gm.setup_loss_call(F.cross_entropy, d, t)
        gm.forward_and_backward()

    step(x)
    before = gm.preconditioner_state_dict()
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.warns(NumericalWarning, match=match):
        step(bad)
    after = gm.preconditioner_state_dict()
    for key in ("exp_avg", "curvature", "denominator"):
        assert all(torch.equal(a, b) for a, b in zip(before[key], after[key])), key
    assert after["num_curvature_updates"] == before["num_curvature_updates"]
    step(x)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    return gm


def test_non_finite_gradient_leaves_moments_and_curvature_unchanged():
    _nan_step_keeps_state("adahessian", "AdaHessian: non-finite curvature estimate")


def test_first_moment_guard_needs_no_curvature_step(flags):
    # Between curvature steps only the device-side guard protects the first moment.
    model = _model()
    gm = make_gradient_maker("adahessian", model, curvature_upd_interval=5)
    x, t = torch.randn(6, 3), torch.randint(0, 2, (6,))
    model.zero_grad()
    d = gm.setup_model_call(model, x)
    gm.setup_loss_call(F.cross_entropy, d, t)
    gm.forward_and_backward()
    moments = [m.clone() for m in gm.exp_avg]
    grads = [torch.randn_like(p) for p in model.parameters()]
    grads[0][0, 0] = float("nan")
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()  # precondition() overwrites p.grad
    gm.precondition()  # a step without curvature work
    assert torch.equal(gm.exp_avg[0], moments[0])
    beta = gm.config.momentum
    for m_old, m_new, g in zip(moments[1:], gm.exp_avg[1:], grads[1:]):
        torch.testing.assert_close(m_new, beta * m_old + (1 - beta) * g)


@pytest.mark.parametrize("name", ["adahessian", "sophia"])
def test_frozen_parameter_keeps_its_state_and_gets_no_gradient(name):
    # The element-wise skeleton (AdaHessian and Sophia): a parameter frozen mid-run is not
    # differentiated, its moment, curvature and denominator are kept (even when a zeroed
    # p.grad is left behind), and un-freezing resumes them.
    model = _model()
    gm = make_gradient_maker(name, model, curvature_upd_interval=1)
    x, t = torch.randn(6, 3), torch.randint(0, 2, (6,))

    def step(set_to_none=True):
        model.zero_grad(set_to_none=set_to_none)
        d = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, d, t)
        gm.forward_and_backward()

    step()
    frozen = model[0].weight
    i = [id(p) for p in gm.precond_params].index(id(frozen))
    kept = {k: getattr(gm, k)[i].clone() for k in ("exp_avg", "curvature", "denominator")}
    others = [m.clone() for j, m in enumerate(gm.exp_avg) if j != i]
    frozen.requires_grad_(False)
    frozen.grad = torch.zeros_like(frozen)
    for _ in range(2):
        step(set_to_none=False)
        assert torch.equal(frozen.grad, torch.zeros_like(frozen))
        for p in gm.precond_params[1:]:
            assert torch.isfinite(p.grad).all()
    for k, v in kept.items():
        assert torch.equal(getattr(gm, k)[i], v), k
    assert not any(torch.equal(a, m) for a, m in zip(others, (gm.exp_avg[j] for j in (1, 2, 3))))
    frozen.requires_grad_(True)
    step()
    assert torch.isfinite(frozen.grad).all()
    assert not torch.equal(gm.exp_avg[i], kept["exp_avg"])
    # Its bias corrections count only the steps it was trained.
    assert (gm.num_steps, gm.param_steps[i]) == (4, 2)
    assert (gm.num_curvature_updates, gm.param_curvature_updates[i]) == (4, 2)
