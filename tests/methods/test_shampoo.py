"""Shampoo theorems: the preconditioned gradient equals the dense float64 formula."""

from __future__ import annotations

import math
import string

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from precond import make_gradient_maker
from precond.methods import shampoo as shampoo_mod
from precond.methods.shampoo import ShampooConfig, ShampooGradientMaker
from precond.numerics import NumericalWarning


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _batches(n_steps, x_shape, classes, n=6):
    return [(torch.randn(n, *x_shape), torch.randint(0, classes, (n,))) for _ in range(n_steps)]


def _run(model, batches, **options):
    """Preconditioned gradients and plain gradients per step (parameters are not updated)."""
    gm = make_gradient_maker("shampoo", model, **options)
    out, plain = [], []
    for x, t in batches:
        model.zero_grad()
        F.cross_entropy(model(x), t).backward()
        plain.append({k: p.grad.clone() for k, p in model.named_parameters()})
        model.zero_grad()
        d = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, d, t)
        gm.forward_and_backward()
        out.append({k: p.grad.clone() for k, p in model.named_parameters()})
    return out, plain, gm


def _inv_root(m, p, eps):
    evals, evecs = torch.linalg.eigh(m + eps * torch.eye(m.shape[0]))
    return evecs @ torch.diag(evals.pow(-1.0 / p)) @ evecs.T


def _dense_shampoo(grads, eps, beta2=1.0, p=None):
    """The oracle for a tensor of any order: G ×_i (H_i + εI)^{-1/p}, H_i = Σ G_(i) G_(i)ᵀ."""
    k = grads[0].dim()
    p = p or 2 * k
    letters = string.ascii_lowercase[:k]
    stats = [torch.zeros(n, n) for n in grads[0].shape]
    outs = []
    for g in grads:
        for i in range(k):
            unfold = g.movedim(i, 0).reshape(g.shape[i], -1)
            gram = unfold @ unfold.T
            stats[i] = stats[i] + gram if beta2 == 1.0 else beta2 * stats[i] + (1 - beta2) * gram
        roots = [_inv_root(s, p, eps) for s in stats]
        out_letters = string.ascii_uppercase[:k]
        spec = letters + "," + ",".join(f"{u}{c}" for u, c in zip(out_letters, letters))
        outs.append(torch.einsum(f"{spec}->{out_letters}", g, *roots))
    return outs


EPS = 1e-3


def test_matrix_parameter_equals_dense_inverse_fourth_roots():
    torch.manual_seed(0)
    model = nn.Linear(5, 4, bias=False)
    out, plain, _ = _run(model, _batches(3, (5,), 4), damping=EPS, grafting="none")
    want = _dense_shampoo([g["weight"] for g in plain], EPS)
    for step in range(3):
        torch.testing.assert_close(out[step]["weight"], want[step], rtol=1e-9, atol=1e-11)


def test_statistics_are_undamped_sums_of_gradient_grams():
    torch.manual_seed(0)
    model = nn.Linear(5, 4, bias=False)
    _, plain, gm = _run(model, _batches(3, (5,), 4), damping=0.5, grafting="none")
    gs = [g["weight"] for g in plain]
    left, right = gm.stats[0]
    torch.testing.assert_close(left[0], sum(g @ g.T for g in gs))
    torch.testing.assert_close(right[0], sum(g.T @ g for g in gs))


def test_blocked_dimensions_have_their_own_factors():
    torch.manual_seed(0)
    model = nn.Linear(
        7, 5, bias=False
    )  # view [5, 7]; blocks of rows [0:3, 3:5] x cols [0:3, 3:6, 6:7]
    out, plain, gm = _run(model, _batches(2, (7,), 5), damping=EPS, grafting="none", block_size=3)
    assert sorted(g.shape for g in gm.layout.groups) == [(2, 1), (2, 3), (3, 1), (3, 3)]
    gs = [g["weight"] for g in plain]
    for rows in (slice(0, 3), slice(3, 5)):
        for cols in (slice(0, 3), slice(3, 6), slice(6, 7)):
            want = _dense_shampoo([g[rows, cols] for g in gs], EPS)
            for step in range(2):
                torch.testing.assert_close(
                    out[step]["weight"][rows, cols], want[step], rtol=1e-9, atol=1e-11
                )


