"""One suite over the registry: every method joins it by registering.

Per-method options that the generic problems need live in ``OPTIONS``; nothing is skipped.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import zoo
from torch import nn
from torch.utils.checkpoint import checkpoint

import precond
from precond.capture.discovery import UnsupportedModuleError
from precond.models import SmallCNN
from precond.numerics import NumericalWarning, reset_warnings
from precond.registry import make_gradient_maker

METHODS = list(precond.methods())

# Options and SGD learning rates for the generic problems (defaults otherwise).
OPTIONS: dict[str, dict] = {}
LR: dict[str, float] = {"curveball": 1.0}


def _options(name, **extra):
    opts = dict(OPTIONS.get(name, {}))
    opts.update(extra)
    return opts


def _step(gm, model, x, t, task):
    d = gm.setup_model_call(model, x)
    if task == "seq":
        gm.setup_loss_call(F.cross_entropy, d.view(-1, d.size(-1)), t.view(-1))
    else:
        gm.setup_loss_call(F.cross_entropy, d, t)
    return gm.forward_and_backward()


@pytest.mark.parametrize("name", METHODS)
def test_loss_decreases_on_well_conditioned_problem(name):
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    w = torch.randn(6, 3)
    t = (x @ w).argmax(-1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    gm = make_gradient_maker(name, model, **_options(name))
    opt = torch.optim.SGD(model.parameters(), lr=LR.get(name, 0.05))
    first = None
    for _ in range(30):
        opt.zero_grad()
        _, loss = _step(gm, model, x, t, "cls")
        opt.step()
        first = float(loss.detach()) if first is None else first
    final = float(F.cross_entropy(model(x), t).detach())
    assert final < 0.7 * first, (first, final)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("model_name", list(zoo()))
def test_every_parameter_gets_a_finite_gradient_on_every_step(name, model_name):
    model_fn, data_fn, task = zoo()[model_name]
    torch.manual_seed(0)
    model = model_fn()
    gm = make_gradient_maker(name, model, **_options(name, curvature_upd_interval=2))
    for step in range(4):
        x, t = data_fn(8)
        model.zero_grad(set_to_none=True)
        _step(gm, model, x, t, task)
        for pname, p in model.named_parameters():
            assert p.grad is not None, (step, pname)
            assert torch.isfinite(p.grad).all(), (step, pname)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("model_name", list(zoo()))
def test_every_layer_kind_under_autocast_gets_finite_gradients_without_fallbacks(name, model_name):
    """Under the caller's bfloat16 autocast every layer kind (convolutions, normalisations,
    embeddings, attention) gets finite float32 gradients on every step, and no method falls
    back or skips anything (no ``NumericalWarning``)."""
    model_fn, data_fn, task = zoo()[model_name]
    torch.manual_seed(0)
    model = model_fn()
    gm = make_gradient_maker(name, model, **_options(name, curvature_upd_interval=2))
    reset_warnings()  # warned-once causes of earlier tests warn again
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)
        for step in range(4):
            x, t = data_fn(8)
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _step(gm, model, x, t, task)
            for pname, p in model.named_parameters():
                assert p.grad is not None and p.grad.dtype == torch.float32, (step, pname)
                assert torch.isfinite(p.grad).all(), (step, pname)


class _Checkpointed(nn.Module):
    """Two layers whose activations are recomputed in the backward pass (or not)."""

    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        self.checkpointed = checkpointed
        self.a, self.b, self.c = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def block(self, h):
        return torch.tanh(self.b(torch.tanh(self.a(h))))

    def forward(self, x):
        if self.checkpointed:
            return self.c(checkpoint(self.block, x, use_reentrant=False))
        return self.c(self.block(x))


@pytest.mark.parametrize("name", METHODS)
def test_activation_checkpointing_gives_the_same_preconditioned_gradient(name):
    """With activation checkpointing the layers inside the block run twice (the forward pass
    and its recomputation in the backward pass); the method sees one call per layer and its
    gradients equal those without checkpointing (float64)."""
    x, t = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = _Checkpointed(checkpointed).double()
        gm = make_gradient_maker(name, model, **_options(name, curvature_upd_interval=1))
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            _step(gm, model, x, t, "cls")
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", METHODS)
def test_compiled_model_gets_the_same_preconditioned_gradient(name):
    """A ``torch.compile``'d model works with every method and gives the uncompiled model's
    gradients (float64): steps that differentiate the gradient (Hessian or GGN products, which
    compiled autograd cannot differentiate twice) call the original module, the others the
    compiled one."""
    torch._dynamo.reset()
    x, t = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    grads = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
        call = torch.compile(model, backend="aot_eager") if compiled else model
        # built on the compiled module here (on the model itself in the test below)
        gm = make_gradient_maker(name, call, **_options(name, curvature_upd_interval=2))
        steps = []
        for _ in range(3):  # curvature, plain, curvature
            model.zero_grad(set_to_none=True)
            _step(gm, call, x, t, "cls")
            steps.append([p.grad for p in model.parameters()])
        grads.append(steps)
    torch._dynamo.reset()
    for a, b in zip(grads[0], grads[1]):
        for ga, gb in zip(a, b):
            torch.testing.assert_close(gb, ga, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "name, compiled_steps", [("kfac", [True, True, True]), ("hessian_free", [False, True, False])]
)
def test_compiled_model_runs_compiled_except_where_the_gradient_is_differentiated(
    name, compiled_steps
):
    """Of three steps (curvature, plain, curvature) K-FAC runs all compiled (its capture hooks
    split the graph on curvature steps), Hessian-free the plain one only (its curvature steps
    differentiate the gradient)."""
    torch._dynamo.reset()
    calls = []

    def counting(graph, example_inputs):
        def run(*args):
            calls.append(1)
            return graph.forward(*args)

        return run

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    compiled = torch.compile(model, backend=counting)
    gm = make_gradient_maker(name, model, curvature_upd_interval=2)
    x, t = torch.randn(8, 6), torch.randint(0, 3, (8,))
    ran = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        before = len(calls)
        _step(gm, compiled, x, t, "cls")
        ran.append(len(calls) > before)
    torch._dynamo.reset()
    assert ran == compiled_steps


def test_compiled_submodule_with_double_backward_is_a_clear_error():
    """A compiled part inside the model cannot be bypassed; methods that differentiate the
    gradient say so instead of failing deep inside autograd."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    model[0] = torch.compile(model[0], backend="aot_eager")
    gm = make_gradient_maker("hessian_free", model)
    x, t = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with (
        warnings.catch_warnings(),
        pytest.raises(ValueError, match=r"Invalid model: .*torch\.compile.*compile the whole"),
    ):
        warnings.simplefilter("ignore", NumericalWarning)  # the graph tangent's fallback
        _step(gm, model, x, t, "cls")
    torch._dynamo.reset()


