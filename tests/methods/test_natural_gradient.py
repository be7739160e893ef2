"""Natural-gradient theorems: each shape is the dense solve with the matching Fisher blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.fisher_oracles import (
    block_ids,
    canonical_index,
    damped_solve,
    dense_emp_fisher,
    restrict,
)
from tests.helpers import ConvBN, SeqModel, dense_ggn, flat_grad, flat_params
from torch import nn
from torch.func import functional_call, hessian

import precond
from precond import make_gradient_maker
from precond.methods.natural_gradient import (
    EmpNaturalGradientConfig,
    FullNaturalGradientConfig,
    NaturalGradientConfig,
    NaturalGradientMaker,
    UnitWiseNaturalGradientConfig,
)

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
    """(model, x, t, loss on (output, target), rows per example)."""
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        return model, torch.randn(6, 6), torch.randint(0, 3, (6,)), F.cross_entropy, 1
    if kind == "cnn":
        model = ConvBN().eval()  # running statistics: examples stay independent
        return model, torch.randn(4, 2, 6, 6), torch.randint(0, 3, (4,)), F.cross_entropy, 1
    model = SeqModel(padding_idx=1 if kind == "seq_pad" else None)
    x = torch.randint(0, 7, (3, 5))
    if kind == "seq_pad":
        x[0, :2] = 1  # padding tokens: no gradient, no Fisher entries
        x[1, 3] = x[1, 4] = x[1, 0]  # a token repeated within an example
    return model, x, torch.randint(0, 4, (3, 5)), _seq_loss, 5


def _run(name, model, x, t, loss, **options):
    gm = make_gradient_maker(name, model, **options)
    d = gm.setup_model_call(model, x)
    if loss is _seq_loss:
        gm.setup_loss_call(F.cross_entropy, d.view(-1, d.size(-1)), t.view(-1))
    else:
        gm.setup_loss_call(loss, d, t)
    model.zero_grad()
    gm.forward_and_backward()
    return flat_grad(model), gm


def _plain_grad(model, x, t, loss):
    model.zero_grad()
    loss(model(x), t).backward()
    return flat_grad(model)


@pytest.mark.parametrize("curvature", ["fisher_exact", "ggn"])
def test_linear_regression_natural_gradient_is_the_damped_newton_step(curvature):
    """For a linear model with MSE the Fisher equals the Hessian: NG = damped Newton."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x, t = torch.randn(20, 5), torch.randn(20, 3)
    names = [k for k, _ in flat_params(model)]
    params = {k: v.detach() for k, v in flat_params(model)}
    sizes = [params[k].numel() for k in names]

    def loss_of_flat(theta):
        split = dict(
            zip(names, (c.reshape(params[k].shape) for k, c in zip(names, theta.split(sizes))))
        )
        return F.mse_loss(functional_call(model, split, (x,)), t)

    theta = torch.cat([params[k].reshape(-1) for k in names])
    newton = damped_solve(hessian(loss_of_flat)(theta), LAM, _plain_grad(model, x, t, F.mse_loss))
    got, _ = _run("ng_full", model, x, t, F.mse_loss, curvature=curvature, damping=LAM)
    torch.testing.assert_close(got, newton, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq", "seq_pad"])
@pytest.mark.parametrize("shape", ["full", "layer_wise", "unit_wise", "diag"])
def test_shapes_solve_with_the_matching_blocks_of_the_exact_fisher(shape, kind):
    model, x, t, loss, _ = _problem(kind)
    g = _plain_grad(model, x, t, loss)
    fisher = dense_ggn(model, loss, x, t)  # exact Fisher = GGN for cross-entropy
    got, gm = _run(
        "natural_gradient",
        model,
        x,
        t,
        loss,
        curvature="fisher_exact",
        damping=LAM,
        fisher_shape=shape,
    )
    want = damped_solve(restrict(fisher, block_ids(model, gm.layers, shape)), LAM, g)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", ["mlp", "seq"])
def test_empirical_natural_gradient_uses_layer_blocks_of_the_empirical_fisher(kind):
    model, x, t, loss, rows = _problem(kind)
    g = _plain_grad(model, x, t, loss)
    fisher = dense_emp_fisher(model, loss, x, t, rows)
    got, gm = _run("ng_emp", model, x, t, loss, damping=LAM)
    want = damped_solve(restrict(fisher, block_ids(model, gm.layers, "layer_wise")), LAM, g)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_norm_layer_unit_blocks_are_two_by_two():
    model, x, t, loss, _ = _problem("seq")
    _, gm = _run("ng_unit", model, x, t, loss, curvature="fisher_exact")
    assert gm.blocks["norm"].matrix.shape == (5, 1, 2, 2)
    assert gm.blocks["emb"].matrix.shape == (1, 5, 7, 7)


def test_exponential_moving_average_of_the_fisher():
    model, x, t, loss, _ = _problem("mlp")
    x2 = torch.randn_like(x)
    f1 = dense_emp_fisher(model, loss, x, t)
    f2 = dense_emp_fisher(model, loss, x2, t)
    gm = make_gradient_maker("ng_full", model, curvature="fisher_emp", ema_decay=0.25, damping=LAM)
    for xb in (x, x2):
        d = gm.setup_model_call(model, xb)
        gm.setup_loss_call(loss, d, t)
        model.zero_grad()
        gm.forward_and_backward()
    # The full block is in canonical order: map it back to parameter order.
    order = torch.cat([canonical_index(model, layer).reshape(-1) for layer in gm.layers])
    dense = torch.empty_like(f1)
    dense[order.unsqueeze(1), order.unsqueeze(0)] = gm.blocks["<full>"].to_dense()
    torch.testing.assert_close(dense, 0.25 * f1 + 0.75 * f2, rtol=1e-10, atol=1e-12)


def test_refreshes_without_new_statistics_do_not_refactorise(monkeypatch):
    import precond.linalg.blocks as blocks

    calls = []
    original = blocks.damped_cholesky
    monkeypatch.setattr(
        blocks, "damped_cholesky", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    model, x, t, loss, _ = _problem("mlp")
    gm = make_gradient_maker(
        "ng_layer", model, curvature_upd_interval=3, preconditioner_upd_interval=1
    )
    per_step = []
    for _ in range(4):
        calls.clear()
        _run_on(gm, model, x, t, loss)
        per_step.append(len(calls))
    assert per_step == [2, 0, 0, 2]


def _run_on(gm, model, x, t, loss):
    d = gm.setup_model_call(model, x)
    gm.setup_loss_call(loss, d, t)
    model.zero_grad()
    gm.forward_and_backward()


def test_shortcuts_are_registered_with_their_shapes():
    expected = {
        "natural_gradient": "layer_wise",
        "ng_full": "full",
        "ng_layer": "layer_wise",
        "ng_unit": "unit_wise",
        "ng_diag": "diag",
        "ng_emp": "layer_wise",
    }
    for name, shape in expected.items():
        gm = make_gradient_maker(name, nn.Linear(3, 2))
        assert isinstance(gm, NaturalGradientMaker)
        assert gm.shape.value == shape
    assert make_gradient_maker("ng_emp", nn.Linear(3, 2)).config.curvature.value == "fisher_emp"
    assert isinstance(precond.FullNaturalGradientMaker(nn.Linear(3, 2)), NaturalGradientMaker)


@pytest.mark.parametrize("shape", ["full", "layer_wise", "unit_wise", "diag"])
def test_cost_model_counts_the_state(shape):
    model, x, t, loss, _ = _problem("mlp")
    _, gm = _run("natural_gradient", model, x, t, loss, fisher_shape=shape)
    cm = gm.cost_model()
    p = [56, 27]
    expected = {
        "full": 2 * sum(p) ** 2,
        "layer_wise": 2 * sum(q * q for q in p),
        "unit_wise": 2 * (8 * 7 * 7 + 3 * 9 * 9),
        "diag": 2 * sum(p),  # the diagonal and its damped inverse
    }[shape]
    assert cm.state_numel == expected
    assert {op.phase.value for op in cm.ops} >= {"curvature", "apply"}


CONFIG_ERRORS = [
    (
        NaturalGradientConfig,
        dict(fisher_shape="kron"),
        r"Invalid fisher_shape: 'kron'. Supported: \('full', 'layer_wise', 'unit_wise', 'diag'\).",
    ),
    (
        FullNaturalGradientConfig,
        dict(fisher_shape="diag"),
        r"Invalid fisher_shape: 'diag'. FullNaturalGradientConfig fixes fisher_shape='full'; use "
        r"NaturalGradientConfig to choose another shape.",
    ),
    (
        UnitWiseNaturalGradientConfig,
        dict(fisher_shape="layer_wise"),
        r"Invalid fisher_shape: 'layer_wise'. UnitWiseNaturalGradientConfig fixes "
        r"fisher_shape='unit_wise'",
    ),
    (
        EmpNaturalGradientConfig,
        dict(curvature="fisher_mc"),
        r"Invalid curvature: 'fisher_mc'. EmpNaturalGradientConfig fixes curvature='fisher_emp'; "
        r"use NaturalGradientConfig for another Fisher type.",
    ),
    (
        NaturalGradientConfig,
        dict(curvature="hessian"),
        r"Invalid curvature: 'hessian'. This method builds its curvature",
    ),
]


@pytest.mark.parametrize("cls,kwargs,match", CONFIG_ERRORS)
def test_config_errors(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(
    "method,total",
    [
        ("ng_full", (4 * 8 + 3 * 5) ** 2),  # the two layers' 32 + 15 parameters
        ("ng_layer", 32**2 + 15**2),
        ("ng_emp", 32**2 + 15**2),
        # per embedding coordinate a vocabulary block; per output unit its weight row and bias
        ("ng_unit", 4 * 8**2 + 3 * 5**2),
    ],
)
def test_dense_blocks_above_max_block_numel_are_refused_before_any_is_built(method, total):
    # Canonical shapes (G, d_out, d_in'): (1, 4, 8) (embedding: width × vocabulary) and
    # (1, 3, 5) (the bias column last).
    model = nn.Sequential(nn.Embedding(8, 4), nn.Flatten(), nn.Linear(4, 3))
    make_gradient_maker(method, model, max_block_numel=total)  # at the limit: accepted
    with pytest.raises(
        ValueError,
        match=rf"Invalid number of dense Fisher block elements: {total}\. .* allows at most "
        rf"max_block_numel={total - 1}; raise max_block_numel",
    ):
        make_gradient_maker(method, model, max_block_numel=total - 1)
    make_gradient_maker("ng_diag", model, max_block_numel=1)  # the diagonal is never refused
    with pytest.raises(ValueError, match=r"Invalid max_block_numel: 0"):
        make_gradient_maker(method, model, max_block_numel=0)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_diagonal_in_chunks_of_one_example_is_the_exact_fisher_diagonal(monkeypatch, kind):
    """The diagonal is accumulated over chunks of examples (the smallest here: one example per
    chunk, for layers with and without weight sharing) and still solves with diag(F)."""
    import importlib

    monkeypatch.setattr(
        importlib.import_module("precond.methods.diag_fisher"), "DIAG_CHUNK_NUMEL", 1
    )
    monkeypatch.setattr(importlib.import_module("precond.capture.stats"), "CHUNK_NUMEL", 1)
    model, x, t, loss, _ = _problem(kind)
    g = _plain_grad(model, x, t, loss)
    fisher = dense_ggn(model, loss, x, t)
    got, gm = _run("ng_diag", model, x, t, loss, curvature="fisher_exact", damping=LAM)
    want = damped_solve(restrict(fisher, block_ids(model, gm.layers, "diag")), LAM, g)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("chunk_numel", [1, None])
def test_one_vector_diagonal_in_one_chunk_or_many_is_the_empirical_fisher_diagonal(
    monkeypatch, chunk_numel
):
    """With one back-propagated vector per example (the empirical Fisher), a layer whose
    examples fit in one chunk takes the single-product path; in chunks of one example, the
    loop: both give diag(F_emp) of the dense oracle."""
    import importlib

    if chunk_numel is not None:
        monkeypatch.setattr(
            importlib.import_module("precond.methods.diag_fisher"), "DIAG_CHUNK_NUMEL", chunk_numel
        )
    model, x, t, loss, _ = _problem("mlp")
    g = _plain_grad(model, x, t, loss)
    fisher = dense_emp_fisher(model, loss, x, t)
    got, gm = _run("ng_diag", model, x, t, loss, curvature="fisher_emp", damping=LAM)
    want = damped_solve(restrict(fisher, block_ids(model, gm.layers, "diag")), LAM, g)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", ["small_cnn", "mlp", "mlp_no_cut"])
def test_diag_fisher_pass_beside_the_loss_backward_is_bitwise_the_two_passes(monkeypatch, kind):
    """ng_diag (fisher_mc, one sample) runs its Fisher pass segment by segment with the loss's
    backward and forms each block as soon as the layer's output gradients are complete: the
    blocks, the preconditioned gradients and the sampled labels equal those of the two passes
    run one after the other, bit for bit, over curvature and idle steps."""
    import importlib

    from precond.models import SmallCNN

    diag_fisher = importlib.import_module("precond.methods.diag_fisher")

    def run(twin):
        torch.manual_seed(0)
        if kind == "mlp":
            model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2), nn.Tanh())
            model.append(nn.Linear(2, 3))
            x = torch.randn(5, 6)
        elif kind == "mlp_no_cut":  # the passes run one after the other (twin declines: the
            # parameters' gradients outweigh the activations, no cut pays)
            model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
            x = torch.randn(2, 64)
        else:
            model = SmallCNN(3, 10, 4, 8)
            x = torch.randn(5, 3, 8, 8)
        t = torch.randint(0, 10 if kind == "small_cnn" else 3, (x.shape[0],))
        gm = make_gradient_maker("ng_diag", model, damping=LAM, curvature_upd_interval=2)
        if not twin:
            monkeypatch.setattr(gm, "_twin_pass", lambda: False)
        calls = []
        real = diag_fisher.twin_backward_edges

        def spy(*a, **k):
            out = real(*a, **k)
            calls.append(out is not None)
            return out

        monkeypatch.setattr(diag_fisher, "twin_backward_edges", spy)
        grads = []
        for _ in range(3):
            model.zero_grad()
            d = gm.setup_model_call(model, x)
            gm.setup_loss_call(F.cross_entropy, d, t)
            gm.forward_and_backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        return gm, grads, calls

    gm_twin, g_twin, calls = run(True)
    gm_ref, g_ref, ref_calls = run(False)
    # a narrow cut below the logits but for mlp_no_cut
    assert calls == [kind != "mlp_no_cut"] * 2 and ref_calls == []
    for a, b in zip(g_twin, g_ref):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    for name, block in gm_ref.blocks.items():
        assert torch.equal(gm_twin.blocks[name].values, block.values)
    assert torch.equal(gm_twin.generator.get_state(), gm_ref.generator.get_state())


def test_diagonal_of_an_embedding_is_priced_on_its_example_token_pairs():
    """ng_diag forms an embedding's diagonal from the (example, token) pairs of its Jacobians:
    the cost model prices those, not dense per-example Jacobians over the vocabulary."""
    model, x, t, loss, _ = _problem("seq")
    _, gm = _run("ng_diag", model, x, t, loss, curvature="fisher_emp")
    cm = gm.cost_model()
    emb = next(layer for layer in gm.layers if layer.adapter.one_hot_input)
    groups, d_out, vocab = emb.shape
    pairs = 3 * 5 * d_out  # examples × tokens per example × width
    curvature = [(op.kind, op.shape) for op in cm.ops if op.phase.value == "curvature"]
    assert ("elementwise", (2 * pairs + d_out * vocab,)) in curvature
    assert not any(kind == "bmm" and vocab in shape for kind, shape in curvature)
    assert cm.transient_numel >= pairs + d_out * vocab
