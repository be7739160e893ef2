"""GGN products with ``J v`` by forward mode against dense oracles.

Both forward modes: tangents pushed through the retained graph (``graph``, the default) and a
replay of the model call with dual tensors (``forward``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import ConvBN, dense_ggn
from tests.methods._second_order_cases import run_step
from torch import nn

from precond import make_gradient_maker
from precond.curvature import products
from precond.numerics import NumericalWarning, reset_warnings


def _grab_products(gm, model, x, t, loss_fn=F.cross_entropy, mode="forward", n=2):
    """Run one curvature step; return the method's GGN products and ``products.ggn_vp``'s."""
    gm.jvp_mode = mode
    seen: dict[str, object] = {}

    def grab(stats):
        batch = gm.batch
        seen["forward"] = batch._tangent is not None
        z = gm.loss_inputs().logits
        gen = torch.Generator().manual_seed(1)
        vs = [torch.randn(batch.vec.numel, generator=gen, dtype=torch.float64) for _ in range(n)]
        seen["ours"] = [batch.ggn(v) for v in vs]
        seen["ref"] = [
            torch.cat(
                [
                    u.reshape(-1)
                    for u in products.ggn_vp(
                        batch.loss, z, batch.params, batch.vec.unflatten(v.to(z.dtype))
                    )
                ]
            )
            for v in vs
        ]
        seen["used_forward"] = batch._tangent is not None and not batch.forward_failed

    gm.update_curvature = grab
    run_step(gm, model, x, t, loss_fn)
    return seen


def _assert_equal_products(seen):
    for ours, ref in zip(seen["ours"], seen["ref"]):
        torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-10, atol=1e-12)


MODES = ["graph", "forward"]


def _assert_graph_mode_without_fallback(model, x):
    """Graph-mode GGN products with no node left to reverse mode equal ``ggn_vp``'s."""
    t = torch.randint(0, 3, (x.shape[0],))
    gm = make_gradient_maker("hessian_free", model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)  # no fallback to reverse mode
        seen = _grab_products(gm, model, x, t, mode="graph")
    assert seen["forward"] and seen["used_forward"]
    _assert_equal_products(seen)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["hessian_free", "lissa", "curveball"])
def test_forward_mode_products_equal_ggn_vp_and_dense_ggn_on_an_mlp(method, mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, t = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    gm = make_gradient_maker(method, model)
    seen = _grab_products(gm, model, x, t, mode=mode)
    assert seen["forward"] and seen["used_forward"]
    _assert_equal_products(seen)
    # and the dense GGN of torch.func (Jᵀ H_z J)

    gen = torch.Generator().manual_seed(1)
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=gen, dtype=torch.float64)
    torch.testing.assert_close(seen["ours"][0], dense_ggn(model, F.cross_entropy, x, t) @ v)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_uses_the_steps_statistics_and_leaves_running_stats_alone(mode, train):
    def bn_cnn():
        return nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(3 * 2 * 2, 4),
        ).double()

    torch.manual_seed(0)
    model = bn_cnn()
    x, t = torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randint(0, 4, (6,))
    ref_model = bn_cnn()
    with torch.no_grad():  # running statistics away from their initial values
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.train(train)
    ref_model.load_state_dict(model.state_dict())
    ref_model.train(train)
    ref_model(x)  # one forward: the running statistics the step must leave
    gm = make_gradient_maker("hessian_free", model)
    seen = _grab_products(gm, model, x, t, mode=mode, n=3)
    assert seen["used_forward"]
    _assert_equal_products(seen)
    bn, ref_bn = model[1], ref_model[1]
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=0, atol=0)
    assert int(bn.num_batches_tracked) == int(train)


