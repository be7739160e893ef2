"""SOAP theorems: Adam on the gradient rotated into the eigenbases of Shampoo's factors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from precond import make_gradient_maker
from precond.methods.soap import SoapConfig, SoapGradientMaker
from precond.numerics import NumericalWarning


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _batches(n_steps, d_in, d_out, n=8):
    return [(torch.randn(n, d_in), torch.randn(n, d_out)) for _ in range(n_steps)]


def _run(model, batches, **options):
    """SOAP directions and plain gradients per step (parameters are not updated).

    The loss is MSE so that the gradients have no structural null space (cross-entropy
    gradients satisfy 1ᵀG = 0): with a factor whose null space has dimension > 1, its
    eigenbasis, and hence Adam in it, is not unique.
    """
    gm = make_gradient_maker("soap", model, **options)
    out, plain = [], []
    for x, t in batches:
        model.zero_grad()
        F.mse_loss(model(x), t).backward()
        plain.append({k: p.grad.clone() for k, p in model.named_parameters()})
        model.zero_grad()
        d = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.mse_loss, d, t)
        gm.forward_and_backward()
        out.append({k: p.grad.clone() for k, p in model.named_parameters()})
    return out, plain, gm


def _eigenbasis(m):
    return torch.linalg.eigh(m)[1].flip(-1)  # descending eigenvalues


def _power_step(stat, basis):
    """The paper's refresh of one side: sort by diag(Qᵀ L Q) (descending), then QR(L Q)."""
    order = torch.argsort(torch.diag(basis.T @ stat @ basis), descending=True)
    return torch.linalg.qr(stat @ basis[:, order]).Q, order


def _dense_soap(grads, *, betas, eps, shampoo_beta, refresh_every, trace=None):
    """Dense SOAP for one matrix: M in original coordinates, V rotated and permuted on refresh."""
    b1, b2 = betas
    m, n = grads[0].shape
    left, right = torch.zeros(m, m), torch.zeros(n, n)
    ql = qr = None
    mom, var, t = torch.zeros(m, n), torch.zeros(m, n), 0
    outs = []
    for step, g in enumerate(grads):
        if ql is None:
            outs.append(torch.zeros(m, n))  # the paper skips the first step
        else:
            mom = b1 * mom + (1 - b1) * g
            g_rot = ql.T @ g @ qr  # rotate the gradient into the eigenbases
            var = b2 * var + (1 - b2) * g_rot**2  # Adam's second moment, rotated coordinates
            t += 1
            m_rot = ql.T @ mom @ qr
            n_rot = (m_rot / (1 - b1**t)) / ((var / (1 - b2**t)).sqrt() + eps)
            outs.append(ql @ n_rot @ qr.T)  # rotate back
        left = shampoo_beta * left + (1 - shampoo_beta) * g @ g.T
        right = shampoo_beta * right + (1 - shampoo_beta) * g.T @ g
        if step % refresh_every == 0:
            if ql is None:
                ql, qr = _eigenbasis(left), _eigenbasis(right)
            else:
                ql, order_l = _power_step(left, ql)
                qr, order_r = _power_step(right, qr)
                var = var[order_l][:, order_r]
        if trace is not None:
            trace.append((mom.clone(), var.clone(), ql, qr))
    return outs


OPTS = {"betas": (0.9, 0.95), "eps": 1e-8, "shampoo_beta": 0.9}


def test_adam_in_a_fixed_eigenbasis():
    torch.manual_seed(0)
    model = nn.Linear(4, 4, bias=False)
    out, plain, gm = _run(model, _batches(5, 4, 4), preconditioner_upd_interval=100, **OPTS)
    want = _dense_soap([g["weight"] for g in plain], refresh_every=100, **OPTS)
    for step in range(5):
        torch.testing.assert_close(out[step]["weight"], want[step], rtol=1e-8, atol=1e-12)
    assert torch.equal(out[0]["weight"], torch.zeros(4, 4))


