"""SMW-NG theorems: the Woodbury solve equals the dense empirical-Fisher natural gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.fisher_oracles import damped_solve, dense_emp_fisher
from tests.helpers import ConvBN, SeqModel, flat_grad
from torch import nn

from precond import make_gradient_maker
from precond.methods import rows as rows_module
from precond.methods.per_example import DenseRows, FactorRows, PairRows, load_rows
from precond.methods.rows import low_rank_update_
from precond.methods.smw_ng import SmwEmpNaturalGradientConfig

LAM = 1e-2


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _seq_loss(z, t):
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), t.reshape(-1))


def _problem(kind, n=None):
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        n = n or 6
        return model, torch.randn(n, 6), torch.randint(0, 3, (n,)), F.cross_entropy, 1
    if kind == "mse":
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        return model, torch.randn(7, 6), torch.randn(7, 3), F.mse_loss, 3
    if kind == "cnn":
        model = ConvBN().eval()
        return model, torch.randn(4, 2, 6, 6), torch.randint(0, 3, (4,)), F.cross_entropy, 1
    model = SeqModel(padding_idx=0)
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


@pytest.mark.parametrize("kind", ["mlp", "mse", "cnn", "seq"])
def test_equals_dense_empirical_natural_gradient(kind):
    """(λI + F_emp)⁻¹ g over all layers, F_emp = (1/N) Σ ∇ℓ_n ∇ℓ_nᵀ built from torch.func."""
    model, x, t, loss, rows = _problem(kind)
    want = damped_solve(
        dense_emp_fisher(model, loss, x, t, rows), LAM, _plain_grad(model, x, t, loss)
    )
    gm = make_gradient_maker("smw_ng", model, damping=LAM)
    got = _step(gm, model, x, t, loss)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_gram_damping_scale_is_relative_to_the_mean_per_example_fisher_trace(kind):
    """damping_scale="gram": (λI + F)⁻¹ g with λ = damping · tr(F)/N, N examples (F = UᵀU)."""
    model, x, t, loss, rows = _problem(kind)
    fisher = dense_emp_fisher(model, loss, x, t, rows)
    lam = LAM * float(torch.trace(fisher)) / x.shape[0]
    want = damped_solve(fisher, lam, _plain_grad(model, x, t, loss))
    gm = make_gradient_maker("smw_ng", model, damping=LAM, damping_scale="gram")
    got = _step(gm, model, x, t, loss)
    assert gm.lam == pytest.approx(lam, rel=1e-10)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_more_parameters_than_examples_never_forms_a_parameter_sized_matrix():
    model, x, t, loss, _ = _problem("mlp", n=3)
    gm = make_gradient_maker("smw_ng", model, damping=LAM)
    _step(gm, model, x, t, loss)
    assert gm.chol.shape == (3, 3)
    assert all(isinstance(r, FactorRows) and r.g.shape[-1] == 1 for r in gm.rows.values())


def test_amortised_steps_apply_the_stored_gram_to_the_new_gradient():
    model, x, t, loss, _ = _problem("mlp")
    x2, t2 = torch.randn_like(x), torch.randint(0, 3, t.shape)
    fisher = dense_emp_fisher(model, loss, x, t)
    gm = make_gradient_maker("smw_ng", model, damping=LAM, curvature_upd_interval=2)
    _step(gm, model, x, t, loss)
    want = damped_solve(fisher, LAM, _plain_grad(model, x2, t2, loss))
    torch.testing.assert_close(_step(gm, model, x2, t2, loss), want, rtol=1e-8, atol=1e-10)


def test_non_finite_statistics_keep_the_previous_preconditioner(monkeypatch):
    from precond.methods import smw_ng
    from precond.numerics import NumericalWarning

    model, x, t, loss, _ = _problem("mlp")
    x2, t2 = torch.randn_like(x), torch.randint(0, 3, t.shape)
    fisher = dense_emp_fisher(model, loss, x, t)
    gm = make_gradient_maker("smw_ng", model, damping=LAM)
    _step(gm, model, x, t, loss)
    original = smw_ng.rows_from_stats

    def poisoned(st, tag):
        rows = original(st, tag)
        rows.g = rows.g * float("nan")
        return rows

    monkeypatch.setattr(smw_ng, "rows_from_stats", poisoned)
    with pytest.warns(NumericalWarning, match="SMW-NG: non-finite per-example gradients"):
        got = _step(gm, model, x2, t2, loss)
    want = damped_solve(fisher, LAM, _plain_grad(model, x2, t2, loss))
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_compact_rows_agree_with_explicit_per_example_jacobians():
    torch.manual_seed(0)
    g, a = torch.randn(5, 2, 3, 4), torch.randn(5, 2, 6, 4)  # [M, G, d_out, r], [M, G, d_in, r]
    j = torch.einsum("mgor,mgir->mgoi", g, a)
    dense, factor = DenseRows(j), FactorRows(g, a)
    v, w = torch.randn(2, 3, 6), torch.randn(5)
    flat = j.reshape(5, -1)
    for rows in (dense, factor):
        torch.testing.assert_close(rows.gram(), flat @ flat.T)
        torch.testing.assert_close(rows.dot(v), flat @ v.reshape(-1))
        torch.testing.assert_close(rows.combine(w), (w @ flat).reshape(2, 3, 6))


def _random_pairs(m, d, vocab, per_example, seed=0):
    """Random distinct (example, token) pairs with their columns, and the dense Jacobians."""
    gen = torch.Generator().manual_seed(seed)
    j, example, token = [], [], []
    dense = torch.zeros(m, 1, d, vocab, dtype=torch.float64)
    for n in range(m):
        for v in torch.randperm(vocab, generator=gen)[:per_example].sort().values.tolist():
            col = torch.randn(d, generator=gen, dtype=torch.float64)
            j.append(col)
            example.append(n)
            token.append(v)
            dense[n, 0, :, v] = col
    rows = PairRows(torch.stack(j), torch.tensor(example), torch.tensor(token), m, vocab)
    return rows, dense


@pytest.mark.parametrize("chunk", [1 << 20, 1], ids=["whole", "one_couple_at_a_time"])
@pytest.mark.parametrize("sketch", [None, 7])
def test_pair_rows_agree_with_explicit_per_example_jacobians(monkeypatch, chunk, sketch):
    """PairRows (an embedding's per-example Jacobians as (example, token) pairs) give the
    products of the dense Jacobians; sketched, those of the sampled (token, output) coordinates
    of the batch's tokens, rescaled; and survive a state_dict round trip."""
    import importlib

    monkeypatch.setattr(importlib.import_module("precond.methods.rows"), "PAIR_CHUNK_NUMEL", chunk)
    rows, dense = _random_pairs(m=5, d=3, vocab=11, per_example=3)
    v, w = torch.randn(1, 3, 11, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    touched = torch.unique(rows.token)
    # coordinates (token, output) of the batch's tokens, token-major as the sketch samples them
    flat = dense[:, 0][..., touched].permute(0, 2, 1).reshape(5, -1)
    vec = v[0][:, touched].T.reshape(-1)
    if sketch is not None:
        rows.sketch(sketch, torch.Generator().manual_seed(0))
        scale = (flat.shape[1] / sketch) ** 0.5
        flat = flat[:, rows.coords] * scale
        vec = vec[rows.coords] * scale
    for got in (rows, load_rows(rows.state_dict())):
        torch.testing.assert_close(got.gram(), flat @ flat.T)
        torch.testing.assert_close(got.dot(v), flat @ vec)
        # a combination is never sketched
        torch.testing.assert_close(got.combine(w), torch.einsum("m,mgoi->goi", w, dense))
        parts = [v.clone()]
        got.combine_into(w, parts, alpha=-0.5, beta=2.0)
        torch.testing.assert_close(parts[0], 2.0 * v - 0.5 * torch.einsum("m,mgoi->goi", w, dense))


@pytest.mark.parametrize("sketch", [None, 4])
@pytest.mark.parametrize("form", ["dense", "factor", "factor_grouped", "pairs"])
def test_gram_into_adds_the_gram_matrix_in_place(form, sketch):
    """``gram_into`` (the sum of layers' Gram matrices without a temporary per layer) adds
    exactly what ``gram`` returns, sketched or not, with a coefficient."""
    torch.manual_seed(0)
    if form == "pairs":
        rows = _random_pairs(m=5, d=3, vocab=11, per_example=3)[0]
    elif form == "dense":
        rows = DenseRows(torch.randn(5, 1, 6, 7, dtype=torch.float64))
    else:
        shape = (1, 6, 1) if form == "factor" else (2, 6, 3)
        g = torch.randn(5, *shape, dtype=torch.float64)
        a = torch.randn(5, shape[0], 7, shape[2], dtype=torch.float64)
        rows = FactorRows(g, a, coef=0.3)
    if sketch is not None:
        rows.sketch(sketch, torch.Generator().manual_seed(1))
    start = torch.randn(5, 5, dtype=torch.float64)
    out = start.clone()
    assert rows.gram_into(out) is out
    torch.testing.assert_close(out, start + rows.gram(), rtol=1e-12, atol=1e-12)


def test_factor_coefficient_equals_scaled_output_factors():
    """FactorRows(g, a, coef) is FactorRows(coef·g, a) in every product, sketched or not,
    and survives a state_dict round trip."""
    torch.manual_seed(0)
    g, a = torch.randn(5, 1, 6, 1), torch.randn(5, 1, 7, 1)
    v, w = torch.randn(1, 6, 7), torch.randn(5)
    for sketch in (None, 4):
        rows = []
        for f in (FactorRows(g, a, coef=0.3), FactorRows(g * 0.3, a)):
            if sketch is not None:
                f.sketch(sketch, torch.Generator().manual_seed(1))
            rows.append(f)
        with_coef, scaled = rows
        loaded = load_rows(with_coef.state_dict())
        for r in (with_coef, loaded):
            torch.testing.assert_close(r.gram(), scaled.gram())
            torch.testing.assert_close(r.dot(v), scaled.dot(v))
            torch.testing.assert_close(r.dot(v, sketched=False), scaled.dot(v, sketched=False))
            parts = [v[..., :5], v[..., 5:]]
            torch.testing.assert_close(r.dot_parts(parts), scaled.dot_parts(parts))
            torch.testing.assert_close(r.combine(w), scaled.combine(w))


@pytest.mark.parametrize("sketch", [None, 4, 7])
@pytest.mark.parametrize("d_out, d_in", [(6, 9), (9, 6)])
def test_in_place_block_products_equal_the_whole_matrix_products(sketch, d_out, d_in):
    """dot_parts / combine_into on column blocks (weight, bias; the 2-D path for G = r = 1,
    prepared on refresh) equal dot / combine of the concatenated V, sketched or not."""
    torch.manual_seed(0)
    g, a = torch.randn(5, 1, d_out, 1), torch.randn(5, 1, d_in, 1)
    v, w = torch.randn(1, d_out, d_in), torch.randn(5)
    bias_sampled = set()
    for seed in range(6):  # sketches with and without the bias column
        rows = FactorRows(g, a, coef=0.3)
        if sketch is not None:
            rows.sketch(sketch, torch.Generator().manual_seed(seed))
        rows.prepare([d_in - 1, 1])
        bias_sampled.add(rows.in_rows is None or bool((rows.in_rows == d_in - 1).any()))
        parts = [v[..., :-1].clone(), v[..., -1:].clone()]
        torch.testing.assert_close(rows.dot_parts(parts), rows.dot(v))
        torch.testing.assert_close(
            rows.dot_parts(parts, sketched=False), rows.dot(v, sketched=False)
        )
        rows.combine_into(w, parts, alpha=-0.5, beta=2.0)
        torch.testing.assert_close(torch.cat(parts, -1), 2.0 * v - 0.5 * rows.combine(w))
    assert bias_sampled == ({True} if sketch is None or sketch >= d_in else {True, False})


@pytest.mark.parametrize("width", [6, 7, 9, 784])
def test_low_rank_update_in_column_blocks_equals_one_update(monkeypatch, width):
    """V ← βV + αLR written in column blocks (CPU, widths of UPDATE_BLOCK_WIDTHS) equals one
    addmm; widths outside the range are one update."""
    monkeypatch.setattr(rows_module, "UPDATE_BLOCK_WIDTHS", (7, 784))
    torch.manual_seed(0)
    v, left, right = torch.randn(5, width), torch.randn(5, 3), torch.randn(3, width)
    expected = torch.addmm(v, left, right, beta=0.5, alpha=-2.0)
    low_rank_update_(v, left, right, alpha=-2.0, beta=0.5)
    torch.testing.assert_close(v, expected)


def test_dense_rows_of_an_earlier_one_hot_form_are_refused_with_a_clear_error():
    state = DenseRows(torch.randn(2, 1, 3, 2)).state_dict()
    state.update(cols=torch.tensor([0, 4]), width=6)
    with pytest.raises(ValueError, match=r"state.*one-hot layer"):
        load_rows(state)


def test_dense_block_products_equal_the_whole_matrix_products():
    """DenseRows' dot_parts (one product with the concatenated blocks when nothing is sampled
    or restricted) and combine_into (foreach over the blocks) equal dot / combine of the whole
    V, bitwise, for full and sketched rows and other-dtype blocks."""
    torch.manual_seed(0)
    j, v, w = torch.randn(5, 2, 3, 7), torch.randn(2, 3, 7), torch.randn(5)
    cases = [DenseRows(j), DenseRows(j)]
    cases[1].sketch(10, torch.Generator().manual_seed(1))
    for rows in cases:
        for dtype in (torch.float32, torch.float64):
            parts = [v[..., :5].clone().to(dtype), v[..., 5:].clone().to(dtype)]
            whole = torch.cat(parts, -1)
            assert torch.equal(rows.dot_parts(parts), rows.dot(whole))
            assert torch.equal(
                rows.dot_parts(parts, sketched=False), rows.dot(whole, sketched=False)
            )
            rows.combine_into(w, parts, alpha=-0.5, beta=2.0)
            expected = whole.mul(2.0).add_(rows.combine(w).to(dtype), alpha=-0.5)
            assert torch.equal(torch.cat(parts, -1), expected)


def test_cost_model_is_gram_sized():
    model, x, t, loss, _ = _problem("mlp")
    gm = make_gradient_maker("smw_ng", model, damping=LAM)
    _step(gm, model, x, t, loss)
    cm = gm.cost_model()
    assert ("refresh", "cholesky", (1, 6)) in [(op.phase.value, op.kind, op.shape) for op in cm.ops]
    assert cm.state_numel == 6 * (8 + 7) + 6 * (3 + 9) + 36


CONFIG_ERRORS = [
    (dict(damping=0.0), r"Invalid damping: 0.0. Must be > 0.0."),
    (
        dict(damping_scale="trace"),
        r"Invalid damping_scale: 'trace'. Supported: \('absolute', 'gram'\).",
    ),
    (
        dict(ema_decay=0.5),
        r"Invalid ema_decay: 0.5. SMW-NG solves with the current batch's Gram matrix; ema_decay "
        r"must be 0.",
    ),
]


@pytest.mark.parametrize("kwargs,match", CONFIG_ERRORS)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SmwEmpNaturalGradientConfig(**kwargs)


def test_cholesky_of_a_gram_of_padded_order_is_cut_back_to_its_order():
    from precond.linalg.solvers import padded_order
    from precond.methods.smw_ng import cholesky_or_none

    n = 150  # factorised at order 160 on a CPU
    assert padded_order(n, "cpu") == 160
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, n, 7, generator=g, dtype=torch.float64)
    gram = u @ u.mT
    factor, ok = cholesky_or_none(gram, 0.5)
    assert factor.shape == (2, n, n) and factor.mT.is_contiguous() and ok.all()  # LAPACK's layout
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(factor @ factor.mT, gram + 0.5 * eye)
    _, ok = cholesky_or_none(torch.stack([gram[0], -eye]), 0.5)  # not positive definite
    assert ok.tolist() == [True, False]
