"""Sophia theorems: GNB is unbiased for the GGN diagonal; the clipped update is exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import dense_ggn
from tests.methods.test_adahessian import dense_hessian
from torch import nn

from precond import make_gradient_maker
from precond.curvature.loss import parse_loss_call, sample_classes
from precond.methods.probes import gnb_diagonal
from precond.methods.sophia import SophiaConfig, sophia_direction


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _model(d_out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, d_out))


@pytest.mark.parametrize(
    "loss_fn,target",
    [
        (F.cross_entropy, lambda n: torch.randint(0, 3, (n,))),
        (F.mse_loss, lambda n: torch.randn(n, 3)),
    ],
    ids=["cross_entropy", "mse"],
)
def test_gnb_estimator_is_unbiased_for_the_ggn_diagonal(loss_fn, target):
    model = _model()
    x, t = torch.randn(6, 4), target(6)
    exact = dense_ggn(model, loss_fn, x, t).diagonal()
    params = list(model.parameters())
    logits = model(x)
    inputs = parse_loss_call(loss_fn, (logits, t), {}, batch_size=6)
    gen = torch.Generator().manual_seed(0)
    total = torch.zeros_like(exact)
    errors = []
    for n in range(1, 1001):
        total += torch.cat([e.reshape(-1) for e in gnb_diagonal(inputs, params, gen)])
        if n in (10, 100, 1000):
            errors.append(float((total / n - exact).norm() / exact.norm()))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.08, errors
    assert errors[2] < errors[0] / 5, errors  # ~1/√n: the mean converges to the exact value


def test_gnb_is_batch_size_times_squared_gradient_of_sampled_loss():
    model = _model()
    x, t = torch.randn(5, 4), torch.randint(0, 3, (5,))
    logits = model(x)
    inputs = parse_loss_call(F.cross_entropy, (logits, t), {}, batch_size=5)
    params = list(model.parameters())
    got = gnb_diagonal(inputs, params, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    sampled = sample_classes(torch.softmax(logits.detach(), -1), gen)
    grads = torch.autograd.grad(F.cross_entropy(logits, sampled), params)
    for g_est, g in zip(got, grads):
        torch.testing.assert_close(g_est, 5 * g.square())


def test_clipping_rule_on_a_hand_built_case():
    m = torch.tensor([1.0, -2.0, 0.5, 3.0, -0.01, 0.0])
    h = torch.tensor([10.0, 1.0, -5.0, 0.0, 1.0, 0.0])
    gamma, eps = 0.1, 1e-3
    denom = (gamma * h).clamp(min=eps)  # [1, 0.1, 1e-3, 1e-3, 0.1, 1e-3]
    want = torch.tensor([1.0, -1.0, 1.0, 1.0, -0.1, 0.0])
    torch.testing.assert_close(sophia_direction(m, denom), want)


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_gradient_maker_applies_the_clipped_update(estimator):
    model = _model()
    beta1, beta2, rho, eps = 0.5, 0.75, 0.2, 1e-6
    gm = make_gradient_maker(
        "sophia",
        model,
        estimator=estimator,
        momentum=beta1,
        ema_decay=beta2,
        rho=rho,
        damping=eps,
        curvature_upd_interval=3,
        seed=11,
    )
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(11)
    m = [torch.zeros_like(p) for p in params]
    h = [torch.zeros_like(p) for p in params]
    for step in range(4):
        x, t = torch.randn(6, 4), torch.randint(0, 3, (6,))
        logits = model(x)
        grads = torch.autograd.grad(F.cross_entropy(logits, t), params, retain_graph=True)
        if step % 3 == 0:
            if estimator == "gnb":
                probs = torch.softmax(logits.detach(), -1)
                y = sample_classes(probs, gen)
                g_hat = torch.autograd.grad(F.cross_entropy(logits, y), params)
                est = [6 * g.square() for g in g_hat]
            else:
                u = [torch.randn(p.shape, generator=gen) for p in params]
                hess = dense_hessian(model, lambda fn, x=x, t=t: F.cross_entropy(fn(x), t))
                u_flat = torch.cat([ui.reshape(-1) for ui in u])
                flat = u_flat * (hess @ u_flat)
                est = [
                    e.view(p.shape) for e, p in zip(flat.split([p.numel() for p in params]), params)
                ]
            h = [beta2 * hi + (1 - beta2) * e for hi, e in zip(h, est)]
        m = [beta1 * mi + (1 - beta1) * g for mi, g in zip(m, grads)]
        want = [(mi / (rho * hi).clamp(min=eps)).clamp(-1, 1) for mi, hi in zip(m, h)]
        model.zero_grad()
        d = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, d, t)
        gm.forward_and_backward()
        for p, w in zip(params, want):
            torch.testing.assert_close(p.grad, w, rtol=1e-9, atol=1e-12)
        with torch.no_grad():
            for p in params:
                p -= 0.1 * p.grad
    assert gm.num_curvature_updates == 2


def test_gnb_needs_a_known_loss():
    from precond.grad_maker import ProtocolError

    model = _model()
    gm = make_gradient_maker("sophia", model)
    d = gm.setup_model_call(model, torch.randn(2, 4))
    gm.setup_loss_repr(d.sum())
    with pytest.raises(ProtocolError, match="setup_logits_repr"):
        gm.forward_and_backward()


CONFIG_ERRORS = [
    (dict(estimator="exact"), r"Invalid estimator: 'exact'. Supported: \('gnb', 'hutchinson'\)."),
    (dict(momentum=-0.5), r"Invalid momentum: -0.5. Must be >= 0.0 and < 1.0."),
    (dict(rho=0.0), r"Invalid rho: 0.0. Must be > 0.0."),
    (dict(damping=0.0), r"Invalid damping: 0.0. Must be > 0.0."),
    (dict(curvature_upd_interval=0), r"Invalid curvature_upd_interval: 0. Must be >= 1."),
]


@pytest.mark.parametrize("kwargs,match", CONFIG_ERRORS)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SophiaConfig(**kwargs)


@pytest.mark.parametrize("estimator,kind", [("gnb", "grad"), ("hutchinson", "hvp")])
def test_cost_model_lists_the_estimator_pass(estimator, kind):
    model = _model()
    cm = make_gradient_maker("sophia", model, estimator=estimator).cost_model()
    extra = [op for op in cm.ops if str(op.phase) == "extra_backward"]
    numel = sum(p.numel() for p in model.parameters())
    probe = [("randn", (numel,))] if estimator == "hutchinson" else []
    assert [(op.kind, op.shape) for op in extra] == [(kind, (1,)), *probe]
    assert cm.state_numel == 3 * sum(p.numel() for p in model.parameters())
    assert cm.state_dtype == torch.float64


def test_gnb_pass_after_the_loss_backward_gives_the_same_steps(monkeypatch):
    # The GNB pass runs after the loss's own backward and frees the graph; the other order
    # (estimate first, graph kept for the loss's backward) must give the same steps.
    from precond.methods.elementwise import ElementwiseSecondOrderMaker

    def estimate_first(self, loss, curvature_step):
        rows = [i for i, p in enumerate(self.precond_params) if p.requires_grad]
        trained = [self.precond_params[i] for i in rows]
        vec = self.loss_inputs().mc_vectors(1, self.generator)[0]
        grads = torch.autograd.grad(self.loss_inputs().logits, trained, vec, retain_graph=True)
        self._estimate = (rows, [g.to(torch.float64).square() for g in grads])
        loss.backward()

    x, t = torch.randn(5, 2, 4, 4), torch.randint(0, 4, (5,))
    results = []
    for patch in (False, True):
        if patch:
            monkeypatch.setattr(ElementwiseSecondOrderMaker, "_backward", estimate_first)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 4))
        gm = make_gradient_maker("sophia", model, estimator="gnb")
        for _ in range(2):
            model.zero_grad()
            d = gm.setup_model_call(model, x)
            gm.setup_loss_call(F.cross_entropy, d, t)
            gm.forward_and_backward()
        results.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_non_finite_gradient_leaves_moments_and_curvature_unchanged(estimator):
    from tests.methods.test_adahessian import _nan_step_keeps_state

    _nan_step_keeps_state(
        "sophia",
        "Sophia: non-finite curvature estimate",
        estimator=estimator,
        curvature_upd_interval=1,
    )
