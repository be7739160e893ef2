"""K-FAC theorems: cases where the Kronecker approximation is exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import dense_ggn, flat_grad
from torch import nn

from precond import make_gradient_maker
from precond.methods.kfac import KfacConfig, KfacGradientMaker


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _kfac_direction(model, x, t, loss, **options):
    gm = make_gradient_maker("kfac", model, **options)
    d = gm.setup_model_call(model, x)
    gm.setup_loss_call(loss, d, t)
    model.zero_grad()
    gm.forward_and_backward()
    return flat_grad(model), gm


def _plain_grad(model, x, t, loss):
    model.zero_grad()
    loss(model(x), t).backward()
    return flat_grad(model)


@pytest.mark.parametrize("curvature", ["fisher_exact", "ggn"])
def test_one_layer_one_datum_equals_exact_natural_gradient(curvature):
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    x, t = torch.randn(1, 5), torch.randint(0, 4, (1,))
    lam = 1e-2
    g = _plain_grad(model, x, t, F.cross_entropy)
    fisher = dense_ggn(model, F.cross_entropy, x, t)
    want = torch.linalg.solve(fisher + lam * torch.eye(fisher.shape[0]), g)
    got, _ = _kfac_direction(
        model,
        x,
        t,
        F.cross_entropy,
        curvature=curvature,
        damping=lam,
        solver="eigh",
        damping_mode="exact",
    )
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_deep_linear_network_mse_kfac_blocks_are_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
    x, t = torch.randn(7, 4), torch.randn(7, 3)
    lam = 1e-3
    g = _plain_grad(model, x, t, F.mse_loss)
    ggn = dense_ggn(model, F.mse_loss, x, t)
    got, gm = _kfac_direction(
        model,
        x,
        t,
        F.mse_loss,
        curvature="fisher_exact",
        damping=lam,
        solver="eigh",
        damping_mode="exact",
    )
    # layer-wise block diagonal of the exact GGN: 4*5+5 then 5*3+3 parameters
    sizes = [25, 18]
    offs = [0, 25]
    want = torch.cat(
        [
            torch.linalg.solve(ggn[o : o + s, o : o + s] + lam * torch.eye(s), g[o : o + s])
            for o, s in zip(offs, sizes)
        ]
    )
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    # and the Kronecker blocks equal the GGN's diagonal blocks (canonical order = param order
    # here since weight [o, i] row-major then bias: compare via the block's own dense form)
    for name, (o, s) in zip(["0", "1"], zip(offs, sizes)):
        block = gm.blocks[name]
        layer = next(layer for layer in gm.layers if layer.name == name)
        perm = _canonical_to_param_perm(layer)
        dense = block.to_dense()[perm][:, perm]
        torch.testing.assert_close(dense, ggn[o : o + s, o : o + s], rtol=1e-8, atol=1e-10)


def _canonical_to_param_perm(layer):
    # index tensors in parameter layout, mapped to canonical positions
    counts = [p.numel() for p in layer.params]
    idx, start = [], 0
    for p, c in zip(layer.params, counts):
        idx.append(torch.arange(start, start + c, dtype=torch.float64).reshape(p.shape))
        start += c
    canon = layer.to_matrix(idx).reshape(-1).long()
    perm = torch.empty_like(canon)
    perm[canon] = torch.arange(canon.numel())
    return perm


def test_mc_fisher_kfac_runs_and_uses_generator_state():
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    x, t = torch.randn(6, 3), torch.randint(0, 4, (6,))
    g1, gm = _kfac_direction(model, x, t, F.cross_entropy, seed=3)
    g2, _ = _kfac_direction(model, x, t, F.cross_entropy, seed=3)
    g3, _ = _kfac_direction(model, x, t, F.cross_entropy, seed=4)
    torch.testing.assert_close(g1, g2)
    assert not torch.allclose(g1, g3)


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_cost_model_folds_the_factors_into_their_averages_only_with_a_decay(ema_decay):
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    gm = make_gradient_maker("kfac", model, ema_decay=ema_decay)
    d = gm.setup_model_call(model, torch.randn(6, 3))
    gm.setup_loss_call(F.cross_entropy, d, torch.randint(0, 4, (6,)))
    gm.forward_and_backward()
    kinds = {(op.phase.value, op.kind, op.shape) for op in gm.cost_model().ops}
    assert ("curvature", "bmm", (1, 4, 6, 4)) in kinds  # A from 6 rows of width 3 + 1
    # A (4 x 4) and B (4 x 4) folded into their moving averages, or replaced without a pass
    assert (("curvature", "elementwise", (16 + 16,)) in kinds) == (ema_decay > 0.0)


CONFIG_ERRORS = [
    (dict(curvature="hessian"), r"Invalid curvature: 'hessian'. This method builds its curvature"),
    (
        dict(curvature="fisher"),
        r"Invalid curvature: 'fisher'. Supported: \('fisher_exact', 'fisher_mc', 'fisher_emp', 'ggn', 'hessian'\).",
    ),
    (dict(n_mc_samples=0), r"Invalid n_mc_samples: 0. Must be >= 1."),
    (
        dict(curvature="fisher_exact", n_mc_samples=2),
        r"Invalid n_mc_samples: 2. Only curvature='fisher_mc' draws samples",
    ),
    (
        dict(weight_sharing="mean"),
        r"Invalid weight_sharing: 'mean'. Supported: \('expand', 'reduce'\).",
    ),
    (dict(solver="lu"), r"Invalid solver: 'lu'. Supported: \('cholesky', 'eigh'\)."),
    (
        dict(damping_mode="exact"),
        r"Invalid damping_mode: 'exact'. Exact Kronecker damping needs solver='eigh'.",
    ),
]


@pytest.mark.parametrize("kwargs,match", CONFIG_ERRORS)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KfacConfig(**kwargs)


def test_wrong_config_type_is_rejected():
    from precond import PreconditioningConfig

    with pytest.raises(
        ValueError,
        match=r"Invalid config: 'PreconditioningConfig'. KfacGradientMaker takes a KfacConfig.",
    ):
        KfacGradientMaker(nn.Linear(2, 2), PreconditioningConfig())


class _Tagger(nn.Module):
    """Embedding (vocabulary 40, width 3) over 5 tokens, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 3)
        self.head = nn.Linear(15, 4)

    def forward(self, x):
        return self.head(self.emb(x).flatten(1))