def test_blocked_vector_has_a_block_diagonal_factor():
    torch.manual_seed(0)
    model = nn.Linear(3, 7)  # bias of size 7 -> blocks of 3, 3, 1
    out, plain, _ = _run(model, _batches(3, (3,), 7), damping=EPS, grafting="none", block_size=3)
    stat = torch.zeros(7, 7)
    for step in range(3):
        g = plain[step]["bias"]
        blocks = [g[0:3], g[3:6], g[6:7]]
        stat = stat + torch.block_diag(*[torch.outer(b, b) for b in blocks])
        want = _inv_root(stat, 2, EPS) @ g
        torch.testing.assert_close(out[step]["bias"], want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    ("merge_dims", "view"),
    [(1024, (4, 12)), (6, (4, 3, 4)), (None, (4, 3, 2, 2))],
    ids=["merged", "partly_merged", "unmerged"],
)
def test_conv_kernel_merged_dims_and_bias_vector(merge_dims, view):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3))
    out, plain, _ = _run(
        model, _batches(2, (3, 4, 4), 3), damping=EPS, grafting="none", merge_dims=merge_dims
    )
    want = _dense_shampoo([g["0.weight"].reshape(view) for g in plain], EPS)
    bias = _dense_shampoo([g["0.bias"] for g in plain], EPS)  # order 1: (Σ g gᵀ + εI)^{-1/2} g
    for step in range(2):
        torch.testing.assert_close(
            out[step]["0.weight"], want[step].reshape(4, 3, 2, 2), rtol=1e-9, atol=1e-11
        )
        torch.testing.assert_close(out[step]["0.bias"], bias[step], rtol=1e-9, atol=1e-11)


def test_diagonal_vector_factor_is_adagrad_with_epsilon():
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    out, plain, _ = _run(
        model, _batches(3, (5,), 4), damping=EPS, grafting="none", vector_factor="diagonal"
    )
    acc = torch.zeros(4)
    for step in range(3):
        g = plain[step]["bias"]
        acc = acc + g * g
        torch.testing.assert_close(out[step]["bias"], g / (acc + EPS).sqrt(), rtol=1e-9, atol=0)


def test_exponent_override_and_ema_statistics():
    torch.manual_seed(0)
    model = nn.Linear(5, 4, bias=False)
    out, plain, _ = _run(
        model,
        _batches(3, (5,), 4),
        damping=EPS,
        grafting="none",
        exponent_override=2,
        beta2=0.9,
    )
    want = _dense_shampoo([g["weight"] for g in plain], EPS, beta2=0.9, p=2)
    for step in range(3):
        torch.testing.assert_close(out[step]["weight"], want[step], rtol=1e-9, atol=1e-11)


def _graft_directions(kind, grads, beta=0.999, eps=1e-8):
    state, outs = torch.zeros_like(grads[0]), []
    for t, g in enumerate(grads, start=1):
        if kind == "sgd":
            outs.append(g)
        elif kind == "adagrad":
            state = state + g * g
            outs.append(g / (state.sqrt() + eps))
        else:
            state = beta * state + (1 - beta) * g * g
            outs.append(g / ((state / (1 - beta**t)).sqrt() + eps))
    return outs


