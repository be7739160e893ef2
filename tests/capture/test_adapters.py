"""LayerStats per-example gradients equal torch.func's, in float64, for every layer kind."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import SeqModel, TwiceLinear, per_example_grads_oracle
from torch import nn

from precond import PreconditioningConfig
from precond.capture import GRAD_TAG, HookCounter, Recorder, find_layers
from precond.capture import stats as stats_module
from precond.capture.discovery import UnsupportedModuleError


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _mse_sum(out, t):
    return F.mse_loss(out, t, reduction="sum")


def _ce_sum(out, t):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), t.reshape(-1), reduction="sum")


def _cases():
    N = 5
    yield (
        "linear",
        lambda: nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)),
        (N, 6),
        _mse_sum,
        (N, 3),
    )
    yield (
        "linear_nobias",
        lambda: nn.Sequential(nn.Linear(6, 4, bias=False), nn.Tanh(), nn.Linear(4, 3)),
        (N, 6),
        _mse_sum,
        (N, 3),
    )
    yield (
        "linear_3d",
        lambda: nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)),
        (N, 7, 6),
        _mse_sum,
        (N, 7, 3),
    )
    yield (
        "linear_4d",
        lambda: nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)),
        (N, 2, 3, 6),
        _mse_sum,
        (N, 2, 3, 3),
    )
    yield (
        "conv2d",
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 36, 3)
        ),
        (N, 3, 6, 6),
        _mse_sum,
        (N, 3),
    )
    yield (
        "conv2d_stride_dil_groups",
        lambda: nn.Sequential(
            nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
            nn.Tanh(),
            nn.Flatten(),
            nn.LazyLinear(3),
        ),
        (N, 4, 7, 6),
        _mse_sum,
        (N, 3),
    )
    yield (
        "conv2d_reflect_same",
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect"),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(3 * 25, 2),
        ),
        (N, 2, 5, 5),
        _mse_sum,
        (N, 2),
    )
    yield (
        "conv2d_depthwise_nobias",
        lambda: nn.Sequential(
            nn.Conv2d(3, 3, 3, groups=3, bias=False, padding=1, padding_mode="circular"),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(3 * 16, 2),
        ),
        (N, 3, 4, 4),
        _mse_sum,
        (N, 2),
    )
    yield (
        "conv1d",
        lambda: nn.Sequential(
            nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2),
            nn.Tanh(),
            nn.Flatten(),
            nn.LazyLinear(2),
        ),
        (N, 3, 9),
        _mse_sum,
        (N, 2),
    )
    yield (
        "batchnorm1d_eval",
        lambda: nn.Sequential(
            nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 2)
        ).eval(),
        (N, 4),
        _mse_sum,
        (N, 2),
    )
    yield (
        "batchnorm2d_eval",
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 9, 2)
        ).eval(),
        (N, 2, 5, 5),
        _mse_sum,
        (N, 2),
    )
    yield (
        "batchnorm3d_eval",
        lambda: nn.Sequential(
            nn.BatchNorm3d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 27, 2)
        ).eval(),
        (N, 2, 3, 3, 3),
        _mse_sum,
        (N, 2),
    )
    yield (
        "layernorm",
        lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 2)),
        (N, 4),
        _mse_sum,
        (N, 2),
    )
    yield (
        "layernorm_2d_shape",
        lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm([3, 6]), nn.Tanh(), nn.Linear(6, 2)),
        (N, 3, 4),
        _mse_sum,
        (N, 3, 2),
    )
    yield (
        "groupnorm",
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 9, 2)
        ),
        (N, 2, 5, 5),
        _mse_sum,
        (N, 2),
    )
    if hasattr(nn, "RMSNorm"):
        yield (
            "rmsnorm",
            lambda: nn.Sequential(nn.Linear(4, 6), nn.RMSNorm(6), nn.Tanh(), nn.Linear(6, 2)),
            (N, 4),
            _mse_sum,
            (N, 2),
        )
    yield (
        # d_in = 27 < 64 and d_out = 16: per-example Jacobians computed transposed
        "conv_narrow_inputs",
        lambda: nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(16 * 16, 2)
        ),
        (N, 3, 4, 4),
        _mse_sum,
        (N, 2),
    )
    yield "twice_linear", lambda: TwiceLinear(), (N, 4), _mse_sum, (N, 3)
    yield "seq_embedding", lambda: SeqModel(padding_idx=1), "tokens", _ce_sum, "seq_targets"


CASES = list(_cases())


def _data(in_shape, out_shape, model):
    if in_shape == "tokens":
        x = torch.randint(0, 7, (5, 6))
        x[0, 0] = 1  # a padding token
        t = torch.randint(0, 4, (5, 6))
        return x, t
    x = torch.randn(*in_shape)
    t = torch.randn(*out_shape)
    return x, t


@pytest.mark.parametrize(
    "name,model_fn,in_shape,loss_fn,out_shape", CASES, ids=[c[0] for c in CASES]
)
def test_per_example_grads_match_torch_func(name, model_fn, in_shape, loss_fn, out_shape):
    torch.manual_seed(1)
    model = model_fn()
    x, t = _data(in_shape, out_shape, model)
    model(x)  # initialise lazy modules
    part = find_layers(model, PreconditioningConfig(), needs_adapter=True)
    assert sum(len(layer.params) for layer in part.layers) == len(list(model.parameters()))
    rec = Recorder(part.layers)
    with rec.record(x.shape[0], grads=True) as stats:
        loss = loss_fn(model(x), t)
        loss.backward()
    oracle = per_example_grads_oracle(model, loss_fn, x, t)
    names = {id(p): n for n, p in model.named_parameters()}
    for layer in part.layers:
        pe = stats[layer.name].per_example_grads(GRAD_TAG)  # [1, N, G, o, i]
        for p, got in zip(layer.params, layer.from_matrix(pe[0])):
            want = oracle[names[id(p)]]
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got.sum(0), p.grad, rtol=1e-10, atol=1e-12)


def test_batchnorm_train_mode_per_example_terms_sum_to_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.BatchNorm2d(3, track_running_stats=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(27, 2),
    )
    x, t = torch.randn(6, 2, 5, 5), torch.randn(6, 2)
    part = find_layers(model, PreconditioningConfig(), needs_adapter=True)
    with Recorder(part.layers).record(6, grads=True) as stats:
        _mse_sum(model(x), t).backward()
    for layer in part.layers:
        pe = layer.from_matrix(stats[layer.name].per_example_grads()[0])
        for p, got in zip(layer.params, pe):
            torch.testing.assert_close(got.sum(0), p.grad)
    # BatchNorm's own scale/shift: ∂ℓ_n/∂γ with the whole batch in the forward (jacrev).
    from torch.func import functional_call, jacrev

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}

    def losses(p):
        out = functional_call(model, (p, buffers), (x,))
        return ((out - t) ** 2).sum(-1)

    jac = jacrev(losses)(params)
    bn = next(layer for layer in part.layers if isinstance(layer.module, nn.BatchNorm2d))
    got_w, got_b = bn.from_matrix(stats[bn.name].per_example_grads()[0])
    torch.testing.assert_close(got_w, jac["1.weight"])
    torch.testing.assert_close(got_b, jac["1.bias"])


def test_frozen_weight_trained_bias():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    part = find_layers(model, PreconditioningConfig(), needs_adapter=True)
    first = part.layers[0]
    assert first.params == [model[0].bias] and first.shape == (1, 4, 1)
    x, t = torch.randn(5, 3), torch.randn(5, 2)
    with Recorder(part.layers).record(5, grads=True) as stats:
        _mse_sum(model(x), t).backward()
    (gb,) = first.from_matrix(stats[first.name].per_example_grads()[0])
    torch.testing.assert_close(gb.sum(0), model[0].bias.grad)


def test_flattened_batch_folds_to_examples():
    # A Linear applied to [N*T, d] (flattened by the model) is folded back to [N, T, ...].
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x.reshape(-1, 3)).reshape(x.shape[0], -1)

    model = Flat()
    x, t = torch.randn(4, 5, 3), torch.randn(4, 10)
    part = find_layers(model, PreconditioningConfig(), needs_adapter=True)
    with Recorder(part.layers).record(4, grads=True) as stats:
        _mse_sum(model(x), t).backward()
    oracle = per_example_grads_oracle(model, _mse_sum, x, t)
    w, b = part.layers[0].from_matrix(stats["fc"].per_example_grads()[0])
    torch.testing.assert_close(w, oracle["fc.weight"])
    torch.testing.assert_close(b, oracle["fc.bias"])


def test_extra_backprop_matches_autograd_and_inplace_fallback():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(3, 4)
            self.fc2 = nn.Linear(4, 2)

        def forward(self, x):
            h = self.fc1(x)
            h.mul_(3.0)  # in-place on a captured output
            return self.fc2(torch.tanh(h))

    for model in (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), InPlace()):
        x = torch.randn(5, 3)
        part = find_layers(model, PreconditioningConfig(), needs_adapter=True)
        rec = Recorder(part.layers)
        vecs = torch.randn(2, 5, 2)
        with rec.record(5) as stats:
            out = model(x)
            rec.backprop(out, vecs, "probe")
        for layer in part.layers:
            pe = stats[layer.name].per_example_grads("probe")  # [2, N, 1, o, i]
            for k in range(2):
                model.zero_grad()
                out2 = model(x)
                out2.backward(vecs[k])
                got = layer.from_matrix(pe[k].sum(0))
                for p, g in zip(layer.params, got):
                    torch.testing.assert_close(g, p.grad)


def test_unsupported_modules_policy():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x * self.scale)

    model = Custom()
    with pytest.raises(
        UnsupportedModuleError,
        match=r"Invalid module '<root>' \(Custom\): kfac cannot precondition it \(no capture adapter",
    ):
        find_layers(model, PreconditioningConfig(), needs_adapter=True, method="kfac")
    part = find_layers(model, PreconditioningConfig(unsupported="skip"), needs_adapter=True)
    assert part.plain == [model.scale] and [layer.name for layer in part.layers] == ["fc"]
    part = find_layers(model, PreconditioningConfig(unsupported="diag"), needs_adapter=True)
    assert [layer.params for layer in part.fallback] == [[model.scale]]
    part = find_layers(model, PreconditioningConfig(), needs_adapter=False)
    assert len(part.layers) == 2
    part = find_layers(model, PreconditioningConfig(ignore_modules=[""]), needs_adapter=True)
    assert part.layers == [] and len(part.plain) == 3


def test_tied_weights_are_unsupported_for_the_second_module():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.out = nn.Linear(3, 5, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, x):
            return self.out(self.emb(x))

    with pytest.raises(UnsupportedModuleError, match="shares \\(ties\\) a parameter"):
        find_layers(Tied(), PreconditioningConfig(), needs_adapter=True)


def test_hooks_are_removed_after_recording():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    part = find_layers(model, PreconditioningConfig(), needs_adapter=True)
    rec = Recorder(part.layers)
    HookCounter.reset()
    with rec.record(2):
        model(torch.randn(2, 3))
    assert HookCounter.forward_calls == 2
    model(torch.randn(2, 3)).sum().backward()
    assert HookCounter.forward_calls == 2 and HookCounter.grad_calls == 0


def test_call_without_gradient_contributes_zeros_after_recording_ends():
    """A module call whose output does not reach the loss yields zero output gradients, also
    when the statistics are read after the recording context has exited."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            unused = self.fc(x * 2.0)  # second call, never used by the loss
            del unused
            return self.fc(x)

    model = Branchy()
    x = torch.randn(4, 3)
    part = find_layers(model, PreconditioningConfig(), needs_adapter=True)
    with Recorder(part.layers).record(4, grads=True) as stats:
        model(x).sum().backward()
    st = stats["fc"]
    assert st.num_calls == 2
    g = st.g(GRAD_TAG)  # [1, N, S=2 calls, 1, 3]
    assert g.shape == (1, 4, 2, 1, 3)
    assert torch.count_nonzero(g[:, :, 0]) == 0
    pe = part.layers[0].from_matrix(st.per_example_grads()[0])
    torch.testing.assert_close(pe[0].sum(0), model.fc.weight.grad)


