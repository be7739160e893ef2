"""SENG theorems: without a sketch it is the layer-wise dense SMW solve; the scaling rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.fisher_oracles import (
    block_ids,
    canonical_index,
    capture_io,
    conv_io,
    damped_solve,
    dense_emp_fisher,
    restrict,
)
from tests.helpers import ConvBN, SeqModel, flat_grad
from torch import nn

from precond import make_gradient_maker
from precond.methods.per_example import DenseRows, FactorRows, PairRows
from precond.methods.seng import SengConfig

LAM = 1e-2


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _seq_loss(z, t):
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), t.reshape(-1))


def _problem(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        return model, torch.randn(6, 6), torch.randint(0, 3, (6,)), F.cross_entropy, 1
    if kind == "cnn":
        model = ConvBN().eval()
        return model, torch.randn(4, 2, 6, 6), torch.randint(0, 3, (4,)), F.cross_entropy, 1
    model = SeqModel()
    return model, torch.randint(0, 7, (3, 5)), torch.randint(0, 4, (3, 5)), _seq_loss, 5


def _step(gm, model, x, t, loss):
    d = gm.setup_model_call(model, x)
    if loss is _seq_loss:
        gm.setup_loss_call(F.cross_entropy, d.view(-1, d.size(-1)), t.view(-1))
    else:
        gm.setup_loss_call(loss, d, t)
    model.zero_grad()
    gm.forward_and_backward()
    return flat_grad(model)


def _plain_grad(model, x, t, loss):
    model.zero_grad()
    loss(model(x), t).backward()
    return flat_grad(model)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
@pytest.mark.parametrize("lowrank_threshold", [100_000, 0], ids=["explicit", "factored"])
def test_without_sketch_equals_layerwise_damped_empirical_natural_gradient(kind, lowrank_threshold):
    """No sketch, no truncation (rank ≥ positions): exactly (λI + F_emp,l)⁻¹ g_l per layer."""
    model, x, t, loss, rows = _problem(kind)
    fisher = dense_emp_fisher(model, loss, x, t, rows)
    g = _plain_grad(model, x, t, loss)
    gm = make_gradient_maker(
        "seng",
        model,
        damping=LAM,
        sketch_size=None,
        lowrank_threshold=lowrank_threshold,
        truncated_rank=64,
    )
    got = _step(gm, model, x, t, loss)
    want = damped_solve(restrict(fisher, block_ids(model, gm.layers, "layer_wise")), LAM, g)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_a_gram_of_padded_order_gives_the_same_damped_solve():
    """256 examples: the Gram matrices' order is one that a CPU factorises at order 272."""
    from precond.linalg.solvers import CPU_PAD_AVOID, padded_order

    torch.manual_seed(0)
    n = CPU_PAD_AVOID
    assert padded_order(n, "cpu") == n + 16
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x, t = torch.randn(n, 4), torch.randint(0, 2, (n,))
    fisher = dense_emp_fisher(model, F.cross_entropy, x, t, 1)
    g = _plain_grad(model, x, t, F.cross_entropy)
    gm = make_gradient_maker("seng", model, damping=LAM, sketch_size=None)
    got = _step(gm, model, x, t, F.cross_entropy)
    assert all(c.shape == (n, n) for c in gm.chol.values()) and gm.chol
    want = damped_solve(restrict(fisher, block_ids(model, gm.layers, "layer_wise")), LAM, g)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_truncated_factors_equal_the_best_rank_r_approximation_of_output_gradients():
    """Low-rank regime: U rows are (U_r Σ_r V_rᵀ of G_n) A_nᵀ, then an exact Woodbury solve."""
    model, x, t, loss, _ = _problem("cnn")
    conv, n, rank = model.conv1, x.shape[0], 3
    ((inp, gy),) = capture_io(model, [conv], lambda: loss(model(x), t), n**0.5)
    a_in, g_out = conv_io(conv, inp, gy)  # [N, S, d_in'], [N, S, d_out]
    u, s, vh = torch.linalg.svd(g_out.transpose(1, 2), full_matrices=False)  # G_n = [d_out, S]
    g_low = u[..., :rank] @ torch.diag_embed(s[..., :rank]) @ vh[..., :rank, :]
    jac = (g_low @ a_in).reshape(n, -1)  # J_n ≈ G_n,r A_nᵀ
    grad = torch.cat([conv.weight.grad.reshape(4, -1), conv.bias.grad[:, None]], 1)
    want = damped_solve(jac.T @ jac, LAM, grad.reshape(-1)).reshape(grad.shape)
    gm = make_gradient_maker(
        "seng", model, damping=LAM, sketch_size=None, lowrank_threshold=0, truncated_rank=rank
    )
    _step(gm, model, x, t, loss)
    assert isinstance(gm.rows["conv1"], FactorRows) and gm.rows["conv1"].g.shape[-1] == rank
    got = torch.cat([conv.weight.grad.reshape(4, -1), conv.bias.grad[:, None]], 1)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_layers_below_min_size_take_the_damped_model_step_along_their_gradient():
    """α = ‖g‖² / gᵀ(F_l + λI)g for the unpreconditioned layer, exact SMW for the other."""
    model, x, t, loss, _ = _problem("mlp")  # layer sizes 56 and 27
    fisher = dense_emp_fisher(model, loss, x, t)
    g = _plain_grad(model, x, t, loss)
    lam = 0.5
    gm = make_gradient_maker("seng", model, damping=lam, sketch_size=None, min_layer_size=30)
    got = _step(gm, model, x, t, loss)
    assert gm.scaled_layers == {"2"} and "2" not in gm.chol
    pre, post = slice(0, 56), slice(56, 83)
    want_pre = damped_solve(fisher[pre, pre], lam, g[pre])
    torch.testing.assert_close(got[pre], want_pre, rtol=1e-8, atol=1e-10)
    gl, fl = g[post], fisher[post, post]
    alpha = gl.dot(gl) / (gl @ fl @ gl + lam * gl.dot(gl))
    torch.testing.assert_close(got[post], alpha * gl, rtol=1e-10, atol=1e-12)
    evals = torch.linalg.eigvalsh(fl + lam * torch.eye(27))
    assert 1 / evals[-1] <= alpha <= 1 / evals[0]
    # The step matches the preconditioned layers' scale: α·g is the minimiser of the layer's
    # damped quadratic model along g, never the plain gradient.
    step = alpha * gl
    model_value = 0.5 * step @ (fl + lam * torch.eye(27)) @ step - gl @ step
    for other in (0.9 * alpha, 1.1 * alpha, 1.0):
        s2 = other * gl
        assert model_value <= 0.5 * s2 @ (fl + lam * torch.eye(27)) @ s2 - gl @ s2


