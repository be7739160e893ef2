"""FisherMaker / HessianMaker: the gradient-maker protocol, options, and pinned errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import precond
from precond import FisherMaker, FisherMakerConfig, HessianMaker, HessianMakerConfig, ProtocolError
from precond.curvature import exact

D = torch.float64


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data(n=6):
    return torch.randn(n, 4, dtype=D), torch.randint(0, 3, (n,))


def test_forward_and_backward_writes_plain_gradients_and_keeps_the_result():
    model = _mlp()
    x, t = _data()
    fm = FisherMaker(model, FisherMakerConfig(curvature="ggn", shapes=("diag", "kron")))
    dummy = fm.setup_model_call(model, x)
    fm.setup_loss_call(F.cross_entropy, dummy, t)
    out, loss = fm.forward_and_backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    F.cross_entropy(model(x), t).backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad)
    assert fm.step == 1 and out.shape == (6, 3) and loss.dim() == 0
    assert (
        set(fm.result.layers) == {"0", "2"}
        and "diag" in fm.result["0"]
        and "layer_wise" not in fm.result["0"]
    )
    with pytest.raises(
        KeyError, match=r"Representation 'layer_wise' of layer '0' \(Linear\) was not computed"
    ):
        fm.result["0"]["layer_wise"]


def test_model_computing_its_own_loss_uses_setup_logits_repr():
    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def forward(self, x, t):
            logits = self.net(x)
            return {"logits": logits, "loss": F.cross_entropy(logits, t, reduction="sum")}

    model = WithLoss()
    x, t = _data()
    for curvature in ("fisher_exact", "fisher_emp"):
        fm = FisherMaker(model, FisherMakerConfig(curvature=curvature, shapes="full"))
        dummy = fm.setup_model_call(model, x, t)
        fm.setup_loss_repr(dummy["loss"])
        fm.setup_logits_repr(dummy["logits"], "cross_entropy", reduction="sum", targets=t)
        got = fm.compute().full
        want = exact.dense_curvature(curvature, model.net, F.cross_entropy, x, t, reduction="sum")
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_compute_overrides_the_config_and_validates():
    model = _mlp()
    x, t = _data()
    fm = FisherMaker(model)
    dummy = fm.setup_model_call(model, x)
    fm.setup_loss_call(nn.CrossEntropyLoss(label_smoothing=0.1), dummy, t)
    mc = fm.compute(curvature="fisher_mc", n_mc_samples=2, shapes=["diag"])
    assert mc.curvature is precond.CurvatureType.FISHER_MC
    ex = fm.compute(shapes="diag")  # back to the config's fisher_exact, n_mc_samples reset
    assert ex.curvature is precond.CurvatureType.FISHER_EXACT
    with pytest.raises(
        ValueError, match=r"Invalid shapes: 'blocks'. Supported: \('full', 'layer_wise'"
    ):
        fm.compute(shapes=["blocks"])


def test_ignore_modules_and_parameter_order_of_full_matrices():
    model = _mlp()
    x, t = _data()
    res = precond.fisher(model, F.cross_entropy, x, t, shapes="full", ignore_modules=["0"])
    assert list(res.layers) == ["2"] and res.params == list(model[2].parameters())
    want = exact.dense_ggn(model, F.cross_entropy, x, t)[25:, 25:]
    torch.testing.assert_close(res.full, want, rtol=1e-10, atol=1e-12)


def test_float32_models_give_float32_curvature_close_to_float64():
    model = _mlp()
    x, t = _data()
    want = precond.fisher(model, F.cross_entropy, x, t, shapes="layer_wise")["0"].layer_wise
    got = precond.fisher(model.float(), F.cross_entropy, x.float(), t, shapes="layer_wise")[
        "0"
    ].layer_wise
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


class Scaled(nn.Module):
    """A module without a capture adapter: the Hessian still covers it (parameter order)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([0.5, 1.5, -1.0], dtype=D))
        self.fc = nn.Linear(4, 3).double()

    def forward(self, x):
        return torch.tanh(self.fc(x)) * self.scale


