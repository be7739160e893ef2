"""The saved-graph count: once per graph signature, the same value as counting every graph."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from precond import make_gradient_maker
from precond.methods import _saved
from precond.methods._saved import SavedCounter, SavedCounts, gradient_with_saved


def _loss(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    t = torch.randint(0, 2, (n,), generator=g)
    return F.cross_entropy(model(x), t)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


def _count_entries(monkeypatch) -> list:
    """The SavedCounters entered from now on (each a graph counted with hooks)."""
    entered = []
    real = SavedCounter.__enter__

    def spy(self):
        entered.append(self)
        return real(self)

    monkeypatch.setattr(SavedCounter, "__enter__", spy)
    return entered


def test_counts_reused_per_key_and_equal_to_a_fresh_count():
    model = _model()
    params = list(model.parameters())
    counts = SavedCounts()
    _, fresh7 = gradient_with_saved(_loss(model, 7), params)
    _, fresh9 = gradient_with_saved(_loss(model, 9), params)
    assert fresh7 != fresh9  # the hidden layer's saved gradient grows with the batch
    _, first = gradient_with_saved(_loss(model, 7), params, counts, key=7)
    _, again = gradient_with_saved(_loss(model, 7, seed=1), params, counts, key=7)
    _, other = gradient_with_saved(_loss(model, 9), params, counts, key=9)
    assert first == again == fresh7
    assert other == fresh9


def test_known_key_installs_no_hooks(monkeypatch):
    model = _model()
    params = list(model.parameters())
    counts = SavedCounts()
    entered = _count_entries(monkeypatch)
    for seed in range(3):
        grads, _ = gradient_with_saved(_loss(model, 4, seed), params, counts, key="k")
        assert all(g.requires_grad for g in grads)  # still the graph of the gradient
    assert len(entered) == 1
    gradient_with_saved(_loss(model, 4), params, counts, key=None)
    gradient_with_saved(_loss(model, 4), params)
    assert len(entered) == 3  # no key, no cache: counted every time


def test_full_cache_drops_the_oldest_and_a_failing_block_stores_nothing():
    model = _model()
    counts = SavedCounts(limit=2)
    for key in ("a", "b", "c"):
        with counts.counting(_loss(model, 3), key):
            pass
    assert len(counts._known) == 2 and "a" not in counts._known
    assert "b" in counts._known and "c" in counts._known
    with pytest.raises(RuntimeError, match="boom"), counts.counting(_loss(model, 3), "d"):
        raise RuntimeError("boom")
    assert "d" not in counts._known
    counts.clear()
    assert not len(counts._known)


def _step(gm, model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = gm.setup_model_call(model, torch.randn(n, 3, generator=g))
    gm.setup_loss_call(F.cross_entropy, d, torch.randint(0, 2, (n,), generator=g))
    gm.forward_and_backward()


@pytest.mark.parametrize(
    "method,options",
    [
        ("adahessian", {}),
        ("sophia", {"estimator": "hutchinson"}),
        ("psgd", {}),
        ("hessian_free", {"curvature": "hessian", "cg_max_iters": 2}),
        ("lissa", {"curvature": "hessian", "depth": 2}),
        ("curveball", {"curvature": "hessian"}),
    ],
)
def test_methods_count_each_signature_once(monkeypatch, method, options):
    """A method's graph memory is that of a fresh count, counted at the first graph of a shape."""
    model = _model()
    options = {**options, "curvature_upd_interval": 1}
    gm = make_gradient_maker(method, model, **options)
    entered = _count_entries(monkeypatch)
    values = {}
    for n, seed in ((7, 0), (7, 1), (9, 2), (7, 3), (9, 4)):
        _step(gm, model, n, seed)
        values.setdefault(n, set()).add(gm.graph_numel)
    assert len(entered) == 2  # batch sizes 7 and 9
    assert all(len(v) == 1 for v in values.values())
    assert values[7] != values[9]
    # the same numbers as a gradient maker that counts every graph
    fresh = make_gradient_maker(method, _model(), **options)
    monkeypatch.setattr(fresh, "graph_signature", lambda: object())
    _step(fresh, fresh.model, 9, 2)
    assert {fresh.graph_numel} == values[9]
    assert len(entered) == 3


def test_signature_tracks_what_shapes_the_graph():
    model = _model()
    gm = make_gradient_maker("adahessian", model)
    x, t = torch.randn(4, 3), torch.randint(0, 2, (4,))

    def signature(x, t, **kwargs):
        d = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, d, t, **kwargs)
        return gm.graph_signature()

    base = signature(x, t)
    assert hash(base) == hash(signature(torch.randn(4, 3), torch.randint(0, 2, (4,))))
    assert base == signature(torch.randn(4, 3), torch.randint(0, 2, (4,)))
    assert base != signature(torch.randn(5, 3), torch.randint(0, 2, (5,)))
    assert base != signature(x.double(), t)
    assert base != signature(x, t, label_smoothing=0.1)
    model[0].weight.requires_grad_(False)
    assert base != signature(x, t)
    model[0].weight.requires_grad_(True)
    model[1].eval()
    assert base != signature(x, t)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert base != signature(x, t)
    with torch.no_grad():
        assert base != signature(x, t)
    assert base == signature(x, t)


def test_counted_is_what_the_counter_read():
    model = _model()
    counts = SavedCounts()
    with counts.counting(_loss(model, 5), "k") as first:
        torch.autograd.grad(_loss(model, 5), list(model.parameters()), create_graph=True)
    assert isinstance(first, SavedCounter)
    with counts.counting(_loss(model, 5), "k") as known:
        pass
    assert isinstance(known, _saved.Counted)
    assert (known.numel, known.working_numel) == (first.numel, first.working_numel)
