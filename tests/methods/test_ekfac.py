"""EKFAC theorems: the update is the inverse of the dense KFE representation applied to g."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.fisher_oracles import (
    block_ids,
    capture_io,
    conv_io,
    damped_solve,
    dense_emp_fisher,
    kfe_direction,
    linear_io,
    restrict,
)
from tests.helpers import ConvBN, dense_ggn, flat_grad
from torch import nn

from precond import make_gradient_maker
from precond.methods.ekfac import EkfacConfig, reproject_scale

LAM = 1e-2


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _step(gm, model, x, t, loss=F.cross_entropy):
    d = gm.setup_model_call(model, x)
    gm.setup_loss_call(loss, d, t)
    model.zero_grad()
    gm.forward_and_backward()


def _canonical_grad(linear):
    return torch.cat(
        [linear.weight.grad.reshape(linear.weight.shape[0], -1), linear.bias.grad[:, None]], 1
    )


def test_mlp_equals_inverse_of_dense_kfe_representation():
    """Both layers: (Q diag(s) Qᵀ + λI)⁻¹ g with Q, s built densely from the batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, t = torch.randn(16, 4), torch.randint(0, 3, (16,))
    n = x.shape[0]
    io = capture_io(model, [model[0], model[2]], lambda: F.cross_entropy(model(x), t), n**0.5)
    wants = []
    for layer, (inp, gy) in zip([model[0], model[2]], io):
        a_in, g_out = linear_io(inp, gy)
        wants.append(kfe_direction(a_in, g_out, _canonical_grad(layer), LAM)[0])
    gm = make_gradient_maker("ekfac", model, curvature="fisher_emp", damping=LAM)
    _step(gm, model, x, t)
    for layer, want in zip([model[0], model[2]], wants):
        torch.testing.assert_close(_canonical_grad(layer), want, rtol=1e-8, atol=1e-10)


def test_convolution_scaling_uses_exact_per_example_jacobians():
    """Weight sharing: K-FAC-expand factors, scaling from Σ_s g ãᵀ per example."""
    torch.manual_seed(0)
    model = ConvBN().eval()
    x, t = torch.randn(5, 2, 6, 6), torch.randint(0, 3, (5,))
    conv = model.conv1
    ((inp, gy),) = capture_io(model, [conv], lambda: F.cross_entropy(model(x), t), 5**0.5)
    a_in, g_out = conv_io(conv, inp, gy)
    want, *_ = kfe_direction(a_in, g_out, _canonical_grad(conv), LAM)
    gm = make_gradient_maker("ekfac", model, curvature="fisher_emp", damping=LAM)
    _step(gm, model, x, t)
    torch.testing.assert_close(_canonical_grad(conv), want, rtol=1e-8, atol=1e-10)


def test_chunked_scaling_equals_the_curvature_toolkit(monkeypatch):
    from precond.curvature import fisher
    from precond.methods import ekfac

    torch.manual_seed(0)
    model = ConvBN().eval()
    x, t = torch.randn(5, 2, 6, 6), torch.randint(0, 3, (5,))
    gm = make_gradient_maker("ekfac", model, curvature="fisher_exact")
    captured = {}
    original = ekfac._chunked_kfe_scale

    def spy(a, g, block, **kw):
        if block is gm.blocks["conv1"]:
            captured["args"] = (a, g, block, kw)
        return original(a, g, block, **kw)

    monkeypatch.setattr(ekfac, "CHUNK_NUMEL", 100)  # several chunks of examples
    monkeypatch.setattr(ekfac, "_chunked_kfe_scale", spy)
    orig_update = gm.update_curvature

    def update(stats):
        captured["stats"] = stats["conv1"]
        orig_update(stats)

    gm.update_curvature = update
    _step(gm, model, x, t)
    a, g, block, kw = captured["args"]
    assert kw == {"bias": True}  # conv1 trains its bias: inputs without the ones column
    want = fisher.kfe_scale(captured["stats"], "fisher_exact", block.rotate)
    torch.testing.assert_close(original(a, g, block, **kw), want, rtol=1e-10, atol=1e-12)
    with_ones = captured["stats"].a()
    torch.testing.assert_close(original(with_ones, g, block), want, rtol=1e-10, atol=1e-12)