def test_hessian_maker_covers_modules_without_adapter():
    torch.manual_seed(0)
    model = Scaled()
    x, t = _data()
    res = precond.hessian(model, F.cross_entropy, x, t, shapes=["full", "diag", "unit_wise"])
    want = exact.dense_hessian(model, F.cross_entropy, x, t)
    torch.testing.assert_close(res.full, want)
    root = res[""]
    assert not root.canonical and "unit_wise" not in root
    torch.testing.assert_close(root.diag, want.diagonal()[:3])
    torch.testing.assert_close(root.diag_params()[0], want.diagonal()[:3])
    with pytest.raises(KeyError, match="unit_wise/kron/kfe need a capture adapter"):
        root["unit_wise"]


def test_hessian_hutchinson_diagonal_is_unbiased():
    model = _mlp()
    x, t = _data()
    hm = HessianMaker(model, HessianMakerConfig(seed=0))
    dummy = hm.setup_model_call(model, x)
    hm.setup_loss_call(F.cross_entropy, dummy, t)
    s = 600
    est = torch.cat([d.reshape(-1) for d in hm.diagonal(n_samples=s)])
    h = exact.dense_hessian(model, F.cross_entropy, x, t)
    off = h - torch.diag(h.diagonal())
    se = (off.square().sum(1) / s).sqrt()
    assert bool(((est - h.diagonal()).abs() <= 4.5 * se + 1e-12).all())


def test_hessian_maker_forward_and_backward_accumulates_gradients():
    model = _mlp()
    x, t = _data()
    hm = HessianMaker(model, HessianMakerConfig(shapes=("diag",)))
    dummy = hm.setup_model_call(model, x)
    hm.setup_loss_call(F.cross_entropy, dummy, t)
    hm.forward_and_backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    F.cross_entropy(model(x), t).backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad)
    assert "diag" in hm.result["0"]


def test_operator_products_in_list_form():
    model = _mlp()
    x, t = _data()
    v = [torch.randn_like(p) for p in model.parameters()]
    got = precond.fisher_vp(model, F.cross_entropy, x, t, v, curvature="fisher_emp")
    flat = precond.fisher_vp(
        model, F.cross_entropy, x, t, torch.cat([u.reshape(-1) for u in v]), curvature="fisher_emp"
    )
    torch.testing.assert_close(torch.cat([g.reshape(-1) for g in got]), flat)
    batch = torch.randn(43, 2, dtype=D)
    two = precond.hvp(model, F.cross_entropy, x, t, batch)
    torch.testing.assert_close(two[:, 1], precond.hvp(model, F.cross_entropy, x, t, batch[:, 1]))


CONFIG_ERRORS = [
    (
        FisherMakerConfig,
        dict(shapes=()),
        r"Invalid shapes: \(\). Request at least one of \('full', 'layer_wise', 'unit_wise', 'diag', 'kron', 'kfe'\).",
    ),
    (FisherMakerConfig, dict(shapes=("blocks",)), r"Invalid shapes: 'blocks'. Supported: \('full'"),
    (
        FisherMakerConfig,
        dict(curvature="hessian"),
        r"Invalid curvature: 'hessian'. This method builds its curvature from back-propagated vectors",
    ),
    (
        FisherMakerConfig,
        dict(n_mc_samples=2),
        r"Invalid n_mc_samples: 2. Only curvature='fisher_mc' draws samples",
    ),
    (
        HessianMakerConfig,
        dict(shapes="kron"),
        r"Invalid shapes: 'kron'. The Hessian has no Kronecker factorisation; supported: \('full', 'layer_wise', 'unit_wise', 'diag'\).",
    ),
]