@pytest.mark.parametrize(
    "name,model_fn,in_shape,loss_fn,out_shape", CASES, ids=[c[0] for c in CASES]
)
def test_chunked_per_example_grads_and_positions(
    monkeypatch, name, model_fn, in_shape, loss_fn, out_shape
):
    """Per-example gradients formed one example at a time (the smallest chunk) equal the
    torch.func oracle, and num_positions() gives S without forming the canonical inputs."""
    monkeypatch.setattr(stats_module, "CHUNK_NUMEL", 1)
    torch.manual_seed(2)
    model = model_fn()
    x, t = _data(in_shape, out_shape, model)
    model(x)
    part = find_layers(model, PreconditioningConfig(), needs_adapter=True)
    rec = Recorder(part.layers)
    rec.keep_outputs = False
    with rec.record(x.shape[0], grads=True) as stats:
        loss_fn(model(x), t).backward()
    oracle = per_example_grads_oracle(model, loss_fn, x, t)
    names = {id(p): n for n, p in model.named_parameters()}
    for layer in part.layers:
        st = stats[layer.name]
        assert st.raw_outputs == []
        positions = st.num_positions()
        pe = st.per_example_grads(GRAD_TAG)
        assert st._x_cache is None or not st.adapter.per_example_inputs
        for p, got in zip(layer.params, layer.from_matrix(pe[0])):
            torch.testing.assert_close(got, oracle[names[id(p)]], rtol=1e-10, atol=1e-12)
        if st.adapter.one_hot_input:
            assert positions == st.a_indices().shape[1]
        else:
            assert positions == st.x().shape[1]