@pytest.mark.parametrize("name", [m for m in METHODS if m != "plain"])
def test_sparse_embedding_is_refused_early_or_skipped_on_request(name):
    """No method preconditions sparse gradients (``nn.Embedding(sparse=True)``): construction
    fails naming the module, also under ``unsupported='diag'`` (the fallback cannot either);
    with ``unsupported='skip'`` the embedding keeps its plain sparse gradient and the rest is
    preconditioned."""
    from tests.helpers import SeqModel

    _, data_fn, task = zoo()["seq"]
    torch.manual_seed(0)
    model = SeqModel()
    model.emb.sparse = True
    for policy in ("error", "diag"):
        with pytest.raises(UnsupportedModuleError, match=r"'emb' \(Embedding\).*sparse=True"):
            make_gradient_maker(name, model, **_options(name, unsupported=policy))
    gm = make_gradient_maker(name, model, **_options(name, unsupported="skip"))
    for step in range(3):
        x, t = data_fn(8)
        model.zero_grad(set_to_none=True)
        _step(gm, model, x, t, task)
        emb = model.emb.weight.grad
        assert emb is not None and emb.layout == torch.sparse_coo
        ref = copy.deepcopy(model)
        ref.zero_grad(set_to_none=True)
        out = ref(x)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), t.reshape(-1)).backward()
        torch.testing.assert_close(emb.to_dense(), ref.emb.weight.grad.to_dense())
        for pname, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad.to_dense()).all(), (step, pname)


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trip_resumes_exactly(name):
    model_fn, data_fn, task = zoo()["mlp"]
    torch.manual_seed(0)
    batches = [data_fn(8) for _ in range(6)]

    def run(model, gm, opt, bs):
        for x, t in bs:
            opt.zero_grad()
            _step(gm, model, x, t, task)
            opt.step()

    model = model_fn()
    gm = make_gradient_maker(name, model, **_options(name, curvature_upd_interval=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run(model, gm, opt, batches[:3])
    buf = io.BytesIO()
    torch.save({"gm": gm.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}, buf)
    run(model, gm, opt, batches[3:])
    expected = [p.detach().clone() for p in model.parameters()]

    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model2 = model_fn()
    model2.load_state_dict(saved["model"])
    gm2 = make_gradient_maker(name, model2, **_options(name, curvature_upd_interval=2))
    gm2.load_state_dict(saved["gm"])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(saved["opt"])
    run(model2, gm2, opt2, batches[3:])
    for a, b in zip(expected, model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", METHODS)
def test_a_state_of_another_model_or_method_is_refused_before_anything_is_loaded(name):
    """Loading the state of a model of other widths, or of another method, is a clear error
    (many methods used to load it and fail mid-step, or run on); the maker keeps its state."""
    torch.manual_seed(0)
    x, t = torch.randn(8, 6), torch.randint(0, 3, (8,))

    def trained(width, method=name):
        model = nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, 3))
        gm = make_gradient_maker(method, model, **_options(method, curvature_upd_interval=2))
        _step(gm, model, x, t, "cls")
        return gm

    mine = trained(8)
    buf = io.BytesIO()
    torch.save(mine.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf)  # weights_only: the state is plain tensors and containers
    other = trained(5)
    with pytest.raises(ValueError, match=r"parameter 0 \('0.weight'\) saved with shape \[8, 6\]"):
        other.load_state_dict(saved)
    assert other.step == 1  # nothing loaded
    another = "plain" if name != "plain" else "kfac"
    with pytest.raises(ValueError, match="load a state saved by the same method"):
        trained(8, another).load_state_dict(saved)
    same = trained(8)
    same.load_state_dict(saved)  # the same architecture and method load


@pytest.mark.parametrize("name", METHODS)
def test_frozen_and_ignored_parameters_keep_plain_gradients(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    model[0].weight.requires_grad_(False)
    x, t = torch.randn(16, 6), torch.randint(0, 3, (16,))
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), t).backward()
    gm = make_gradient_maker(name, model, **_options(name, ignore_modules=["4"]))
    _step(gm, model, x, t, "cls")
    assert model[0].weight.grad is None
    torch.testing.assert_close(model[4].weight.grad, ref[4].weight.grad)
    torch.testing.assert_close(model[4].bias.grad, ref[4].bias.grad)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_dtype_preserved(name, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    x, t = torch.randn(8, 6, dtype=dtype), torch.randint(0, 3, (8,))
    gm = make_gradient_maker(name, model, **_options(name))
    _step(gm, model, x, t, "cls")
    for p in model.parameters():
        assert p.grad.dtype == dtype


PRECONDITIONERS = [m for m in METHODS if m != "plain"]


@pytest.mark.parametrize("name", PRECONDITIONERS)
def test_updates_are_amortised(name, monkeypatch):
    """With T = 3, curvature and preconditioner work happens on steps 0, 3, 6 only."""
    from precond.capture import HookCounter

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    gm = make_gradient_maker(name, model, **_options(name, curvature_upd_interval=3))
    calls = {"curvature": [], "preconditioner": [], "hooks": []}
    orig_c, orig_p = gm.update_curvature, gm.update_preconditioner

    def upd_c(*a, **k):
        calls["curvature"].append(gm.step)
        return orig_c(*a, **k)

    def upd_p(*a, **k):
        calls["preconditioner"].append(gm.step)
        return orig_p(*a, **k)

    monkeypatch.setattr(gm, "update_curvature", upd_c)
    monkeypatch.setattr(gm, "update_preconditioner", upd_p)
    for step in range(7):
        HookCounter.reset()
        x, t = torch.randn(8, 6), torch.randint(0, 3, (8,))
        model.zero_grad()
        _step(gm, model, x, t, "cls")
        if HookCounter.forward_calls or HookCounter.grad_calls:
            calls["hooks"].append(step)
    assert calls["curvature"] == [0, 3, 6]
    assert calls["preconditioner"] == [0, 3, 6]
    assert set(calls["hooks"]) <= {0, 3, 6}


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", PRECONDITIONERS)
def test_non_finite_batch_does_not_crash_or_poison_later_steps(name, bad_value):
    """A batch with a NaN or infinite input: no exception, a warning at most; later finite
    batches give finite gradients again (the non-finite statistics were not folded in)."""
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    gm = make_gradient_maker(name, model, **_options(name))
    x, t = torch.randn(8, 6), torch.randint(0, 3, (8,))
    model.zero_grad()
    _step(gm, model, x, t, "cls")
    bad = x.clone()
    bad[0, 0] = bad_value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.zero_grad()
        _step(gm, model, bad, t, "cls")
        for _ in range(2):
            model.zero_grad()
            _step(gm, model, x, t, "cls")
    for p in model.parameters():
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("name", METHODS)
def test_freezing_a_parameter_mid_run(name):
    """Freezing a parameter after construction (fine-tuning schedules) is honoured: it gets no
    gradient, the others keep working."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    gm = make_gradient_maker(name, model, **_options(name, curvature_upd_interval=2))
    x, t = torch.randn(8, 6), torch.randint(0, 3, (8,))
    model.zero_grad(set_to_none=True)
    _step(gm, model, x, t, "cls")
    model[0].weight.requires_grad_(False)
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        _step(gm, model, x, t, "cls")
        assert model[0].weight.grad is None
        for p in (model[0].bias, model[2].weight, model[2].bias):
            assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", METHODS)
def test_an_input_that_requires_grad_gets_the_plain_input_gradient(name):
    """An input that requires a gradient (adversarial training reads ``x.grad``) gets what
    ``loss.backward()`` gives it on every step, curvature steps included, whatever the method
    (the methods that take the gradient with ``autograd.grad`` on the parameters used to leave
    it ``None``); so does a leaf the loss call reads (a learned temperature)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    gm = make_gradient_maker(name, model, **_options(name, curvature_upd_interval=2))
    for step in range(3):
        x = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
        t = torch.randint(0, 3, (8,))
        w = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)  # a temperature
        snapshot = copy.deepcopy(model)
        ref_x, ref_w = torch.autograd.grad(F.cross_entropy(snapshot(x) / w, t), (x, w))
        model.zero_grad(set_to_none=True)
        d = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, d / w, t)
        gm.forward_and_backward()
        assert x.grad is not None and w.grad is not None, f"step {step}"
        torch.testing.assert_close(x.grad, ref_x, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(w.grad, ref_w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", METHODS)
def test_bfloat16_model_gets_finite_gradients_of_its_own_dtype(name):
    """A model held in bfloat16 trains: every step writes finite gradients of the parameters'
    dtype (the statistics run in float32 or better)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.bfloat16)
    gm = make_gradient_maker(name, model, **_options(name, curvature_upd_interval=2))
    x, t = torch.randn(8, 6, dtype=torch.bfloat16), torch.randint(0, 3, (8,))
    for _ in range(4):  # curvature steps and steps in between
        model.zero_grad(set_to_none=True)
        _step(gm, model, x, t, "cls")
        for p in model.parameters():
            assert p.grad is not None and p.grad.dtype == torch.bfloat16, name
            assert torch.isfinite(p.grad.float()).all(), name


def _floating_state(state, path="state"):
    """``(path, dtype)`` of every floating-point tensor in a nested state dict."""
    if isinstance(state, torch.Tensor):
        return [(path, state.dtype)] if state.is_floating_point() else []
    if not isinstance(state, dict | list | tuple):
        return []
    items = state.items() if isinstance(state, dict) else enumerate(state)
    return [x for k, v in items for x in _floating_state(v, f"{path}/{k}")]


@pytest.mark.parametrize("name", METHODS)
def test_autocast_runs_the_model_in_low_precision_and_the_method_in_float32(name):
    """Under the caller's ``torch.autocast`` (mixed precision) the model and the loss run in
    bfloat16 and everything else in float32: the step writes finite float32 gradients, every
    statistic and preconditioner in the state is float32 or better, and the loss falls on a
    well-conditioned problem as it does without autocast and stays down (the least loss of the
    last ten steps: some methods spike at this learning rate with or without autocast, while a
    solve spoiled by low-precision products diverges for good). Methods declaring
    ``full_precision_curvature`` run their curvature steps (every other step here) in float32."""
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    t = (x @ torch.randn(6, 3)).argmax(-1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    gm = make_gradient_maker(name, model, **_options(name, curvature_upd_interval=2))
    full = getattr(gm, "full_precision_curvature", False)
    opt = torch.optim.SGD(model.parameters(), lr=LR.get(name, 0.05))
    losses = []
    for step in range(30):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = _step(gm, model, x, t, "cls")
        losses.append(float(loss.detach()))
        # the model ran under autocast (or, on full-precision curvature steps, without it)
        low = not (full and step % 2 == 0)
        assert gm.loss_inputs().logits.dtype == (torch.bfloat16 if low else torch.float32)
        for p in model.parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32, name
            assert torch.isfinite(p.grad).all(), name
        opt.step()
    low = [(path, dt) for path, dt in _floating_state(gm.state_dict()) if dt.itemsize < 4]
    assert not low, low
    assert min(losses[-10:]) < 0.7 * losses[0], losses


#: Methods whose result moves at the size of the rounding (checked: scaling the input by
#: 1 + 1e-13 moves them as much as the memory format does): SOAP's Adam runs in an eigenbasis
#: that is arbitrary within the factors' degenerate (null) eigenspaces, Hessian-free's conjugate
#: gradient stops on a tolerance, PSGD's step size normalisation picks a row by ``argmax``.
ROUNDING_SENSITIVE = {"hessian_free", "soap", "psgd"}


@pytest.mark.parametrize("name", METHODS)
def test_channels_last_model_gets_the_same_preconditioned_gradient(name):
    """A model and input in ``channels_last`` memory format (faster convolutions and pooling on
    CPUs) are preconditioned as in the default format: the adapters read the parameters and
    the captured tensors by their logical shapes, whatever the strides."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    t = torch.randint(0, 10, (8,))
    base = SmallCNN(3, 10, 4, 16).double()

    def run(channels_last):
        torch.manual_seed(1)
        model, xx = copy.deepcopy(base), x
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            xx = x.contiguous(memory_format=torch.channels_last)
            assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
        gm = make_gradient_maker(name, model, **_options(name, curvature_upd_interval=1))
        out = []
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            _step(gm, model, xx, t, "cls")
            out.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
            with torch.no_grad():
                for p in model.parameters():
                    p.sub_(1e-2 * p.grad)
        return torch.cat(out)

    want, got = run(False), run(True)
    assert torch.isfinite(got).all()
    if name not in ROUNDING_SENSITIVE:
        # matrix roots and eigenbases of (nearly) degenerate factors move by ~1e-10 of the largest
        # entry; a misread layout moves entries by their own size
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8 * float(want.abs().max()))