@pytest.mark.parametrize("mode", MODES)
def test_dropout_uses_the_steps_mask_and_keeps_the_random_stream(mode):
    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)
        ).double()

    x = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(3))
    states = {}
    for m in (mode, "reverse"):
        model = build()
        gm = make_gradient_maker("hessian_free", model)
        torch.manual_seed(7)
        seen = _grab_products(gm, model, x, t, mode=m)
        # the graph's products use the step's mask: equal only if the tangents saw it too
        _assert_equal_products(seen)
        assert seen["used_forward"] is (m != "reverse")
        states[m] = (seen["ours"], torch.get_rng_state())
    # replays do not advance the model's random stream; the modes agree to rounding
    assert torch.equal(states[mode][1], states["reverse"][1])
    for a, b in zip(states[mode][0], states["reverse"][0]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_frozen_parameter_has_zero_rows_and_columns(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, t = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    gm = make_gradient_maker("hessian_free", model)
    model[0].weight.requires_grad_(False)  # frozen after construction
    gm.update_curvature = lambda stats: None
    seen = {}
    for m in (mode, "reverse"):
        gm.jvp_mode = m
        batch = {}
        gm.update_curvature = lambda stats, batch=batch: batch.update(b=gm.batch)
        run_step(gm, model, x, t, F.cross_entropy)
        b = batch["b"]
        v = torch.randn(
            b.vec.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
        )
        seen[m] = (b._tangent is not None, b.ggn(v))
    assert seen[mode][0] and not seen["reverse"][0]
    torch.testing.assert_close(seen[mode][1], seen["reverse"][1], rtol=1e-10, atol=1e-12)
    n0 = model[0].weight.numel()
    assert torch.equal(seen[mode][1][:n0], torch.zeros(n0, dtype=torch.float64))
    # the trained block is the dense GGN of the trained parameters (torch.func's order)
    trained = dense_ggn(model, F.cross_entropy, x, t)
    v = torch.randn(gm.vec.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(seen[mode][1][n0:], trained @ v[n0:])


@pytest.mark.parametrize("mode", MODES)
def test_frozen_convolution_weight_with_a_trained_bias(mode):
    """A convolution whose weight is frozen (fine-tuning) and whose input carries no tangent:
    the bias's tangent alone reaches the nodes above it at the output's full shape (it used
    to fail there and fall back to reverse mode with a warning)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3)
    ).double()
    model[0].weight.requires_grad_(False)
    x, t = torch.randn(6, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    gm = make_gradient_maker("hessian_free", model)
    reset_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)  # no fallback to reverse mode
        seen = _grab_products(gm, model, x, t, mode=mode)
    assert seen["forward"] and seen["used_forward"]
    _assert_equal_products(seen)


class _NoForwardRule(torch.autograd.Function):
    """An operator with a backward formula but no forward-mode rule."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return a * a

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved_tensors
        return 2 * a * grad


class _Squarer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return _NoForwardRule.apply(self.lin(x))


@pytest.mark.parametrize("case", ["no_forward_rule", "call_is_not_the_module"])
def test_unreplayable_model_falls_back_to_reverse_mode(case):
    reset_warnings()
    torch.manual_seed(0)
    model = (_Squarer() if case == "no_forward_rule" else nn.Sequential(nn.Linear(4, 3))).double()
    x, t = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    gm = make_gradient_maker("hessian_free", model)
    gm.jvp_mode = "forward"
    seen: dict[str, object] = {}

    def grab(stats):
        batch = gm.batch
        z = gm.loss_inputs().logits
        v = torch.randn(batch.vec.numel, dtype=torch.float64)
        seen["ours"] = batch.ggn(v)
        ref = products.ggn_vp(batch.loss, z, batch.params, batch.vec.unflatten(v))
        seen["ref"] = torch.cat([u.reshape(-1) for u in ref])

    gm.update_curvature = grab
    call = model if case == "no_forward_rule" else (lambda inp: model(inp))
    with pytest.warns(NumericalWarning, match="forward-mode"):
        d = gm.setup_model_call(call, x)
        gm.setup_loss_call(F.cross_entropy, d, t)
        gm.forward_and_backward()
    torch.testing.assert_close(seen["ours"], seen["ref"])
    assert gm.jvp_mode == "reverse"


def test_graph_mode_falls_back_to_reverse_on_an_operation_without_a_rule():
    reset_warnings()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Softplus(), nn.Flatten(), nn.Linear(4 * 25, 3)
    ).double()
    x, t = torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    gm = make_gradient_maker("hessian_free", model)
    with pytest.warns(NumericalWarning, match="no tangent rule for SoftplusBackward0"):
        seen = _grab_products(gm, model, x, t, mode="graph")
    assert not seen["forward"]
    _assert_equal_products(seen)
    assert gm.jvp_mode == "graph"  # decided per batch: the graph may change


def test_graph_mode_through_embedding_and_layer_norm_equals_ggn_vp():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(10, 4, padding_idx=0),
        nn.LayerNorm(4),
        nn.GELU(),
        nn.Flatten(),
        nn.Linear(12, 5, bias=False),  # a matrix product without bias (MmBackward0)
        nn.Sigmoid(),
        nn.Linear(5, 3),
    ).double()
    x = torch.randint(0, 10, (6, 3))
    x[0, 1] = 0  # a padding position
    t = torch.randint(0, 3, (6,))
    gm = make_gradient_maker("hessian_free", model)
    seen = _grab_products(gm, model, x, t, mode="graph")
    assert seen["forward"] and seen["used_forward"]
    _assert_equal_products(seen)


class _Scaled(nn.Module):
    """Divisions: by a trained temperature (both inputs carry tangents) and by a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(4, 6)
        self.temperature = nn.Parameter(torch.tensor(1.3))
        self.register_buffer("scale", torch.rand(6) + 0.5)
        self.lin2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin1(x) / self.temperature)  # DivBackward0, a 0-dim divisor
        return self.lin2(h / self.scale)  # DivBackward0, a broadcast constant divisor


def test_graph_mode_through_divisions_equals_ggn_vp():
    torch.manual_seed(0)
    _assert_graph_mode_without_fallback(_Scaled().double(), torch.randn(7, 4, dtype=torch.float64))


class _Residual(nn.Module):
    """GroupNorm, conv-BN-ReLU with an identity skip, a broadcast bias added by hand, mean pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.shift = nn.Parameter(torch.randn(4, 1, 1))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.gn(self.stem(x)))  # GroupNorm: NativeGroupNormBackward0
        h = torch.relu(h + self.bn(self.conv(h)))  # residual: AddBackward0, equal shapes
        h = h + self.shift  # broadcasting AddBackward0 with a parameter
        return self.head(h.mean(dim=(2, 3)))  # global average pooling: MeanBackward1


