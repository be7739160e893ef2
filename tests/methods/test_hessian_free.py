"""Hessian-free theorems: CG converges to the damped Newton (GGN) direction; amortisation."""

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

from precond import make_gradient_maker
from precond.curvature import products
from precond.methods.hessian_free import HessianFreeConfig
from precond.methods.second_order import DampingAdapter, SecantInverse


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _direction(model, x, t, loss_fn, **options):
    gm = make_gradient_maker("hessian_free", model, **options)
    run_step(gm, model, x, t, loss_fn)
    return flat_grad(model), gm


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_cg_converges_to_the_damped_newton_direction(curvature):
    model, x, t = tanh_mlp()
    lam = 0.05 if curvature == "ggn" else 2.0  # the Hessian needs damping to be PD here
    c = (dense_ggn if curvature == "ggn" else dense_hessian)(model, F.cross_entropy, x, t)
    g = plain_grad(model, F.cross_entropy, x, t)
    a = c + lam * torch.eye(len(g))
    assert torch.linalg.eigvalsh(a)[0] > 0
    want = torch.linalg.solve(a, g)
    errors = []
    for iters in (1, 2, 4, 8, 16, 64):
        got, gm = _direction(
            model,
            x,
            t,
            F.cross_entropy,
            curvature=curvature,
            damping=lam,
            cg_max_iters=iters,
            cg_tol=0.0,
            adapt_damping=False,
            warm_start_decay=0.0,
        )
        # CG minimises the A-norm error over growing Krylov spaces: monotone decrease.
        errors.append(float((got - want) @ a @ (got - want)) ** 0.5)
    assert all(e2 <= e1 * (1 + 1e-9) for e1, e2 in pairwise(errors)), errors
    assert errors[0] > 1e-2 * float(want.norm())
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_ggn_products_equal_ggn_vp_and_the_dense_ggn():
    model, x, t = tanh_mlp()
    gm = make_gradient_maker("hessian_free", model)
    seen = {}

    def grab(stats):
        batch = gm.batch
        v = torch.randn(batch.vec.numel)
        loss = batch.loss
        z = gm.loss_inputs().logits
        seen["ours"] = batch.ggn(v)
        seen["ref"] = torch.cat(
            [u.reshape(-1) for u in products.ggn_vp(loss, z, batch.params, batch.vec.unflatten(v))]
        )
        seen["v"] = v

    gm.update_curvature = grab
    run_step(gm, model, x, t, F.cross_entropy)
    torch.testing.assert_close(seen["ours"], seen["ref"])
    torch.testing.assert_close(seen["ours"], dense_ggn(model, F.cross_entropy, x, t) @ seen["v"])


def test_warm_start_reuses_the_previous_solution():
    model, x, t = tanh_mlp()
    opts = dict(damping=0.05, cg_tol=1e-8, adapt_damping=False, curvature_upd_interval=1)
    gm = make_gradient_maker("hessian_free", model, warm_start_decay=1.0, **opts)
    cold = make_gradient_maker("hessian_free", model, warm_start_decay=0.0, **opts)
    run_step(gm, model, x, t, F.cross_entropy)
    first = gm.last_cg_iters
    run_step(gm, model, x, t, F.cross_entropy)  # same batch, same parameters
    run_step(cold, model, x, t, F.cross_entropy)
    run_step(cold, model, x, t, F.cross_entropy)
    assert first > 3 and cold.last_cg_iters == first
    assert gm.last_cg_iters <= 1  # started at the solution already