def test_statistics_do_not_outlive_the_step_through_the_graph():
    """The output's graph (kept by the caller) does not keep the recorded statistics alive."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 9, 2))
    part = find_layers(model, PreconditioningConfig(), needs_adapter=True)
    rec = Recorder(part.layers)
    with rec.record(4, grads=True) as stats:
        out = model(torch.randn(4, 2, 5, 5))
        out.sum().backward()
    ref = weakref.ref(stats["0"])
    del stats
    gc.collect()
    assert out.grad_fn is not None and ref() is None


def test_extra_backprop_without_kept_outputs_matches_autograd():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(27, 2))
    x = torch.randn(5, 2, 5, 5)
    part = find_layers(model, PreconditioningConfig(), needs_adapter=True)
    rec = Recorder(part.layers)
    rec.keep_outputs = False
    vecs = torch.randn(2, 5, 2)
    with rec.record(5) as stats:
        out = model(x)
        rec.backprop(out, vecs, "probe")
    for layer in part.layers:
        pe = stats[layer.name].per_example_grads("probe")
        for k in range(2):
            model.zero_grad()
            model(x).backward(vecs[k])
            for p, g in zip(layer.params, layer.from_matrix(pe[k].sum(0))):
                torch.testing.assert_close(g, p.grad)


@pytest.mark.parametrize(
    "name,model_fn,in_shape,loss_fn,out_shape", CASES, ids=[c[0] for c in CASES]
)
def test_input_chunks_together_are_the_inputs(
    name, model_fn, in_shape, loss_fn, out_shape, monkeypatch
):
    import precond.capture.stats as stats_module
    from precond.curvature import fisher

    torch.manual_seed(1)
    model = model_fn()
    x, t = _data(in_shape, out_shape, model)
    model(x)  # initialise lazy modules
    part = find_layers(model, PreconditioningConfig(), needs_adapter=True)
    monkeypatch.setattr(stats_module, "CHUNK_NUMEL", 1)  # one example per chunk
    with Recorder(part.layers).record(x.shape[0], grads=True) as stats:
        loss_fn(model(x), t).backward()
    for layer in part.layers:
        st = stats[layer.name]
        if st.adapter.one_hot_input:
            continue
        chunked = fisher.kron_input_factor(st)  # from the chunks (nothing cached yet)
        rows = sum(c.shape[0] * c.shape[1] for c in st.input_chunks())
        whole = st.x()
        assert rows == whole.shape[0] * whole.shape[1]
        torch.testing.assert_close(fisher.kron_input_factor(st), chunked)  # x() now cached


@pytest.mark.parametrize("k, groups", [(1, 1), (1, 2), (2, 1)])
@pytest.mark.parametrize("d_out, d_in", [(16, 27), (4, 27), (16, 70)])
def test_example_jacobians_fast_paths_match_einsum(k, groups, d_out, d_in):
    """The batched-product and transposed paths of the per-example Jacobians equal the
    general einsum (bitwise for the untransposed product)."""
    from precond.capture.stats import _example_jacobians

    torch.manual_seed(0)
    g = torch.randn(k, 3, 5, groups, d_out)
    x = torch.randn(3, 5, groups, d_in)
    want = torch.einsum("knsgo,nsgi->kngoi", g, x)
    got = _example_jacobians(g, x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)
    if not (k == 1 and d_in < 64 and d_out >= 16):
        assert torch.equal(got, want)


def test_checkpointed_layers_record_one_call_with_the_gradients_of_the_first():
    """Non-reentrant activation checkpointing runs a block's forward again inside the backward
    pass; the recorder ignores those recomputations (one call per layer, inputs not held
    twice) and the per-example gradients equal those without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4))
    head = nn.Linear(4, 2)
    x = torch.randn(5, 3)
    part = find_layers(nn.Sequential(inner, head), PreconditioningConfig(), needs_adapter=True)
    got = {}
    for checkpointed in (False, True):
        rec = Recorder(part.layers)
        with rec.record(5, grads=True) as stats:
            h = checkpoint(inner, x, use_reentrant=False) if checkpointed else inner(x)
            head(h).square().sum().backward()
            rec_calls = {name: st.num_calls for name, st in stats.items()}
            got[checkpointed] = {n: st.per_example_grads(GRAD_TAG) for n, st in stats.items()}
        assert rec_calls == {layer.name: 1 for layer in part.layers}, rec_calls
    for name, want in got[False].items():
        torch.testing.assert_close(got[True][name], want)