@pytest.mark.parametrize("cls,kwargs,match", CONFIG_ERRORS)
def test_config_errors(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_usage_errors():
    model = _mlp()
    x, t = _data()
    with pytest.raises(ProtocolError, match=r"forward_and_backward\(\) needs setup_model_call"):
        FisherMaker(model).compute()
    with pytest.raises(
        ValueError,
        match=r"Invalid weight: 'given'. With class/element weights the loss is not the model's likelihood, so fisher_exact is undefined",
    ):
        precond.fisher(model, F.cross_entropy, x, t, weight=torch.ones(3, dtype=D))
    with pytest.raises(
        ValueError, match=r"Invalid model: 'Sequential'. FisherMaker found no trained parameter"
    ):
        FisherMaker(model, FisherMakerConfig(ignore_modules=[nn.Linear]))
    with pytest.raises(ValueError, match=r"Invalid n_mc_samples: 0. Must be >= 1."):
        precond.curvature_operator(
            model, F.cross_entropy, x, t, curvature="fisher_mc", n_mc_samples=0
        )
    with pytest.raises(
        ValueError,
        match=r"Invalid weight: 'given'. With weights the loss is not a likelihood; use dense_ggn.",
    ):
        exact.dense_fisher_exact(model, F.cross_entropy, x, t, weight=torch.ones(3, dtype=D))


def test_every_representation_is_available_as_a_block():
    model = _mlp()
    x, t = _data()
    res = precond.fisher(
        model, F.cross_entropy, x, t, shapes=["layer_wise", "unit_wise", "diag", "kron", "kfe"]
    )
    lc = res["0"]
    lam = 1e-2
    v = torch.randn(1, 5, 5, dtype=D)
    dense = lc.block("layer_wise")
    dense.refresh(lam)
    want = torch.linalg.solve(lc.layer_wise + lam * torch.eye(25, dtype=D), v.reshape(-1))
    torch.testing.assert_close(dense.apply(v.reshape(-1), -1.0), want)
    units = lc.block("unit_wise")
    units.refresh(lam)
    got = units.apply(v, -1.0)  # batched over (G, d_out): v is canonical [G, d_out, d_in']
    for o in range(5):
        unit = lc.unit_wise[0, o] + lam * torch.eye(5, dtype=D)
        torch.testing.assert_close(got[0, o], torch.linalg.solve(unit, v[0, o]))
    diag = lc.block("diag")
    diag.refresh(lam)
    torch.testing.assert_close(diag.apply(v, -1.0), v / (lc.diag + lam))
    assert lc.block("kron") is lc.kron and lc.block("kfe") is lc.kfe


def test_batchnorm_in_training_mode_warns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).double()
    x, t = _data()
    with pytest.warns(precond.NumericalWarning, match=r"'1' \(BatchNorm1d\) is in training mode"):
        precond.fisher(model, F.cross_entropy, x, t[:6] % 2, shapes="diag")


def test_curvature_under_autocast_is_computed_in_float32_from_the_low_precision_model():
    """Under the caller's ``torch.autocast`` the makers run the model in bfloat16 and form
    every curvature block in float32 (the blocks of the bfloat16 model, close to those of the
    float32 one); direct calls of ``compute``/``diagonal`` and ``forward_and_backward`` alike."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, t = torch.randn(16, 4), torch.randint(0, 3, (16,))
    shapes = ("full", "kron", "diag")

    def fisher(autocast):
        fm = FisherMaker(model, FisherMakerConfig(curvature="ggn", shapes=shapes))
        fm.setup_loss_call(F.cross_entropy, fm.setup_model_call(model, x), t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = fm.compute()
            fm.forward_and_backward()
        assert fm.loss_inputs().logits.dtype == (torch.bfloat16 if autocast else torch.float32)
        return got, fm.result

    (plain, _), (low, low_step) = fisher(False), fisher(True)
    assert low.full.dtype == torch.float32
    torch.testing.assert_close(low.full, plain.full, rtol=0.05, atol=0.02 * plain.full.abs().max())
    for name in ("0", "2"):
        for got in (low[name], low_step[name]):
            for a, b in zip(got.diag_params(), plain[name].diag_params()):
                assert a.dtype == torch.float32
                torch.testing.assert_close(a, b, rtol=0.05, atol=0.02 * b.abs().max())
    hm = HessianMaker(model, HessianMakerConfig(seed=0))
    hm.setup_loss_call(F.cross_entropy, hm.setup_model_call(model, x), t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        diagonal = hm.diagonal(n_samples=4)
    assert all(d.dtype == torch.float32 and torch.isfinite(d).all() for d in diagonal)


def test_curvature_of_a_compiled_model_is_that_of_the_model():
    """The makers differentiate twice, which compiled autograd cannot: a ``torch.compile``'d
    model is called uncompiled and gives the model's curvature."""
    torch._dynamo.reset()
    model = _mlp()
    x, t = _data()
    got = []
    for call in (model, torch.compile(model, backend="aot_eager")):
        fm = FisherMaker(model, FisherMakerConfig(curvature="ggn", shapes="full"))
        fm.setup_loss_call(F.cross_entropy, fm.setup_model_call(call, x), t)
        hm = HessianMaker(model, HessianMakerConfig(shapes="full"))
        hm.setup_loss_call(F.cross_entropy, hm.setup_model_call(call, x), t)
        got.append((fm.compute().full, hm.compute().full))
    torch._dynamo.reset()
    for a, b in zip(*got):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