def test_secant_inverse_is_spd_and_maps_g_to_x():
    torch.manual_seed(0)
    q = torch.randn(6, 6)
    a = q @ q.T + 0.1 * torch.eye(6)
    g = torch.randn(6)
    x = torch.linalg.solve(a, g)
    op = SecantInverse()
    assert SecantInverse.acceptable(x, g)
    op.set(x, g)
    m = torch.stack([op.apply(e) for e in torch.eye(6)], dim=1)
    torch.testing.assert_close(m, m.T)
    assert torch.linalg.eigvalsh(m)[0] > 0
    torch.testing.assert_close(op.apply(g), x)
    assert not SecantInverse.acceptable(-x, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_secant_inverse_applied_to_grads_in_place_is_m_g(dtype):
    # Parameters above and below ROW_PASS_MIN (row-by-row passes and matrix-vector products),
    # a frozen one and one without a gradient: p.grad ← scale · M g, the rest untouched.
    from precond.methods.flat import ParamVector
    from precond.methods.secant import ROW_PASS_MIN

    torch.manual_seed(0)
    shapes = [(ROW_PASS_MIN // 16 + 3, 16), (7,), (3, 5), (ROW_PASS_MIN + 1,)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    params[2].requires_grad_(False)
    vec = ParamVector(params)
    grads = [torch.randn(s, dtype=dtype) for s in shapes]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    params[1].grad = None
    x = torch.randn(vec.numel, dtype=dtype)
    g_pair = x + 0.1 * torch.randn(vec.numel, dtype=dtype)
    op = SecantInverse()
    op.set(x, g_pair)
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat[vec.spans[1][0] : vec.spans[2][1]] = 0.0  # no gradient, frozen: zeros of g
    want = -0.5 * op.apply(flat)
    c = op.apply_to_grads(vec, scale=-0.5)
    for i in (0, 3):
        a, b = vec.spans[i]
        torch.testing.assert_close(params[i].grad.reshape(-1), want[a:b])
    assert params[1].grad is None and torch.equal(params[2].grad, grads[2])
    a, b = vec.spans[1]  # a parameter without a gradient: its slot of scale · M g is W c
    torch.testing.assert_close(op.pair[:, a:b].T @ c, want[a:b])


def test_dot_params_measures_a_small_move_of_float32_parameters():
    # The damping adaptation's step length is (⟨θ₀, u⟩ − ⟨θ₁, u⟩) / ‖u‖²: a difference of two
    # sums of 670k terms, 1e-3 of either. Against the float64 value of the actual move, the
    # float64 accumulation is within 4e-5 (the float32 products' rounding, the same order as
    # the parameters' own rounding of the move); float32 sums are 1.6e-3 off.
    from precond.methods.flat import ParamVector

    torch.manual_seed(0)
    shapes = [(512, 784), (512,), (512, 512), (10,)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float32)) for s in shapes]
    vec = ParamVector(params)
    u = torch.randn(vec.numel, dtype=torch.float32) * 1e-3

    def flat64() -> torch.Tensor:
        return torch.cat([p.detach().double().reshape(-1) for p in params])

    def float32_sum() -> float:
        return float(sum(p.detach().reshape(-1) @ u[a:b] for p, (a, b) in zip(params, vec.spans)))

    theta0, before, before32 = flat64(), vec.dot_params(u), float32_sum()
    assert before == pytest.approx(float(theta0 @ u.double()), rel=1e-6)
    with torch.no_grad():
        for p, (a, b) in zip(params, vec.spans):
            p.sub_(1e-3 * u[a:b].view(p.shape))
    uu = float(u.double() @ u.double())
    exact = float((theta0 - flat64()) @ u.double()) / uu
    assert (before - vec.dot_params(u)) / uu == pytest.approx(exact, rel=2e-4)
    assert (before32 - float32_sum()) / uu != pytest.approx(exact, rel=2e-4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["s", "y"])
def test_secant_pair_check_rejects_a_non_finite_entry_from_the_inner_product_alone(bad, where):
    # sᵀy > 0 otherwise, and the bad entry meets a zero of the other vector (∞·0 = NaN)
    # or a non-zero one; either way one inner product rejects the pair
    torch.manual_seed(0)
    s = torch.rand(5000) + 0.1
    y = s.clone()
    for i, partner in ((7, 0.0), (4000, 3.0)):
        a, b = (s, y) if where == "s" else (y, s)
        c_s, c_y = a.clone(), b.clone()
        c_s[i], c_y[i] = bad, partner
        pair = (c_s, c_y) if where == "s" else (c_y, c_s)
        assert SecantInverse.curvature(*pair) is None
    assert SecantInverse.curvature(s, y) == pytest.approx(float(s.double() @ y.double()), rel=1e-5)
    op = SecantInverse()
    op.set_pair(torch.stack([s, y]), sy=SecantInverse.curvature(s, y))
    ref = SecantInverse()
    ref.set_pair(torch.stack([s, y]))  # computes sᵀy itself: the same constants, bit for bit
    assert op._gamma == ref._gamma and torch.equal(op._k, ref._k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("numel", [10, 669706, 1024])
def test_stacked_flat_rows_start_on_64_byte_boundaries(numel, dtype):
    from precond.methods.flat import aligned_rows, stack_rows

    rows = aligned_rows((3,), numel, dtype, torch.device("cpu"))
    assert rows.shape == (3, numel) and all(r.is_contiguous() for r in rows)
    assert all(r.data_ptr() % 64 == 0 for r in rows)
    assert (rows.stride(0) * rows.element_size()) % 4096 != 0  # rows do not alias in cache
    vs = [torch.randn(numel, dtype=dtype) for _ in range(2)]
    stacked = stack_rows(vs)
    assert torch.equal(stacked, torch.stack(vs)) and stacked[1].data_ptr() % 64 == 0


def test_intermediate_steps_apply_the_stored_inverse_action():
    model, x, t = tanh_mlp()
    gm = make_gradient_maker(
        "hessian_free", model, damping=0.1, curvature_upd_interval=3, adapt_damping=False
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run_step(gm, model, x, t, F.cross_entropy)
    g0, x0 = gm.rhs.clone(), gm.solution.clone()
    torch.testing.assert_close(flat_grad(model), x0)  # curvature step: the CG solution
    opt.step()
    g1 = plain_grad(model, F.cross_entropy, x, t)
    run_step(gm, model, x, t, F.cross_entropy)
    ref = SecantInverse()
    ref.set(x0, g0)
    torch.testing.assert_close(flat_grad(model), ref.apply(g1))
    assert torch.equal(gm.solution, x0)  # no new solve


def test_damping_ratio_is_one_on_a_quadratic():
    # Linear regression: the GGN is the Hessian and the quadratic model is exact, so with SGD,
    # lr = 0.5, full batch and T = 1 the reduction ratio is exactly 1 (λ shrinks).
    model, x, t = regression()
    lam = 0.1
    gm = make_gradient_maker("hessian_free", model, damping=lam, warm_start_decay=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ratios = []
    orig = gm.lm.observe
    gm.lm.observe = lambda *a: ratios.append(orig(*a)) or ratios[-1]
    for _ in range(3):
        run_step(gm, model, x, t)
        opt.step()
    assert ratios == [pytest.approx(1.0, abs=1e-8)] * 2  # observed from the second step on
    assert gm.damping == pytest.approx(lam / 1.5**2)


def test_damping_adapter_rule():
    lm = DampingAdapter(1.0, 0.25, 0.75, 1.5)
    # predicted m(c) = -c·gu + c²/2·ucu with c = (theta_u - theta_u') / uu = 1: m = -1 + 0.5
    lm.remember(loss=2.0, gu=1.0, ucu=1.0, uu=1.0, theta_u=0.0)
    assert lm.observe(1.9, -1.0) == pytest.approx(0.2) and lm.damping == 1.5
    lm.remember(loss=2.0, gu=1.0, ucu=1.0, uu=1.0, theta_u=0.0)
    assert lm.observe(1.5, -1.0) == pytest.approx(1.0) and lm.damping == pytest.approx(1.0)
    lm.remember(loss=2.0, gu=1.0, ucu=1.0, uu=1.0, theta_u=0.0)
    assert lm.observe(1.0, 1.0) is None and lm.damping == pytest.approx(1.0)  # moved uphill


def _count_products(gm):
    """A list that receives the curvature products of every curvature step of ``gm``."""
    counts = []
    orig = gm.update_curvature

    def wrapped(stats):
        orig(stats)
        counts.append(gm.batch.count)

    gm.update_curvature = wrapped
    return counts


def test_curvature_products_are_counted_and_capped():
    model, x, t = tanh_mlp()
    gm = make_gradient_maker(
        "hessian_free", model, cg_max_iters=3, cg_tol=0.0, warm_start_decay=0.0
    )
    counts = _count_products(gm)
    run_step(gm, model, x, t, F.cross_entropy)
    assert counts == [3 + 1]  # CG iterations + xᵀCx for the damping model
    # a GGN product: two first-order passes (J v, Jᵀw), each the work of a gradient
    ops = gm.cost_model().ops
    (op,) = [op for op in ops if op.kind == "grad"]
    assert op.shape == (2 * (3 + 1),)
    assert not [op for op in ops if op.kind in ("backward", "matmul", "bmm")]


def test_cost_model_counts_the_products_cg_ran():
    # CG stopping at its tolerance computes fewer products than the cap: the floor counts
    # those run (mean per curvature step), not cg_max_iters.
    model, x, t = tanh_mlp()
    gm = make_gradient_maker(
        "hessian_free", model, curvature="hessian", cg_max_iters=200, cg_tol=1e-2
    )
    (op,) = [op for op in gm.cost_model().ops if op.kind == "hvp"]
    assert op.shape == (200 + 2,)  # before any solve: the cap
    counts = _count_products(gm)
    for _ in range(2):
        run_step(gm, model, x, t, F.cross_entropy)
    assert max(counts) < 200
    (op,) = [op for op in gm.cost_model().ops if op.kind == "hvp"]
    assert op.shape == (round(sum(counts) / 2),)
    iters = [
        o.count for o in gm.cost_model().ops if o.kind == "elementwise" and o.phase == "curvature"
    ]
    assert iters == ([op.shape[0] - 2] if op.shape[0] > 2 else [])


CONFIG_ERRORS = [
    (
        dict(curvature="fisher_mc"),
        r"Invalid curvature: 'fisher_mc'. Supported: \('ggn', 'hessian'\).",
    ),
    (dict(cg_max_iters=0), r"Invalid cg_max_iters: 0. Must be >= 1."),
    (dict(cg_tol=1.0), r"Invalid cg_tol: 1.0. Must be >= 0.0 and < 1.0."),
    (dict(warm_start_decay=1.5), r"Invalid warm_start_decay: 1.5. Must be >= 0.0 and <= 1.0."),
    (dict(adapt_damping=1), r"Invalid adapt_damping: 1. Must be True or False."),
    (dict(damping_growth=1.0), r"Invalid damping_growth: 1.0. Must be > 1.0."),
    (dict(damping=0.0), r"Invalid damping: 0.0. adapt_damping=True scales the damping"),
]


@pytest.mark.parametrize("kwargs,match", CONFIG_ERRORS)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HessianFreeConfig(**kwargs)


def test_hessian_mode_on_an_indefinite_problem_stays_a_descent_direction():
    model, x, t = tanh_mlp(seed=1)
    h = dense_hessian(model, F.cross_entropy, x, t)
    assert torch.linalg.eigvalsh(h)[0] < -1e-3
    g = plain_grad(model, F.cross_entropy, x, t)
    got, gm = _direction(
        model,
        x,
        t,
        F.cross_entropy,
        curvature="hessian",
        damping=1e-4,
        cg_tol=0.0,
        adapt_damping=False,
    )
    # CG stops at the first direction of non-positive curvature: what it returns is finite
    # and, started from zero, a descent direction (gᵀx = Σ αᵢ gᵀpᵢ > 0).
    assert torch.isfinite(got).all() and float(got @ g) > 0
    assert gm.last_cg_iters < 43


def test_frozen_parameter_solve_is_the_damped_solve_over_the_trained_parameters():
    model, x, t = tanh_mlp()
    lam = 0.1
    gm = make_gradient_maker(
        "hessian_free", model, damping=lam, adapt_damping=False, cg_max_iters=200, cg_tol=1e-12
    )
    run_step(gm, model, x, t, F.cross_entropy)
    assert gm.solution[:20].abs().max() > 0  # the warm start has a frozen part to ignore
    model[0].weight.requires_grad_(False)
    a = dense_ggn(model, F.cross_entropy, x, t)  # over the trained parameters only
    g = plain_grad(model, F.cross_entropy, x, t)
    run_step(gm, model, x, t, F.cross_entropy)
    assert model[0].weight.grad is None
    want = torch.linalg.solve(a + lam * torch.eye(len(g)), g)
    torch.testing.assert_close(flat_grad(model), want, rtol=1e-8, atol=1e-10)
    assert torch.equal(gm.solution[:20], torch.zeros(20))  # exactly zero in the frozen slots
    model[0].weight.requires_grad_(True)
    run_step(gm, model, x, t, F.cross_entropy)
    assert torch.isfinite(model[0].weight.grad).all()


def test_flatten_into_concatenates_and_fills_missing_parts_with_zeros():
    from precond.methods.flat import ParamVector

    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float32)) for s in [(3, 4), (5,)]]
    vec = ParamVector(params)
    out = vec.empty(2, dtype=torch.float32)[1]
    a, b = torch.randn(3, 4, dtype=torch.float32), torch.randn(5, dtype=torch.float32)
    flat = torch.cat([a.reshape(-1), b])
    assert torch.equal(vec.flatten_into([a, b], out), flat)  # one concatenation
    missing = torch.cat([flat[:12], torch.zeros(5, dtype=torch.float32)])
    assert torch.equal(vec.flatten_into([a.double(), None], out), missing)
    assert torch.equal(vec.flatten_into([a.T.contiguous().T, b], out), flat)  # a strided part