@pytest.mark.parametrize("model_fn", ["residual", "resnet18"])
def test_graph_mode_through_residual_additions_and_mean_pooling_equals_ggn_vp(model_fn):
    from precond.models import resnet18

    torch.manual_seed(0)
    if model_fn == "residual":
        model = _Residual().double()
        x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    else:
        model = resnet18(width=4).double()
        x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    _assert_graph_mode_without_fallback(model, x)


class _Tied(nn.Module):
    """One weight read twice (tied), a sequence Linear, a Linear with a frozen bias."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)
        self.seq = nn.Linear(3, 6)
        self.frozen_bias = nn.Linear(6, 3)
        self.frozen_bias.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.shared(torch.tanh(self.shared(torch.tanh(self.inp(x))))))
        h = self.seq(h.reshape(h.shape[0], 2, 3)).mean(1)  # 3-D input
        return self.frozen_bias(h)


def test_transposed_products_contract_only_weights_read_once():
    torch.manual_seed(0)
    model = _Tied().double()
    x, t = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    gm = make_gradient_maker("hessian_free", model)
    sites: dict[str, object] = {}
    graph_tangent = gm._graph_tangent

    def spy():
        graph = graph_tangent()
        sites["graph"] = graph
        return graph

    gm._graph_tangent = spy
    seen = _grab_products(gm, model, x, t, mode="graph", n=3)
    graph = sites["graph"]
    names = {id(p): n for n, p in model.named_parameters()}
    own = {names[id(graph.params[w])] for _, _, w, _ in graph.sites}
    own |= {names[id(graph.params[b])] for _, _, _, b in graph.sites if b is not None}
    # the tied weight (read twice) and the frozen bias are left to autograd
    assert own == {"inp.weight", "inp.bias", "seq.weight", "seq.bias", "frozen_bias.weight"}
    # only the tied layer's gradients are allocated by autograd and copied (cost model)
    tied = model.shared.weight.numel() + model.shared.bias.numel()
    assert graph.copy_numel == gm.product_copy_numel == tied
    _assert_equal_products(seen)


class _FullBias(nn.Module):
    """``addmm`` with a bias per row and output (not broadcast): autograd's part."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.weight = nn.Parameter(torch.randn(3, 5))
        self.bias = nn.Parameter(torch.randn(rows, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, torch.tanh(self.inp(x)), self.weight.t())


def test_transposed_products_leave_a_full_bias_to_autograd():
    torch.manual_seed(0)
    model = _FullBias(7).double()
    x, t = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    gm = make_gradient_maker("hessian_free", model)
    seen = _grab_products(gm, model, x, t, mode="graph", n=2)
    assert seen["used_forward"]
    assert gm.product_copy_numel == model.bias.numel()
    _assert_equal_products(seen)


@pytest.mark.parametrize("mode", MODES)
def test_products_into_reused_and_replaced_buffers_equal_fresh_products(mode):
    """The views cached per buffer follow a buffer's new values and a re-pointed buffer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, t = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    gm = make_gradient_maker("lissa", model)
    gm.jvp_mode = mode
    seen: dict[str, bool] = {}

    def check(stats):
        batch = gm.batch
        gen = torch.Generator().manual_seed(2)
        vs = [torch.randn(batch.vec.numel, generator=gen, dtype=torch.float64) for _ in range(3)]
        fresh = [batch.ggn(v.clone()) for v in vs]
        v, out = vs[0].clone(), torch.empty_like(vs[0])
        for k in range(3):  # the same two buffers, new values each time
            v.copy_(vs[k])
            assert batch.ggn(v, out=out) is out
            assert torch.equal(out, fresh[k])
        # buffers moved to new storage keep their identity but get fresh views
        v.set_(vs[2].clone())
        out.set_(torch.full_like(vs[2], float("nan")))
        assert torch.equal(batch.ggn(v, out=out), fresh[2])
        seen["ok"] = True

    gm.update_curvature = check
    run_step(gm, model, x, t, F.cross_entropy)
    assert seen["ok"]


class _TokenMixing(nn.Module):
    """A transpose between token and channel mixing, and a permutation of the dimensions."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.tokens = nn.Linear(5, 5)
        self.channels = nn.Linear(4, 4)
        self.head = nn.Linear(4 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, 5 tokens, 3]
        h = torch.tanh(self.embed(x))  # [N, 5, 4]
        h = self.tokens(h.transpose(1, 2)).transpose(1, 2)  # TransposeBackward0
        h = self.channels(h).permute(0, 2, 1)  # PermuteBackward0: [N, 4, 5]
        return self.head(h.reshape(h.shape[0], -1))


class _Encoder(nn.Module):
    """PyTorch's own transformer layer (nn.MultiheadAttention, batch first) on token ids."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(x)).mean(dim=1))


@pytest.mark.parametrize("model_fn", ["token_mixing", "mixer", "vit", "softmax", "encoder"])
def test_graph_mode_through_transposes_permutations_and_attention_equals_ggn_vp(model_fn):
    from precond.models import MLPMixer, ViT

    torch.manual_seed(0)
    if model_fn == "token_mixing":
        model = _TokenMixing().double()
        x = torch.randn(6, 5, 3, dtype=torch.float64)
    elif model_fn == "mixer":
        model = MLPMixer(8, 4, 8, 1, 8, 16).double()
        x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    elif model_fn == "encoder":
        model = _Encoder().double()
        x = torch.randint(0, 7, (4, 5))
    elif model_fn == "vit":
        # the composite attention: select, scale, expand, batched products, softmax
        model = ViT(8, 4, 16, 1, 2, 32).double()
        x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Linear(4, 6), nn.Softmax(dim=-1), nn.Linear(6, 3)).double()
        x = torch.randn(5, 4, dtype=torch.float64)
    _assert_graph_mode_without_fallback(model, x)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("net", ["mlp", "conv_norm"])
def test_products_under_autocast_follow_the_steps_low_precision_graph(monkeypatch, mode, net):
    """Under the caller's ``torch.autocast`` the model runs in bfloat16 (its graph holds the
    casts) while the products run outside autocast: both forward modes push tangents through
    the same casts (graph mode through the graph's ``ToCopy`` nodes, forward mode by replaying
    the call under the step's autocast) and equal reverse mode's products, without falling
    back to it. Convolutions run in bfloat16 and the normalisations beside them in float32:
    each node's tangent has its output's dtype."""
    import importlib

    replay = importlib.import_module("precond.methods.forward_jvp")
    replayed: list[torch.dtype] = []

    def call(*args, **kwargs):
        out = torch.func.functional_call(*args, **kwargs)
        replayed.append(out.dtype)
        return out

    monkeypatch.setattr(replay, "functional_call", call)
    torch.manual_seed(0)
    if net == "mlp":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        x = torch.randn(10, 4)
    else:
        model = ConvBN()
        x = torch.randn(10, 2, 6, 6)
    t = torch.randint(0, 3, (10,))
    gm = make_gradient_maker("lissa", model)  # Hessian-free's curvature steps skip autocast
    reset_warnings()
    with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("error", NumericalWarning)  # no fallback to reverse mode
        seen = _grab_products(gm, model, x, t, mode=mode)
    assert seen["forward"] and seen["used_forward"]
    assert gm.loss_inputs().logits.dtype == torch.bfloat16
    assert replayed == ([] if mode == "graph" else [torch.bfloat16] * len(replayed))
    assert mode == "graph" or replayed
    for ours, ref in zip(seen["ours"], seen["ref"]):
        assert ours.dtype == torch.float64  # the products' vectors keep their precision
        torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=0.05, atol=0.05 * ref.abs().max())


def test_hessian_free_curvature_steps_run_the_model_without_autocast():
    """Hessian-free's CG needs exact products: under the caller's autocast its curvature steps
    run the model in float32 (the same step, bit for bit, as without autocast) and the steps
    in between keep the caller's bfloat16."""
    torch.manual_seed(0)
    x, t = torch.randn(10, 4), torch.randint(0, 3, (10,))
    base = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    grads, dtypes = {}, []
    for autocast in (False, True):
        model = copy.deepcopy(base)
        gm = make_gradient_maker("hessian_free", model, curvature_upd_interval=2)
        steps = []
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                run_step(gm, model, x, t, F.cross_entropy)
            steps.append([p.grad.clone() for p in model.parameters()])
            if autocast:
                dtypes.append(gm.loss_inputs().logits.dtype)
        grads[autocast] = steps
    assert dtypes == [torch.float32, torch.bfloat16]
    for a, b in zip(grads[False][0], grads[True][0]):
        assert torch.equal(a, b)  # the curvature step: the same computation
    for a, b in zip(grads[False][1], grads[True][1]):
        assert a.dtype == b.dtype == torch.float32 and not torch.equal(a, b)
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * a.abs().max())
