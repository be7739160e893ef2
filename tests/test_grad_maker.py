from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import precond
from precond import GradientMaker, ProtocolError
from precond.dummy import DummyError


@dataclass
class Output:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class Net(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x, t=None):
        y = self.fc2(torch.tanh(self.fc1(x)))
        if self.kind == "tensor":
            return y
        if self.kind == "tuple":
            return (y, y.detach().sum())
        if self.kind == "dict":
            return {"logits": y}
        loss = F.cross_entropy(y, t) if t is not None else None
        return Output(y, loss)


def _reference_grads(model, loss_fn):
    model.zero_grad()
    loss_fn().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict", "dataclass"])
def test_plain_gradients_equal_backward(kind):
    torch.manual_seed(0)
    model = Net(kind)
    x, t = torch.randn(5, 6), torch.randint(0, 4, (5,))
    gm = GradientMaker(model)
    dummy = gm.setup_model_call(model, x)
    logits = {
        "tensor": dummy,
        "tuple": dummy[0],
        "dict": dummy["logits"],
        "dataclass": dummy.logits,
    }[kind]
    gm.setup_loss_call(F.cross_entropy, logits, t, label_smoothing=0.1)

    def ref():
        out = model(x)
        y = {"tensor": out, "tuple": out[0] if isinstance(out, tuple) else out}.get(kind)
        if kind == "dict":
            y = out["logits"]
        if kind == "dataclass":
            y = out.logits
        return F.cross_entropy(y, t, label_smoothing=0.1)

    want = _reference_grads(model, ref)
    model.zero_grad()
    y, loss = gm.forward_and_backward()
    for p, w in zip(model.parameters(), want):
        assert torch.equal(p.grad, w)
    assert loss.shape == () and gm.step == 1


def test_loss_module_with_kwargs_and_view_expression():
    torch.manual_seed(0)
    model = nn.Linear(3, 5)
    x, t = torch.randn(2, 4, 3), torch.randint(0, 5, (2, 4))
    t[0, 0] = -1
    gm = GradientMaker(model)
    dummy = gm.setup_model_call(model, x)
    crit = nn.CrossEntropyLoss(ignore_index=-1)
    gm.setup_loss_call(crit, dummy.view(-1, dummy.size(-1)), t.view(-1))
    want = _reference_grads(model, lambda: crit(model(x).view(-1, 5), t.view(-1)))
    model.zero_grad()
    gm.forward_and_backward()
    for p, w in zip(model.parameters(), want):
        assert torch.equal(p.grad, w)


def test_model_computes_its_own_loss():
    torch.manual_seed(0)
    model = Net("dataclass")
    x, t = torch.randn(5, 6), torch.randint(0, 4, (5,))
    gm = GradientMaker(model)
    dummy = gm.setup_model_call(model, x, t=t)
    gm.setup_loss_repr(dummy.loss)
    want = _reference_grads(model, lambda: model(x, t=t).loss)
    model.zero_grad()
    out, loss = gm.forward_and_backward()
    assert isinstance(out, Output)
    for p, w in zip(model.parameters(), want):
        assert torch.equal(p.grad, w)


def test_gradients_accumulate_like_backward():
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    gm = GradientMaker(model)
    d = gm.setup_model_call(model, x)
    gm.setup_loss_call(lambda y: y.square().sum(), d)
    gm.forward_and_backward()
    first = model.weight.grad.clone()
    gm.forward_and_backward()
    torch.testing.assert_close(model.weight.grad, 2 * first)


