"""K-BFGS theorems: secant condition, damping keeps H positive definite, exact pairs in the maker."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from precond import make_gradient_maker
from precond.capture import UnsupportedModuleError
from precond.methods import bfgs
from precond.methods.kbfgs import KronBfgsConfig


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _spd(g, d, gen):
    m = torch.randn(g, d, d, generator=gen)
    return m @ m.transpose(-1, -2) + 0.1 * torch.eye(d)


def _mv(h, x):
    return (h @ x.unsqueeze(-1)).squeeze(-1)


def test_bfgs_update_satisfies_the_secant_condition_exactly():
    gen = torch.Generator().manual_seed(0)
    h = _spd(3, 5, gen)
    s = torch.randn(3, 5, generator=gen)
    y = _mv(_spd(3, 5, gen), s)  # sᵀy > 0
    new, ok = bfgs.bfgs_update(h, s, y)
    assert ok.all()
    torch.testing.assert_close(_mv(new, y), s, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(new, new.transpose(-1, -2))
    assert torch.linalg.eigvalsh(new).min() > 0
    # the textbook product form
    rho = 1 / (s * y).sum(-1)
    eye = torch.eye(5)
    left = eye - rho[:, None, None] * s.unsqueeze(-1) * y.unsqueeze(-2)
    want = left @ h @ left.transpose(-1, -2) + rho[:, None, None] * s.unsqueeze(-1) * s.unsqueeze(
        -2
    )
    torch.testing.assert_close(new, want, rtol=1e-10, atol=1e-12)


def test_bfgs_update_skips_pairs_without_positive_curvature():
    gen = torch.Generator().manual_seed(1)
    h = _spd(2, 4, gen)
    s = torch.randn(2, 4, generator=gen)
    y = torch.stack([-s[0], s[1]])
    new, ok = bfgs.bfgs_update(h, s, y)
    assert ok.tolist() == [False, True]
    torch.testing.assert_close(new[0], h[0])


def test_double_damping_keeps_the_factor_positive_definite():
    gen = torch.Generator().manual_seed(2)
    mu1, mu2 = 0.2, 0.05
    h = torch.eye(6).expand(4, 6, 6).clone()
    for _ in range(60):
        s = torch.randn(4, 6, generator=gen)
        y = -s + 0.3 * torch.randn(4, 6, generator=gen)  # mostly negative curvature
        hy = _mv(h, y)
        s_t, y_t = bfgs.double_damping(s, y, hy, mu1, mu2)
        assert ((s_t * y).sum(-1) >= mu1 * (y * hy).sum(-1) - 1e-10).all()  # Powell
        assert ((s_t * y_t).sum(-1) >= mu2 * (s_t * s_t).sum(-1) - 1e-10).all()  # LM
        h, ok = bfgs.bfgs_update(h, s_t, y_t)
        assert ok.all()
        torch.testing.assert_close(_mv(h, y_t), s_t, rtol=1e-8, atol=1e-9)  # secant on (s̃, ỹ)
        assert torch.linalg.eigvalsh(h).min() > 0
    # undamped, the same pairs would destroy positive definiteness or be skipped
    s = torch.randn(4, 6, generator=gen)
    _, ok = bfgs.bfgs_update(torch.eye(6).expand(4, 6, 6), s, -s)
    assert not ok.any()


def test_damping_leaves_good_pairs_unchanged():
    gen = torch.Generator().manual_seed(3)
    h = _spd(2, 4, gen)
    s = torch.randn(2, 4, generator=gen)
    y = _mv(torch.linalg.inv(h), s)  # exactly consistent with H: sᵀy = yᵀHy
    s_t, y_t = bfgs.double_damping(s, y, _mv(h, y), 0.2, 1e-8)
    torch.testing.assert_close(s_t, s)
    torch.testing.assert_close(y_t, y)


def test_lbfgs_with_enough_memory_equals_bfgs():
    gen = torch.Generator().manual_seed(4)
    g, d, h0 = 2, 5, 0.7
    h = h0 * torch.eye(d).expand(g, d, d).clone()
    s_mem, y_mem = torch.zeros(g, 0, d), torch.zeros(g, 0, d)
    s_short, y_short = s_mem, y_mem
    for _ in range(6):
        s = torch.randn(g, d, generator=gen)
        y = _mv(_spd(g, d, gen), s) - 0.5 * s
        hy = bfgs.lbfgs_apply(s_mem, y_mem, h0, y.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(hy, _mv(h, y), rtol=1e-9, atol=1e-10)
        s_t, y_t = bfgs.double_damping(s, y, hy, 0.2, 0.01)
        h, _ = bfgs.bfgs_update(h, s_t, y_t)
        s_mem, y_mem = bfgs.lbfgs_append(s_mem, y_mem, s_t, y_t, memory=10)
        s_short, y_short = bfgs.lbfgs_append(s_short, y_short, s_t, y_t, memory=3)
    eye = torch.eye(d).expand(g, d, d)
    torch.testing.assert_close(bfgs.lbfgs_apply(s_mem, y_mem, h0, eye), h, rtol=1e-9, atol=1e-10)
    assert s_short.shape == (g, 3, d)
    assert not torch.allclose(bfgs.lbfgs_apply(s_short, y_short, h0, eye), h)


def _step(gm, model, x, t, loss=F.mse_loss):
    model.zero_grad()
    d = gm.setup_model_call(model, x)
    gm.setup_loss_call(loss, d, t)
    return gm.forward_and_backward()


def test_maker_pairs_are_exact_on_a_linear_layer_and_h_satisfies_the_secant_condition():
    # Linear model + MSE: ∂L/∂h_n = 2 (h_n − t_n) / (N d), so y = Σ_n Δ(∂L/∂h_n) = (2/d) s with
    # s the change of the mean output: the pair is exact and the update must satisfy H y = s.
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    gm = make_gradient_maker(
        "kbfgs", model, damping=0.0, pair_decay=0.0, ema_decay=0.0, initial_scale=1.0
    )
    x0, t0 = torch.randn(8, 4), torch.randn(8, 3)
    _step(gm, model, x0, t0)
    theta0 = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    x1, t1 = torch.randn(8, 4), torch.randn(8, 3)
    _step(gm, model, x1, t1)
    with torch.no_grad():
        s = (model(x1) - F.linear(x1, *theta0)).mean(0)
    y = 2.0 / 3.0 * s
    hg = gm.states[""].hg
    torch.testing.assert_close(hg[0] @ y, s, rtol=1e-10, atol=1e-12)
    # the direction is H^g ∇W̃ (A + 0·I)^{-1} with A the mean of ã ãᵀ on this batch
    model.zero_grad()
    F.mse_loss(model(x1), t1).backward()
    grad = torch.cat([model.weight.grad, model.bias.grad.unsqueeze(1)], dim=1)
    a_aug = torch.cat([x1, torch.ones(8, 1)], dim=1)
    a = a_aug.T @ a_aug / 8
    want = hg[0] @ grad @ torch.linalg.inv(a)
    _step(gm, model, x1, t1)  # same batch, θ unchanged: s = 0 and H^g stays
    got = torch.cat([model.weight.grad, model.bias.grad.unsqueeze(1)], dim=1)
    torch.testing.assert_close(gm.states[""].hg, hg)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


class DropBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def test_extra_pass_restores_parameters_buffers_and_random_state():
    torch.manual_seed(0)
    model = DropBN()
    gm = make_gradient_maker("kbfgs", model)
    x, t = torch.randn(6, 5), torch.randint(0, 2, (6,))
    _step(gm, model, x, t, F.cross_entropy)
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    ref = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(42)
    _, loss = _step(gm, model, x, t, F.cross_entropy)  # curvature step with the extra pass
    after_rng = torch.rand(1)
    torch.manual_seed(42)
    ref_loss = F.cross_entropy(ref(x), t)
    assert torch.equal(torch.rand(1), after_rng)  # the ordinary pass consumed the same numbers
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    for b, c in zip(model.buffers(), ref.buffers()):
        assert torch.equal(b, c)  # batch-norm statistics updated once
    assert gm.states["fc1"].s_avg.abs().sum() > 0  # a pair was formed


def test_lbfgs_variant_keeps_a_bounded_memory_and_convolutions_work():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3))
    gm = make_gradient_maker("kbfgs", model, variant="lbfgs", memory=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(6):
        x, t = torch.randn(5, 2, 4, 4), torch.randint(0, 3, (5,))
        opt.zero_grad()
        _step(gm, model, x, t, F.cross_entropy)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
    conv = gm.states["0"]
    assert conv.s_mem.shape == (2, 3, 2)  # groups, memory, d_out per group
    assert conv.a.shape == (2, 10, 10)  # 1·3·3 inputs + bias per group
    assert gm.cost_model().state_numel > 0


def _seq_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(7, 4), nn.LayerNorm(4), nn.Linear(4, 3))


def test_norm_and_embedding_layers_use_the_declared_fallback():
    model = _seq_model()
    gm = make_gradient_maker("kbfgs", model)
    assert [layer.name for layer in gm.layers] == ["2"]
    assert {layer.name for layer in gm.partition.fallback} == {"0", "1"}
    x, t = torch.randint(0, 7, (4,)), torch.randint(0, 3, (4,))
    _step(gm, model, x, t, F.cross_entropy)
    assert all(p.grad is not None for p in model.parameters())

    model = _seq_model()
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), t).backward()
    gm = make_gradient_maker("kbfgs", model, unsupported="skip")
    _step(gm, model, x, t, F.cross_entropy)
    torch.testing.assert_close(model[0].weight.grad, ref[0].weight.grad)
    torch.testing.assert_close(model[1].weight.grad, ref[1].weight.grad)


def test_norm_and_embedding_layers_raise_under_the_error_policy():
    match = (
        r"Invalid module '0' \(Embedding\): KronBfgsGradientMaker cannot precondition it \(K-BFGS "
        r"covers Linear and convolution layers\)."
    )
    with pytest.raises(UnsupportedModuleError, match=match):
        make_gradient_maker("kbfgs", _seq_model(), unsupported="error")


CONFIG_ERRORS = [
    (dict(variant="dfp"), r"Invalid variant: 'dfp'. Supported: \('bfgs', 'lbfgs'\)."),
    (dict(memory=0), r"Invalid memory: 0. Must be >= 1."),
    (dict(damping=1.0), r"Invalid damping: 1.0. Must be >= 0.0 and < 1.0."),
    (dict(pair_decay=1.0), r"Invalid pair_decay: 1.0. Must be >= 0.0 and < 1.0."),
    (dict(powell_mu=0.0), r"Invalid powell_mu: 0.0. Must be > 0.0 and < 1.0."),
    (dict(initial_scale=0.0), r"Invalid initial_scale: 0.0. Must be > 0.0."),
    (
        dict(unsupported="ignore"),
        r"Invalid unsupported: 'ignore'. Supported: \('error', 'skip', 'diag'\).",
    ),
]


@pytest.mark.parametrize("kwargs,match", CONFIG_ERRORS)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KronBfgsConfig(**kwargs)


@pytest.mark.parametrize("variant", ["bfgs", "lbfgs"])
def test_cost_model_lists_the_extra_pass_factorisations_and_state(variant):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    gm = make_gradient_maker("kbfgs", model, variant=variant, memory=2)
    _step(gm, model, torch.randn(5, 4), torch.randint(0, 3, (5,)), F.cross_entropy)
    cm = gm.cost_model()
    kinds = {(str(op.phase), op.kind, op.shape) for op in cm.ops}
    assert ("extra_backward", "backward", (1,)) in kinds
    assert ("extra_backward", "forward", (1,)) in kinds
    assert ("refresh", "cholesky", (1, 5)) in kinds and ("refresh", "cholesky", (1, 7)) in kinds
    assert ("curvature", "bmm", (1, 5, 5, 5)) in kinds  # A from 5 rows of width 4 + 1
    assert ("curvature", "elementwise", (25,)) in kinds  # A's moving average (ema_decay 0.9)
    gm.config.ema_decay = 0.0  # A replaced: no average to fold into
    assert ("curvature", "elementwise", (25,)) not in {
        (str(op.phase), op.kind, op.shape) for op in gm.cost_model().ops
    }
    numel = sum(p.numel() for p in model.parameters())
    if variant == "bfgs":
        factors = 2 * 25 + 36 + 2 * 6 + 2 * 49 + 9 + 2 * 3
    else:
        factors = 2 * 25 + 2 * 2 * 6 + 2 * 6 + 2 * 49 + 2 * 2 * 3 + 2 * 3
    assert cm.state_numel == factors + numel


def test_outputs_modified_in_place_give_the_same_pairs():
    # The mean pre-activations are summed as the layer produces them, so an in-place ReLU
    # after the layer changes nothing.
    factors = []
    for inplace in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=inplace), nn.Linear(5, 3))
        gm = make_gradient_maker("kbfgs", model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            _step(gm, model, torch.randn(6, 4), torch.randint(0, 3, (6,)), F.cross_entropy)
            opt.step()
        factors.append([gm.states[k].hg.clone() for k in ("0", "2")])
    assert not torch.equal(factors[1][0], torch.eye(5).unsqueeze(0))
    for a, b in zip(*factors):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