@pytest.mark.parametrize("min_layer_size", [0, 30], ids=["solved", "scaled"])
def test_gram_damping_scale_is_relative_to_each_layers_mean_per_example_fisher_trace(
    min_layer_size,
):
    """damping_scale="gram": λ_l = damping · tr(F_l)/N per layer, in the solve and in α_l."""
    model, x, t, loss, _ = _problem("mlp")  # layer sizes 56 and 27
    fisher = dense_emp_fisher(model, loss, x, t)
    g = _plain_grad(model, x, t, loss)
    gm = make_gradient_maker(
        "seng",
        model,
        damping=LAM,
        sketch_size=None,
        damping_scale="gram",
        min_layer_size=min_layer_size,
    )
    got = _step(gm, model, x, t, loss)
    n = x.shape[0]
    for name, sl in (("0", slice(0, 56)), ("2", slice(56, 83))):
        fl, gl = fisher[sl, sl], g[sl]
        lam = LAM * float(torch.trace(fl)) / n
        assert gm.lam[name] == pytest.approx(lam, rel=1e-10)
        if name in gm.chol:
            want = damped_solve(fl, lam, gl)
        else:
            want = gl.dot(gl) / (gl @ fl @ gl + lam * gl.dot(gl)) * gl
        torch.testing.assert_close(got[sl], want, rtol=1e-8, atol=1e-10)
    assert ("2" in gm.chol) == (min_layer_size == 0)


@pytest.mark.parametrize("kind", ["mlp", "seq"])
def test_subsample_uses_the_seeded_subset_rescaled(kind):
    model, x, t, loss, rows = _problem(kind)
    n, seed = x.shape[0], 11
    m = n - 1 if kind == "seq" else 4
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m].sort().values
    fisher = dense_emp_fisher(model, loss, x[idx], t[idx], rows)  # (1/m) Σ over the subset
    g = _plain_grad(model, x, t, loss)
    gm = make_gradient_maker(
        "seng", model, damping=LAM, sketch_size=None, subsample_size=m, seed=seed
    )
    got = _step(gm, model, x, t, loss)
    want = damped_solve(restrict(fisher, block_ids(model, gm.layers, "layer_wise")), LAM, g)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def _all_pairs(j):
    """PairRows of dense one-group Jacobians ``[M, 1, d_out, V]``: every (example, token)."""
    m, _, d, vocab = j.shape
    pairs = j[:, 0].permute(0, 2, 1).reshape(m * vocab, d)
    example = torch.arange(m).repeat_interleave(vocab)
    return PairRows(pairs, example, torch.arange(vocab).repeat(m), m, vocab)