@pytest.fixture(params=["per_tensor", "foreach"])
def graft_path(request, monkeypatch):
    """Both element-wise paths of the grafting: every tensor on its own, or all in one call."""
    size = 0 if request.param == "per_tensor" else 1 << 30
    monkeypatch.setattr(shampoo_mod, "PER_TENSOR_NUMEL", size)
    return request.param


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
def test_grafting_takes_shampoo_direction_and_grafted_norm(kind, graft_path):
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    out, plain, _ = _run(model, _batches(3, (5,), 4), damping=EPS, grafting=kind)
    for name in ("weight", "bias"):
        gs = [g[name] for g in plain]
        direction = _dense_shampoo(gs, EPS)
        graft = _graft_directions(kind, gs)
        for step in range(3):
            got = out[step][name]
            torch.testing.assert_close(got.norm(), graft[step].norm(), rtol=1e-10, atol=0)
            want = direction[step] * graft[step].norm() / direction[step].norm()
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["adagrad", "adam"])
def test_start_up_steps_use_the_grafted_direction(kind, graft_path):
    # Adam's bias correction is folded into ε and into the written direction: both paths
    torch.manual_seed(0)
    model = nn.Linear(5, 4, bias=False)
    out, plain, _ = _run(
        model, _batches(4, (5,), 4), damping=EPS, grafting=kind, start_preconditioning_step=2
    )
    gs = [g["weight"] for g in plain]
    graft = _graft_directions(kind, gs)
    direction = _dense_shampoo(gs, EPS)  # statistics accumulate from step 0
    for step in (0, 1):
        torch.testing.assert_close(out[step]["weight"], graft[step], rtol=1e-10, atol=0)
    for step in (2, 3):
        want = direction[step] * graft[step].norm() / direction[step].norm()
        torch.testing.assert_close(out[step]["weight"], want, rtol=1e-9, atol=1e-12)


def test_start_up_without_grafting_is_the_plain_gradient_and_skips_early_roots(monkeypatch):
    torch.manual_seed(0)
    model = nn.Linear(5, 4, bias=False)
    calls = []
    orig = shampoo_mod.damped_eigh_
    monkeypatch.setattr(
        shampoo_mod, "damped_eigh_", lambda m, eps: calls.append(m.shape) or orig(m, eps)
    )
    out, plain, _ = _run(
        model, _batches(3, (5,), 4), damping=EPS, grafting="none", start_preconditioning_step=2
    )
    torch.testing.assert_close(out[0]["weight"], plain[0]["weight"])
    torch.testing.assert_close(out[1]["weight"], plain[1]["weight"])
    assert len(calls) == 2  # roots only on step 2 (sizes 4 and 5), none during start-up


def test_amortised_steps_apply_stored_roots_to_the_new_gradient():
    torch.manual_seed(0)
    model = nn.Linear(5, 4, bias=False)
    out, plain, _ = _run(
        model, _batches(4, (5,), 4), damping=EPS, grafting="none", curvature_upd_interval=2
    )
    gs = [g["weight"] for g in plain]
    left = sum(g @ g.T for g in gs[:1])
    right = sum(g.T @ g for g in gs[:1])
    want1 = _inv_root(left, 4, EPS) @ gs[1] @ _inv_root(right, 4, EPS)
    torch.testing.assert_close(out[1]["weight"], want1, rtol=1e-9, atol=1e-11)
    left, right = left + gs[2] @ gs[2].T, right + gs[2].T @ gs[2]
    want3 = _inv_root(left, 4, EPS) @ gs[3] @ _inv_root(right, 4, EPS)
    torch.testing.assert_close(out[3]["weight"], want3, rtol=1e-9, atol=1e-11)