def test_basis_refresh_rotates_the_first_moment_and_permutes_the_second():
    torch.manual_seed(0)
    model = nn.Linear(5, 4, bias=False)
    out, plain, gm = _run(model, _batches(7, 5, 4), preconditioner_upd_interval=2, **OPTS)
    trace = []
    want = _dense_soap([g["weight"] for g in plain], refresh_every=2, trace=trace, **OPTS)
    for step in range(7):
        torch.testing.assert_close(out[step]["weight"], want[step], rtol=1e-8, atol=1e-12)
    mom, var, ql, qr = trace[-1]
    # both moments are stored rotated: M' = Q_Lᵀ M Q_R for the current bases
    torch.testing.assert_close(ql @ gm.exp_avg[0][0] @ qr.T, mom, rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(gm.exp_avg_sq[0][0], var, rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(gm.bases[0][0][0], ql, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gm.bases[0][1][0], qr, rtol=1e-8, atol=1e-10)


def test_first_basis_diagonalises_the_factors():
    torch.manual_seed(0)
    model = nn.Linear(5, 4, bias=False)
    _, _, gm = _run(model, _batches(1, 5, 4))
    for stat, basis in zip(gm.stats[0], gm.bases[0]):
        rotated = basis[0].T @ stat[0] @ basis[0]
        diag = torch.diagonal(rotated)
        torch.testing.assert_close(rotated, torch.diag(diag), rtol=0, atol=1e-12)
        assert (diag[:-1] >= diag[1:] - 1e-12).all()


def test_vectors_run_plain_adam_from_the_first_step():
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    out, plain, _ = _run(model, _batches(4, 5, 4), **OPTS)
    bias = nn.Parameter(torch.zeros(4))
    adam = torch.optim.Adam([bias], lr=1.0, betas=OPTS["betas"], eps=OPTS["eps"])
    for step in range(4):
        before = bias.detach().clone()
        bias.grad = plain[step]["bias"].clone()
        adam.step()
        torch.testing.assert_close(out[step]["bias"], before - bias.detach(), rtol=1e-9, atol=1e-12)
    assert torch.equal(out[0]["weight"], torch.zeros(4, 5))


def test_precondition_1d_gives_vectors_an_eigenbasis():
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    _, _, gm = _run(model, _batches(2, 5, 4), precondition_1d=True)
    shapes = {
        g.shape: [tuple(s.shape) for s in stats] for g, stats in zip(gm.layout.groups, gm.stats)
    }
    assert shapes == {(4, 5): [(1, 4, 4), (1, 5, 5)], (4,): [(1, 4, 4)]}
    assert all(b is not None for bases in gm.bases for b in bases)


def test_conv_kernels_are_merged_and_blocked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 2), nn.Flatten(), nn.Linear(36, 3))
    gm = SoapGradientMaker(model, SoapConfig(block_size=8))
    groups = {g.shape: g.size for g in gm.layout.groups}
    # conv [4, 3, 2, 2] -> [4, 12] -> blocks [4, 8] + [4, 4]; linear [3, 36] -> 4x[3, 8] + [3, 4]
    assert groups == {(4, 8): 1, (4, 4): 1, (4,): 1, (3, 8): 4, (3, 4): 1, (3,): 1}
    x, t = torch.randn(6, 3, 4, 4), torch.randint(0, 3, (6,))
    for _ in range(3):
        model.zero_grad()
        d = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, d, t)
        gm.forward_and_backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.timeout(60)
def test_batched_qr_refresh_of_large_factors_completes():
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 256))
    gm = SoapGradientMaker(model)
    x = torch.randn(32, 256)
    for _ in range(2):  # eigh on step 0, batched QR of four 256 x 256 factors on step 1
        model.zero_grad()
        d = gm.setup_model_call(model, x)
        gm.setup_loss_call(lambda y: y.square().mean(), d)
        gm.forward_and_backward()
    for qs in gm.bases:
        for q in qs:
            eye = torch.eye(q.shape[-1]).expand_as(q)
            torch.testing.assert_close(q.mT @ q, eye, rtol=0, atol=1e-4)


def test_qr_failure_falls_back_to_eigh(monkeypatch):
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False)
    batches = _batches(2, 4, 3)

    def broken(*args, **kwargs):
        raise RuntimeError("qr failed")

    monkeypatch.setattr(torch, "geqrf", broken)
    with pytest.warns(NumericalWarning, match="QR power step failed"):
        _, _, gm = _run(model, batches)
    for stat, basis in zip(gm.stats[0], gm.bases[0]):
        rotated = basis[0].T @ stat[0] @ basis[0]
        torch.testing.assert_close(rotated, torch.diag(torch.diagonal(rotated)), rtol=0, atol=1e-12)