def test_one_datum_one_layer_equals_exact_natural_gradient():
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    x, t = torch.randn(1, 5), torch.randint(0, 4, (1,))
    model.zero_grad()
    F.cross_entropy(model(x), t).backward()
    want = damped_solve(dense_ggn(model, F.cross_entropy, x, t), LAM, flat_grad(model))
    gm = make_gradient_maker("ekfac", model, curvature="fisher_exact", damping=LAM)
    _step(gm, model, x, t)
    torch.testing.assert_close(flat_grad(model), want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_has_identity_input_basis_and_sparse_scaling(padding_idx):
    # tokens repeat within examples (their Jacobian columns add before squaring); the padding
    # token, where there is one, has no gradient and no statistics
    torch.manual_seed(0)
    emb = nn.Embedding(7, 4, padding_idx=padding_idx)
    model = nn.Sequential(emb, nn.Flatten(), nn.Linear(12, 3))
    x, t = torch.randint(0, 5, (6, 3)), torch.randint(0, 3, (6,))  # tokens 5, 6 never occur
    ((inp, gy),) = capture_io(model, [emb], lambda: F.cross_entropy(model(x), t), 6**0.5)
    a_in = F.one_hot(inp, 7).to(torch.float64)  # [N, S, V]
    if padding_idx is not None:
        assert bool((inp == padding_idx).any())
        a_in[..., padding_idx] = 0.0
    grad = emb.weight.grad.T.clone()  # canonical W̃ = Wᵀ: [d_out, V]
    gm = make_gradient_maker("ekfac", model, curvature="fisher_emp", damping=LAM)
    _step(gm, model, x, t)
    block = gm.blocks["0"]
    freq = a_in.sum(dim=(0, 1)) / inp.numel()
    torch.testing.assert_close(gm.factors["0"]["a"], freq.unsqueeze(0))
    torch.testing.assert_close(gm.factors["0"]["b"][0], torch.einsum("nso,nsp->op", gy, gy))
    want, *_ = kfe_direction(a_in, gy, grad, LAM, qa=torch.eye(7))
    torch.testing.assert_close(emb.weight.grad.T, want, rtol=1e-8, atol=1e-10)
    assert torch.equal(block.scale[0, :, 5:], torch.zeros(4, 2))


@pytest.mark.parametrize("norm_shape", ["unit_wise", "diag"])
def test_norm_layers_use_unit_or_diagonal_blocks_of_the_fisher(norm_shape):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    x, t = torch.randn(8, 4), torch.randint(0, 3, (8,))
    fisher = dense_emp_fisher(model, F.cross_entropy, x, t)
    model.zero_grad()
    F.cross_entropy(model(x), t).backward()
    g = flat_grad(model)
    gm = make_gradient_maker(
        "ekfac", model, curvature="fisher_emp", damping=LAM, norm_shape=norm_shape
    )
    _step(gm, model, x, t)
    norm = next(layer for layer in gm.layers if layer.name == "1")
    want = damped_solve(restrict(fisher, block_ids(model, [norm], norm_shape)), LAM, g)
    sl = slice(4 * 5 + 5, 4 * 5 + 5 + 10)
    torch.testing.assert_close(flat_grad(model)[sl], want[sl], rtol=1e-8, atol=1e-10)


def test_basis_follows_the_preconditioner_schedule_and_scale_the_curvature_schedule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
    gm = make_gradient_maker(
        "ekfac", model, curvature="fisher_emp", damping=LAM, preconditioner_upd_interval=2
    )
    _step(gm, model, *batches[0])
    qa0, qb0 = gm.blocks["2"].qa.clone(), gm.blocks["2"].qb.clone()
    x, t = batches[1]
    ((inp, gy),) = capture_io(model, [model[2]], lambda: F.cross_entropy(model(x), t), 16**0.5)
    grad = _canonical_grad(model[2])
    _step(gm, model, x, t)  # step 1: curvature update, no refresh
    assert torch.equal(gm.blocks["2"].qb, qb0)
    a_in, g_out = linear_io(inp, gy)
    want, *_ = kfe_direction(a_in, g_out, grad, LAM, qa=qa0[0], qb=qb0[0])
    torch.testing.assert_close(_canonical_grad(model[2]), want, rtol=1e-8, atol=1e-10)


def test_reprojected_scale_is_the_diagonal_of_the_old_matrix_in_the_new_basis():
    torch.manual_seed(0)

    def orth(n):
        return torch.linalg.qr(torch.randn(1, n, n))[0]

    old, new = (orth(3), orth(2)), (orth(3), orth(2))
    s = torch.rand(1, 2, 3)
    q_old = torch.kron(old[1][0], old[0][0])
    q_new = torch.kron(new[1][0], new[0][0])
    dense = q_old @ torch.diag(s.reshape(-1)) @ q_old.T
    want = torch.diagonal(q_new.T @ dense @ q_new).reshape(1, 2, 3)
    torch.testing.assert_close(reproject_scale(s, old, new), want)


def test_ema_of_scale_survives_a_basis_change_without_curvature_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    gm = make_gradient_maker(
        "ekfac",
        model,
        curvature="fisher_emp",
        ema_decay=0.5,
        curvature_upd_interval=2,
        preconditioner_upd_interval=3,
    )
    for step in range(4):
        x, t = torch.randn(16, 4), torch.randint(0, 3, (16,))
        if step == 3:  # refresh without a curvature update: the scale is carried over
            block = gm.blocks["2"]
            before = block.to_dense().clone()
        _step(gm, model, x, t)
    after = block.to_dense()
    q = torch.kron(block.qb[0], block.qa[0])
    torch.testing.assert_close(torch.diagonal(q.T @ after @ q), torch.diagonal(q.T @ before @ q))


def test_refreshes_without_new_statistics_do_not_refactorise(monkeypatch):
    import precond.linalg.blocks as blocks

    calls = []
    original = blocks.eigh_psd
    monkeypatch.setattr(blocks, "eigh_psd", lambda m: calls.append(1) or original(m))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    gm = make_gradient_maker(
        "ekfac", model, curvature_upd_interval=3, preconditioner_upd_interval=1
    )
    per_step = []
    for _ in range(6):
        calls.clear()
        _step(gm, model, torch.randn(8, 4), torch.randint(0, 3, (8,)))
        per_step.append(len(calls))
    assert per_step == [4, 0, 0, 4, 0, 0]  # two factors per layer, on curvature steps only


def test_non_finite_statistics_are_skipped_with_a_warning(monkeypatch):
    from precond.curvature import fisher
    from precond.numerics import NumericalWarning

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    gm = make_gradient_maker("ekfac", model, curvature="fisher_emp")
    _step(gm, model, torch.randn(8, 4), torch.randint(0, 3, (8,)))
    before = gm.blocks["0"].to_dense().clone()
    monkeypatch.setattr(
        fisher, "kron_input_factor", lambda st, sharing: torch.full((1, 5, 5), float("nan"))
    )
    with pytest.warns(NumericalWarning, match="EKFAC: non-finite statistics for layer"):
        _step(gm, model, torch.randn(8, 4), torch.randint(0, 3, (8,)))
    assert torch.isfinite(flat_grad(model)).all()
    torch.testing.assert_close(gm.blocks["0"].to_dense(), before)


def test_cost_model_lists_eigendecompositions_on_refresh():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    gm = make_gradient_maker("ekfac", model)
    _step(gm, model, torch.randn(8, 4), torch.randint(0, 3, (8,)))
    cm = gm.cost_model()
    assert sum(op.kind == "eigh" and op.phase.value == "refresh" for op in cm.ops) == 4
    assert cm.state_numel == 2 * (25 + 36) + 30 + 2 * (49 + 9) + 21
    averages = {
        op.shape for op in cm.ops if op.kind == "elementwise" and op.phase.value == "curvature"
    }
    assert (25 + 36 + 30,) not in averages  # ema_decay 0: the new statistics replace the old
    gm.config.ema_decay = 0.5
    averages = {op.shape for op in gm.cost_model().ops if op.kind == "elementwise"}
    assert (25 + 36 + 30,) in averages and (49 + 9 + 21,) in averages  # A, B and the scaling


CONFIG_ERRORS = [
    (dict(norm_shape="kron"), r"Invalid norm_shape: 'kron'. Supported: \('unit_wise', 'diag'\)."),
    (dict(curvature="hessian"), r"Invalid curvature: 'hessian'. This method builds its curvature"),
    (dict(n_mc_samples=0), r"Invalid n_mc_samples: 0. Must be >= 1."),
]


@pytest.mark.parametrize("kwargs,match", CONFIG_ERRORS)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EkfacConfig(**kwargs)


def test_scaling_from_input_chunks_equals_the_whole_batch(monkeypatch):
    import precond.capture.stats as stats_module

    x, t = torch.randn(5, 2, 6, 6), torch.randint(0, 3, (5,))
    scales = []
    for chunk_numel in (1 << 20, 1):  # one chunk; one example per chunk
        monkeypatch.setattr(stats_module, "CHUNK_NUMEL", chunk_numel)
        torch.manual_seed(0)
        model = ConvBN().eval()
        gm = make_gradient_maker("ekfac", model, curvature="fisher_exact")
        _step(gm, model, x, t)
        scales.append(gm.blocks["conv1"].scale.clone())
    torch.testing.assert_close(scales[1], scales[0], rtol=1e-10, atol=1e-12)


def test_cost_model_of_an_embedding_uses_its_identity_input_basis():
    # One-hot inputs: diagonal A, identity input basis; only B (3 x 3) is decomposed and only
    # Q_B rotates (a dense vocabulary-order eigh priced a floor twice the step).
    from tests.methods.test_kfac import _Tagger

    torch.manual_seed(0)
    model = _Tagger()
    gm = make_gradient_maker("ekfac", model)
    _step(gm, model, torch.randint(0, 40, (6, 5)), torch.randint(0, 4, (6,)))
    cm = gm.cost_model()
    emb = [op for op in cm.ops if 40 in op.shape and op.kind != "elementwise"]
    assert [(op.phase.value, op.kind, op.shape, op.count) for op in emb] == [
        ("apply", "bmm", (1, 3, 3, 40), 2)
    ]
    eighs = sorted(op.shape for op in cm.ops if op.kind == "eigh")
    assert eighs == [(1, 3), (1, 4), (1, 16)]
    kinds = {(op.phase.value, op.kind, op.shape) for op in cm.ops}
    assert ("curvature", "matmul", (30, 3, 3)) in kinds  # 30 tokens' output gradients rotated
    head = 2 * (16 * 16 + 4 * 4) + 4 * 16
    assert cm.state_numel == head + 2 * (40 + 3 * 3) + 3 * 40