def test_factors_of_equal_size_share_one_batched_eigendecomposition(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    calls = []
    orig = shampoo_mod.damped_eigh_
    monkeypatch.setattr(
        shampoo_mod, "damped_eigh_", lambda m, eps: calls.append(tuple(m.shape)) or orig(m, eps)
    )
    _run(model, _batches(1, (4,), 3))
    # size 4: both factors of the two [4, 4] weights, the column factor of the [3, 4] weight
    # and the two size-4 biases; size 3: the [3, 4] weight's row factor and the last bias.
    assert sorted(calls) == [(2, 3, 3), (7, 4, 4)]


class Custom(nn.Module):
    """A module with bare parameters (no capture adapter)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 4))
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return (x @ self.w) * self.gain


def test_bare_parameters_of_custom_modules_are_preconditioned():
    torch.manual_seed(0)
    model = nn.Sequential(Custom(), nn.Linear(4, 3))
    out, plain, _ = _run(model, _batches(2, (5,), 3), damping=EPS, grafting="none")
    want_w = _dense_shampoo([g["0.w"] for g in plain], EPS)
    want_gain = _dense_shampoo([g["0.gain"] for g in plain], EPS)
    for step in range(2):
        torch.testing.assert_close(out[step]["0.w"], want_w[step], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(out[step]["0.gain"], want_gain[step], rtol=1e-9, atol=1e-11)


def test_non_finite_gradient_skips_the_statistics_update():
    torch.manual_seed(0)
    model = nn.Linear(5, 4, bias=False)
    gm = ShampooGradientMaker(model, ShampooConfig(grafting="none"))
    x, t = torch.randn(6, 5), torch.randint(0, 4, (6,))
    d = gm.setup_model_call(model, x)
    gm.setup_loss_call(F.cross_entropy, d, t)
    gm.forward_and_backward()
    before = [s.clone() for s in gm.stats[0]]
    model.zero_grad()
    gm.setup_model_call(model, torch.full((6, 5), float("nan")))
    gm.setup_loss_call(F.cross_entropy, d, t)
    with pytest.warns(NumericalWarning, match="non-finite"):
        gm.forward_and_backward()
    for a, b in zip(before, gm.stats[0]):
        assert torch.equal(a, b)
    model.zero_grad()
    gm.setup_model_call(model, x)
    gm.setup_loss_call(F.cross_entropy, d, t)
    gm.forward_and_backward()
    assert torch.isfinite(model.weight.grad).all()


def test_low_precision_model_keeps_float32_statistics():
    torch.manual_seed(0)
    model = nn.Linear(5, 4).to(torch.bfloat16)
    gm = ShampooGradientMaker(model)
    d = gm.setup_model_call(model, torch.randn(6, 5, dtype=torch.bfloat16))
    gm.setup_loss_call(F.cross_entropy, d, torch.randint(0, 4, (6,)))
    gm.forward_and_backward()
    assert all(s.dtype == torch.float32 for group in gm.stats for s in group)
    assert model.weight.grad.dtype == torch.bfloat16
    assert torch.isfinite(model.weight.grad.float()).all()


def test_cost_model_lists_grams_eighs_and_mode_products():
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 4))
    cm = ShampooGradientMaker(model).cost_model()
    kinds = {(op.phase.value, op.kind, op.shape) for op in cm.ops}
    assert ("curvature", "bmm", (1, 4, 6, 4)) in kinds  # L of the [4, 6] weight
    # each statistic folded into its running sum: the 6x6 R of the first weight, the 4x4 ones
    assert ("curvature", "elementwise", (36,)) in kinds
    assert ("curvature", "elementwise", (16,)) in kinds
    assert ("refresh", "eigh", (5, 4)) in kinds  # 4x4 factors: 2 + 1 + biases 2
    assert ("apply", "bmm", (1, 4, 6, 6)) in kinds
    assert cm.state_numel == 2 * (16 + 36 + 16 + 16 + 16 + 16) + 4 * 6 + 4 + 16 + 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"damping": 0.0}, r"Invalid damping: 0\.0\. Must be > 0\.0\."),
        ({"beta2": 0.0}, r"Invalid beta2: 0\.0\. Must be > 0\.0 and <= 1\.0\."),
        ({"beta2": 1.5}, r"Invalid beta2: 1\.5\. Must be > 0\.0 and <= 1\.0\."),
        ({"exponent_override": 0}, r"Invalid exponent_override: 0\. Must be >= 1\."),
        ({"merge_dims": 0}, r"Invalid merge_dims: 0\. Must be >= 1\."),
        ({"block_size": 2.5}, r"Invalid block_size: 2\.5\. Must be an integer\."),
        (
            {"vector_factor": "dense"},
            r"Invalid vector_factor: 'dense'\. Supported: \('full', 'diagonal'\)\.",
        ),
        (
            {"grafting": "rmsprop"},
            r"Invalid grafting: 'rmsprop'\. Supported: \('none', 'sgd', 'adagrad', 'adam'\)\.",
        ),
        ({"graft_beta2": 1.0}, r"Invalid graft_beta2: 1\.0\. Must be >= 0\.0 and < 1\.0\."),
        ({"graft_epsilon": 0.0}, r"Invalid graft_epsilon: 0\.0\. Must be > 0\.0\."),
        (
            {"start_preconditioning_step": -1},
            r"Invalid start_preconditioning_step: -1\. Must be >= 0\.",
        ),
        (
            {"ema_decay": 0.9},
            r"Invalid ema_decay: 0\.9\. Shampoo does not use it; set beta2 instead\.",
        ),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShampooConfig(**kwargs)


def test_default_exponent_is_twice_the_order():
    gm = ShampooGradientMaker(nn.Linear(3, 2))
    assert gm._exponent(2) == -0.25
    assert gm._exponent(1) == -0.5
    assert math.isclose(gm._exponent(3), -1 / 6)


@pytest.mark.parametrize("grafting", ["adagrad", "adam"])
@pytest.mark.parametrize("interval", [1, 2])
def test_non_finite_gradient_leaves_grafting_accumulators_unchanged(grafting, interval, graft_path):
    # interval=1: the bad step is a curvature step (host check, warning); interval=2: it is
    # not, and only the device-side guard of the grafting accumulators acts.
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    gm = ShampooGradientMaker(
        model, ShampooConfig(grafting=grafting, curvature_upd_interval=interval)
    )
    x, t = torch.randn(6, 5), torch.randint(0, 3, (6,))

    def step(inp):
        model.zero_grad()
        d = gm.setup_model_call(model, inp)
        gm.setup_loss_call(F.cross_entropy, d, t)
        gm.forward_and_backward()

    step(x)
    graft = [s.clone() for s in gm._graft]
    stats = [[s.clone() for s in group] for group in gm.stats]
    bad = x.clone()
    bad[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(bad)
    warned = [w for w in caught if issubclass(w.category, NumericalWarning)]
    assert bool(warned) == (interval == 1)
    assert all(torch.equal(a, b) for a, b in zip(graft, gm._graft))
    for old, new in zip(stats, gm.stats):
        assert all(torch.equal(a, b) for a, b in zip(old, new))
    step(x)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_damped_eigh_redoes_only_failed_matrices_in_float64(monkeypatch):
    # float32 eigh can return NaN eigenvalues for some statistics (observed on a CNN's head with
    # always-zero features): only those matrices are redone in float64.
    from precond.methods._gradient_stats import damped_eigh_

    torch.manual_seed(0)
    x = torch.randn(3, 6, 6, dtype=torch.float32)
    m = x @ x.mT
    orig = torch.linalg.eigh
    seen = []

    def flaky(a):
        seen.append((a.dtype, a.shape[0]))
        evals, evecs = orig(a)
        if a.dtype == torch.float32:
            evals = evals.clone()
            evals[1, 0] = float("nan")
        return evals, evecs

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    evals, evecs = damped_eigh_(m.clone(), 0.5)
    assert seen == [(torch.float32, 3), (torch.float64, 1)]
    assert evals.dtype == evecs.dtype == torch.float32
    want = orig(m.double() + 0.5 * torch.eye(6, dtype=torch.float64))[0]
    torch.testing.assert_close(evals.double(), want, rtol=1e-5, atol=1e-5)
    rebuilt = evecs @ torch.diag_embed(evals) @ evecs.mT
    torch.testing.assert_close(rebuilt, m + 0.5 * torch.eye(6, dtype=m.dtype), rtol=1e-4, atol=1e-4)