def test_cost_model_lists_rotations_and_qr_refreshes():
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 4))
    cm = SoapGradientMaker(model).cost_model()
    kinds = {(op.phase.value, op.kind, op.shape, op.count) for op in cm.ops}
    assert ("curvature", "bmm", (1, 4, 6, 4), 1) in kinds
    assert ("curvature", "elementwise", (36,), 1) in kinds  # R's moving average (6 x 6)
    assert ("refresh", "qr", (3, 4), 1) in kinds
    assert ("apply", "bmm", (1, 6, 4, 4), 2) in kinds
    assert cm.state_numel == 2 * (24 + 4 + 16 + 4) + 2 * (16 + 36 + 16 + 16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"betas": (0.9,)},
            r"Invalid betas: \(0\.9,\)\. Must be a pair \(beta1, beta2\) of numbers in \[0, 1\)\.",
        ),
        ({"betas": (0.9, 1.0)}, r"Invalid betas: \(0\.9, 1\.0\)\. Must be a pair"),
        ({"eps": 0.0}, r"Invalid eps: 0\.0\. Must be > 0\.0\."),
        ({"shampoo_beta": 1.0}, r"Invalid shampoo_beta: 1\.0\. Must be >= 0\.0 and < 1\.0\."),
        ({"correct_bias": 1}, r"Invalid correct_bias: 1\. Must be True or False\."),
        ({"precondition_1d": "yes"}, r"Invalid precondition_1d: 'yes'\. Must be True or False\."),
        ({"merge_dims": 0}, r"Invalid merge_dims: 0\. Must be >= 1\."),
        ({"block_size": 0}, r"Invalid block_size: 0\. Must be >= 1\."),
        (
            {"ema_decay": 0.5},
            r"Invalid ema_decay: 0\.5\. SOAP does not use it; set shampoo_beta \(statistics\) or betas \(Adam\) instead\.",
        ),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SoapConfig(**kwargs)


def test_non_finite_gradient_leaves_moments_steps_and_statistics_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    # No refresh on the bad step, so the moments are not rotated into a new basis either.
    gm = SoapGradientMaker(model, SoapConfig(preconditioner_upd_interval=10))
    x, t = torch.randn(6, 5), torch.randn(6, 3)

    def step(inp):
        model.zero_grad()
        d = gm.setup_model_call(model, inp)
        gm.setup_loss_call(F.mse_loss, d, t)
        gm.forward_and_backward()

    step(x)
    step(x)  # the first step has no basis yet; this one fills the moments
    before = gm.preconditioner_state_dict()
    assert any(bool(m.abs().sum() > 0) for m in before["exp_avg"])
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.warns(NumericalWarning, match="SOAP: non-finite gradient statistics"):
        step(bad)
    after = gm.preconditioner_state_dict()
    for key in ("exp_avg", "exp_avg_sq", "adam_steps"):
        assert all(torch.equal(a, b) for a, b in zip(before[key], after[key])), key
    for old, new in zip(before["stats"], after["stats"]):
        assert all(torch.equal(a, b) for a, b in zip(old, new))
    step(x)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_moment_guard_is_per_block():
    # Two blocks of one group: a NaN in one block's gradient leaves only its moments alone.
    torch.manual_seed(0)
    model = nn.Linear(3, 6, bias=False)
    gm = SoapGradientMaker(model, SoapConfig(block_size=3, preconditioner_upd_interval=10))
    x, t = torch.randn(8, 3), torch.randn(8, 6)
    for _ in range(2):
        model.zero_grad()
        d = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.mse_loss, d, t)
        gm.forward_and_backward()
    (m0,), (s0,) = [m.clone() for m in gm.exp_avg], [s.clone() for s in gm.adam_steps]
    assert m0.shape[0] == 2
    g = torch.randn(6, 3)
    g[0, 0] = float("nan")  # rows 0-2 form block 0, rows 3-5 block 1
    model.weight.grad = g.clone()
    gm.precondition()
    assert torch.equal(gm.exp_avg[0][0], m0[0])
    assert not torch.equal(gm.exp_avg[0][1], m0[1])
    assert gm.adam_steps[0].tolist() == [s0[0].item(), s0[1].item() + 1]