@pytest.mark.parametrize("form", ["dense", "factor", "pairs"])
def test_sketched_gram_and_products_are_unbiased(form):
    torch.manual_seed(0)
    g, a = torch.randn(4, 1, 6, 1), torch.randn(4, 1, 5, 1)
    j = torch.einsum("mgor,mgir->mgoi", g, a)
    v = torch.randn(1, 6, 5)
    flat = j.reshape(4, -1)
    gen = torch.Generator().manual_seed(0)
    grams, dots = [], []
    for _ in range(4000):
        if form == "pairs":
            rows = _all_pairs(j)
        else:
            rows = DenseRows(j) if form == "dense" else FactorRows(g, a)
        rows.sketch(3 if form == "factor" else 9, gen)
        grams.append(rows.gram())
        dots.append(rows.dot(v))
        torch.testing.assert_close(rows.combine(torch.ones(4)), j.sum(0))  # never sketched
    scale = flat.abs().max() ** 2
    torch.testing.assert_close(
        torch.stack(grams).mean(0) / scale, flat @ flat.T / scale, atol=0.05, rtol=0
    )
    torch.testing.assert_close(
        torch.stack(dots).mean(0) / scale, flat @ v.reshape(-1) / scale, atol=0.05, rtol=0
    )


@pytest.mark.parametrize("split", [(5,), (4, 1), (2, 2, 1)])
def test_sketched_products_of_column_blocks_equal_those_of_the_whole(split):
    """``dot_parts`` restricts each block itself: the same numbers as ``dot`` of the whole."""
    torch.manual_seed(1)
    g, a = torch.randn(4, 2, 6, 2), torch.randn(4, 2, 5, 2)
    v = torch.randn(2, 6, 5)
    rows = FactorRows(g, a)
    rows.sketch(3, torch.Generator().manual_seed(3))
    parts = list(v.split(list(split), dim=-1))
    assert torch.equal(rows.dot_parts(parts), rows.dot(v))
    assert torch.equal(rows.dot_parts(parts), rows.dot_parts(parts))  # cached columns


def test_sketch_is_drawn_from_the_seeded_generator():
    model, x, t, loss, _ = _problem("cnn")

    def run(seed):
        torch.manual_seed(0)
        m = ConvBN().eval()
        gm = make_gradient_maker("seng", m, damping=LAM, sketch_size=4, seed=seed)
        return _step(gm, m, x, t, loss), gm

    g1, gm = run(1)
    g2, _ = run(1)
    g3, _ = run(2)
    assert torch.equal(g1, g2) and not torch.allclose(g1, g3)
    assert gm.rows["conv1"].coords.numel() == 16  # explicit regime: sketch_size² coordinates
    assert torch.isfinite(g1).all()


def test_canonical_index_covers_every_parameter_once():
    model, *_ = _problem("seq")
    gm = make_gradient_maker("seng", model)
    idx = torch.cat([canonical_index(model, layer).reshape(-1) for layer in gm.layers])
    assert torch.equal(idx.sort().values, torch.arange(idx.numel()))


def test_cost_model_batches_the_layer_factorisations():
    model, x, t, loss, _ = _problem("cnn")
    gm = make_gradient_maker("seng", model, damping=LAM, sketch_size=None)
    _step(gm, model, x, t, loss)
    chol = [op for op in gm.cost_model().ops if op.kind == "cholesky"]
    assert [op.shape for op in chol] == [(5, 4)]


CONFIG_ERRORS = [
    (dict(damping=0.0), r"Invalid damping: 0.0. Must be > 0.0."),
    (dict(ema_decay=0.9), r"Invalid ema_decay: 0.9. SENG solves with the current batch's Gram"),
    (dict(subsample_size=0), r"Invalid subsample_size: 0. Must be >= 1."),
    (dict(sketch_size=0), r"Invalid sketch_size: 0. Must be >= 1."),
    (dict(truncated_rank=0), r"Invalid truncated_rank: 0. Must be >= 1."),
    (dict(lowrank_threshold=-1), r"Invalid lowrank_threshold: -1. Must be >= 0."),
    (dict(min_layer_size=1.5), r"Invalid min_layer_size: 1.5. Must be an integer."),
    (
        dict(damping_scale="relative"),
        r"Invalid damping_scale: 'relative'. Supported: \('absolute', 'gram'\).",
    ),
]


@pytest.mark.parametrize("kwargs,match", CONFIG_ERRORS)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SengConfig(**kwargs)


def test_embedding_rows_are_pairs_and_sketch_their_token_coordinates():
    """An embedding's per-example Jacobians are kept as (example, token) pairs; a sketch
    samples sketch_size² coordinates of the batch's tokens (rescaled), the step stays finite
    and is the same for the same seed."""
    model, x, t, loss, _ = _problem("seq")

    def run(seed):
        torch.manual_seed(0)
        m = SeqModel()
        gm = make_gradient_maker("seng", m, damping=LAM, sketch_size=3, seed=seed)
        return _step(gm, m, x, t, loss), gm

    g1, gm = run(1)
    g2, _ = run(1)
    rows = gm.rows["emb"]
    assert isinstance(rows, PairRows)
    assert rows.j.shape[0] <= x.numel() and rows.coords.numel() == 9
    touched = int(torch.unique(x).numel())
    assert rows.scale == pytest.approx((touched * rows.d_out / 9) ** 0.5)
    assert torch.equal(g1, g2) and torch.isfinite(g1).all()