def test_protocol_misuse():
    model = nn.Linear(3, 2)
    gm = GradientMaker(model)
    with pytest.raises(ProtocolError, match=r"needs setup_model_call\(model, x\) first"):
        gm.forward_and_backward()
    d = gm.setup_model_call(model, torch.randn(4, 3))
    with pytest.raises(ProtocolError, match=r"needs the loss: call setup_loss_call"):
        gm.forward_and_backward()
    gm.setup_loss_call(F.mse_loss, d, torch.randn(4, 2), reduction="none")
    with pytest.raises(
        ValueError, match=r"Invalid loss: 'tensor of shape \(4, 2\)'. The loss must be a scalar"
    ):
        gm.forward_and_backward()
    gm.setup_loss_call(lambda y: y[0], d)
    with pytest.raises(ValueError, match=r"Invalid loss: 'tensor of shape \(2,\)'"):
        gm.forward_and_backward()
    gm.setup_loss_call(F.mse_loss, d.logits, torch.randn(4, 2))
    with pytest.raises(
        DummyError, match=r"The dummy y.logits does not fit the model output \(output type Tensor"
    ):
        gm.forward_and_backward()
    with pytest.raises(
        ValueError, match=r"Invalid loss call: '<lambda>'. None of its arguments is a dummy"
    ):
        gm.setup_loss_call(lambda: torch.zeros(()))
    with pytest.raises(ValueError, match=r"Invalid fn: 3. setup_model_call needs a callable"):
        gm.setup_model_call(3)
    with pytest.raises(ValueError, match=r"Invalid dummy: 1. setup_loss_repr needs a dummy"):
        gm.setup_loss_repr(1)
    with pytest.raises(ValueError, match=r"Invalid loss_type: 'hinge'. Supported"):
        gm.setup_logits_repr(d, loss_type="hinge")
    with pytest.raises(
        ValueError, match=r"Invalid reduction: 'none'. Supported: \('mean', 'sum'\)"
    ):
        gm.setup_logits_repr(d, reduction="none")
    with pytest.raises(
        ValueError, match=r"Invalid label_smoothing: 0.1. Options for loss_type='mse'"
    ):
        gm.setup_logits_repr(d, loss_type="mse", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"Invalid model: 'int'. Must be a torch.nn.Module"):
        GradientMaker(3)
    with torch.no_grad():
        gm.setup_loss_call(F.mse_loss, d, torch.randn(4, 2))
        with pytest.raises(ValueError, match=r"does not depend on any trained parameter"):
            gm.forward_and_backward()


def test_dummy_from_another_gradient_maker_is_rejected():
    model = nn.Linear(3, 2)
    a, b = GradientMaker(model), GradientMaker(model)
    b.setup_model_call(model, torch.randn(2, 3))
    da = a.setup_model_call(model, torch.randn(2, 3))
    b.setup_loss_call(F.mse_loss, da, torch.randn(2, 2))
    with pytest.raises(DummyError, match="earlier setup_model_call"):
        b.forward_and_backward()


def test_state_dict_roundtrip_and_generator():
    model = nn.Linear(3, 2)
    gm = GradientMaker(model, precond.PreconditioningConfig(seed=7))
    d = gm.setup_model_call(model, torch.randn(2, 3))
    gm.setup_loss_call(F.mse_loss, d, torch.randn(2, 2))
    gm.forward_and_backward()
    _ = torch.rand(3, generator=gm.generator)
    state = gm.state_dict()
    nxt = torch.rand(3, generator=gm.generator)
    gm2 = GradientMaker(model)
    gm2.load_state_dict(state)
    assert gm2.step == 1
    assert torch.equal(torch.rand(3, generator=gm2.generator), nxt)
    with pytest.raises(ValueError, match=r"Invalid state: \['method'\]. Missing keys"):
        gm2.load_state_dict({"step": 0, "seed": 0, "generator": None})


@pytest.mark.parametrize("container", ["tuple", "dict"])
def test_loss_repr_in_tuple_and_dict_outputs(container):
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x, t):
            y = self.fc(x)
            loss = F.mse_loss(y, t)
            return (y, loss) if container == "tuple" else {"logits": y, "loss": loss}

    model = M()
    x, t = torch.randn(4, 3), torch.randn(4, 2)
    gm = GradientMaker(model)
    d = gm.setup_model_call(model, x, t)
    gm.setup_loss_repr(d[1] if container == "tuple" else d["loss"])
    want = _reference_grads(model, lambda: F.mse_loss(model.fc(x), t))
    model.zero_grad()
    gm.forward_and_backward()
    for p, w in zip(model.parameters(), want):
        assert torch.equal(p.grad, w)


def test_uncompiled_unwraps_torch_compile_only():
    from precond.grad_maker import uncompiled

    model = nn.Linear(2, 2)

    def fn(x):
        return x + 1

    assert uncompiled(torch.compile(model, backend="eager")) is model
    assert uncompiled(torch.compile(fn, backend="eager")) is fn
    assert uncompiled(model) is model and uncompiled(fn) is fn