def test_cost_model_prices_an_embeddings_input_factor_as_the_diagonal_it_is():
    # One-hot inputs make A the diagonal of token counts: no vocabulary-order factorisation,
    # product or state may enter the floor (a dense 40 x 40 A priced a floor above the step).
    torch.manual_seed(0)
    model = _Tagger()
    gm = make_gradient_maker("kfac", model)
    d = gm.setup_model_call(model, torch.randint(0, 40, (6, 5)))
    gm.setup_loss_call(F.cross_entropy, d, torch.randint(0, 4, (6,)))
    gm.forward_and_backward()
    assert gm.blocks["emb"].a_diagonal
    emb = [op for op in gm.cost_model().ops if 40 in op.shape and op.kind != "elementwise"]
    assert {(op.phase.value, op.kind, op.shape) for op in emb} == {
        ("apply", "bmm", (1, 3, 3, 40))  # B⁻¹ G only; A⁻¹ scales the columns
    }
    kinds = {(op.phase.value, op.kind, op.shape) for op in gm.cost_model().ops}
    assert ("curvature", "elementwise", (30 + 40,)) in kinds  # token counts over 6 x 5 tokens
    assert ("refresh", "cholesky", (1, 3)) in kinds and ("refresh", "elementwise", (40,)) in kinds
    # the head: A 16 x 16, B 4 x 4; the embedding: diagonal A (40), B 3 x 3; each with inverse
    assert gm.cost_model().state_numel == 2 * (16 * 16 + 4 * 4) + 2 * (40 + 3 * 3)
