"""Sophia's GNB pass shares the walk of the graph with the loss's backward (twin_backward)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from precond.bench.memory import LiveTensorProbe
from precond.methods._twin_backward import twin_backward
from precond.models import SmallCNN


class _SideWeight(nn.Module):
    """A CNN whose head weight is transformed *before* the features run (an early side node)."""

    def __init__(self) -> None:
        super().__init__()
        self.cnn = SmallCNN(3, 10, 4, 8)

    def forward(self, x: Tensor) -> Tensor:
        w = self.cnn.head.weight * 1.5  # created before the features: a lower sequence number
        h = self.cnn.features(x).flatten(1)
        return F.linear(h, w, self.cnn.head.bias)


def _two_passes(model: nn.Module, x: Tensor, t: Tensor, v: Tensor) -> tuple[list, list]:
    ps = list(model.parameters())
    y = model(x)
    loss = F.cross_entropy(y, t)
    gu = torch.autograd.grad(loss, ps, retain_graph=True)
    gv = torch.autograd.grad(y, ps, v)
    return list(gu), list(gv)


def _assert_twin_is_two_passes(model: nn.Module, batch: int) -> None:
    """twin_backward on a fresh batch: p.grad and Jᵀv bitwise those of the two passes."""
    x = torch.randn(batch, 3, 8, 8, dtype=torch.float64)
    t = torch.randint(0, 10, (batch,))
    v = torch.randn(batch, 10, dtype=torch.float64)
    ref_u, ref_v = _two_passes(model, x, t, v)
    ps = list(model.parameters())
    for p in ps:
        p.grad = None
    y = model(x)
    got_v = twin_backward(F.cross_entropy(y, t), y, v, ps)
    assert got_v is not None
    for p, a, b, c in zip(ps, ref_u, ref_v, got_v):
        assert p.grad is not None and torch.equal(p.grad, a)
        assert c is not None and torch.equal(b, c)


def test_twin_backward_equals_two_passes_bitwise() -> None:
    torch.manual_seed(0)
    _assert_twin_is_two_passes(SmallCNN(3, 10, 4, 8).double(), 6)


def test_twin_backward_declines_where_no_cut_pays() -> None:
    # MLPs whose parameters' gradients outweigh their activations (mlp512 at a small batch):
    # every cut costs a call into the engine and saves next to nothing; _SideWeight: the only
    # cuts lie below a node the engine may run after them (the head's weight transform),
    # unsafe to free early
    for model, shape in (
        (
            nn.Sequential(
                nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
            ),
            (2, 64),
        ),
        (nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()), (4, 64)),
        (_SideWeight(), (4, 3, 8, 8)),
    ):
        x = torch.randn(shape)
        y = model(x)
        t = torch.randint(0, y.shape[1], (shape[0],))
        loss = F.cross_entropy(y, t)
        assert twin_backward(loss, y, torch.randn_like(y), list(model.parameters())) is None
        assert all(p.grad is None for p in model.parameters())  # nothing ran


def test_twin_backward_peak_memory_below_two_passes() -> None:
    # cnn_small at B = 32: the cuts below the second conv and at the first pool keep the extra
    # of the second pass well below what the two passes one after the other hold
    torch.manual_seed(0)
    model = SmallCNN(3, 10, 16, 32)
    x, t = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    ps = list(model.parameters())

    def peak(run) -> float:
        for p in ps:
            p.grad = None
        probe = LiveTensorProbe()
        assert probe.start()
        y = model(x)
        run(F.cross_entropy(y, t), y, torch.randn_like(y))
        reading = probe.stop()
        assert reading is not None
        return reading.peak_mb

    def sequential(loss: Tensor, y: Tensor, v: Tensor) -> None:
        loss.backward(retain_graph=True)
        torch.autograd.grad(y, ps, v)

    def twin(loss: Tensor, y: Tensor, v: Tensor) -> None:
        assert twin_backward(loss, y, v, ps) is not None

    one = peak(lambda loss, y, v: loss.backward())
    two = peak(sequential)
    both = peak(twin)
    assert two - one > 2.0  # MB: the retained graph
    assert both - one < 0.6 * (two - one), (one, two, both)


def test_twin_backward_frozen_parameters_get_no_gnb_gradient() -> None:
    torch.manual_seed(1)
    model = SmallCNN(3, 10, 4, 8).double()
    model.features[0].weight.requires_grad_(False)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    t = torch.randint(0, 10, (5,))
    v = torch.randn(5, 10, dtype=torch.float64)
    trained = [p for p in model.parameters() if p.requires_grad]
    y = model(x)
    ref_u = torch.autograd.grad(F.cross_entropy(y, t), trained, retain_graph=True)
    ref_v = torch.autograd.grad(y, trained, v)
    y = model(x)
    got = twin_backward(F.cross_entropy(y, t), y, v, trained[1:])  # one trained left out too
    assert got is not None
    assert model.features[0].weight.grad is None
    for p, a in zip(trained, ref_u):
        assert p.grad is not None and torch.equal(p.grad, a)
    for b, c in zip(ref_v[1:], got):
        assert c is not None and torch.equal(b, c)


def test_twin_backward_reuses_the_choice_of_cuts_for_the_same_graph(monkeypatch) -> None:
    from precond.methods import _twin_backward as tb

    calls = []
    real = tb._worthwhile_cuts

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(tb, "_worthwhile_cuts", spy)
    monkeypatch.setattr(tb, "_CHOICES", tb.BoundedCache(16))
    torch.manual_seed(2)
    model = SmallCNN(3, 10, 4, 8).double()
    for batch in (6, 6, 7):  # the third graph has other shapes: chosen anew
        _assert_twin_is_two_passes(model, batch)
    assert len(calls) == 2


def test_uncut_graphs_set() -> None:
    from precond.methods._twin_backward import UncutGraphs

    uncut = UncutGraphs(limit=2)
    uncut.add(None)
    assert None not in uncut and not len(uncut._keys)
    uncut.add("a")
    uncut.add("b")
    assert "a" in uncut and "b" in uncut
    uncut.add("c")  # full: the oldest goes
    assert "c" in uncut and "a" not in uncut and "b" in uncut


def _run(method: str, model: nn.Module, shapes: list[tuple[int, ...]], walk_every: bool = False):
    """Curvature steps of ``method`` on ``model``; the gradients written and the maker."""
    from precond import make_gradient_maker

    options = {"curvature_upd_interval": 1, "seed": 3}
    if method == "ng_diag":
        options["damping"] = 1e-2
    gm = make_gradient_maker(method, model, **options)
    if walk_every:  # a signature that never repeats: every graph is walked
        gm.graph_signature = lambda: object()  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(0)
    grads = []
    for shape in shapes:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        t = torch.randint(0, 10, (shape[0],), generator=gen)
        model.zero_grad(set_to_none=True)
        d = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, d, t)
        gm.forward_and_backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return grads, gm


def _count_walks(monkeypatch) -> list[int]:
    from precond.methods import _twin_backward as tb

    walks: list[int] = []
    real = tb._segments

    def spy(*args):
        walks.append(1)
        return real(*args)

    monkeypatch.setattr(tb, "_segments", spy)
    return walks


def _mlp() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    ).double()


def test_graph_without_cut_is_walked_once_per_signature(monkeypatch) -> None:
    # an MLP at a small batch gets no cut: later graphs of the same signature are not walked,
    # and the preconditioned gradients are those of a maker that walks every graph
    shapes = [(2, 64), (2, 64), (3, 64), (2, 64), (3, 64)]
    for method in ("sophia", "ng_diag"):
        walks = _count_walks(monkeypatch)
        got, gm = _run(method, _mlp(), shapes)
        assert len(walks) == 2, method  # batch sizes 2 and 3
        assert len(gm._uncut._keys) == 2
        walks.clear()
        ref, _ = _run(method, _mlp(), shapes, walk_every=True)
        assert len(walks) == len(shapes)
        for a, b in zip(got, ref):
            assert all(torch.equal(x, y) for x, y in zip(a, b)), method


def test_graph_with_cuts_is_walked_every_step(monkeypatch) -> None:
    torch.manual_seed(5)
    walks = _count_walks(monkeypatch)
    _, gm = _run("sophia", SmallCNN(3, 10, 4, 8).double(), [(6, 3, 8, 8)] * 3)
    assert len(walks) == 3 and not len(gm._uncut._keys)
