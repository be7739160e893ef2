"""Methods with second derivatives train transformers whose attention is a fused kernel.

PyTorch's fused ``scaled_dot_product_attention`` kernels (the flash kernel on CPU) have no
derivative of their backward, so a Hessian-vector product (or a GGN product by a double
backward) through a ViT failed with "derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented". On the steps
that differentiate twice the forward now runs the composite attention.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from precond import make_gradient_maker
from precond.curvature.products import twice_differentiable
from precond.models import ViT
from precond.numerics import NumericalWarning

SECOND_ORDER = [
    ("hessian_free", {}),
    ("lissa", {}),
    ("curveball", {}),
    ("adahessian", {}),
    ("psgd", {}),
    ("sophia", {"estimator": "hutchinson"}),
]


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return ViT(8, 4, 16, 1, 2, 32)  # 8×8 images, 4 patches, one block, two heads


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)


def _steps(method: str, options: dict, model: torch.nn.Module, n: int) -> list[torch.Tensor]:
    gm = make_gradient_maker(method, model, **options)
    x, t = _batch()
    with warnings.catch_warnings():
        # the GGN products go through the composite attention by forward-mode tangents
        warnings.simplefilter("error", NumericalWarning)
        for _ in range(n):
            model.zero_grad(set_to_none=True)
            y = gm.setup_model_call(model, x)
            gm.setup_loss_call(F.cross_entropy, y, t)
            gm.forward_and_backward()
    return [p.grad.clone() for p in model.parameters()]


def test_the_fused_attention_has_no_second_derivative_here():
    # What the fix is for; if a later PyTorch differentiates the fused kernel twice, the
    # methods still train (the tests below), the composite path is then merely not needed.
    model = _vit()
    x, t = _batch()
    loss = F.cross_entropy(model(x), t)
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    total = sum((g * g).sum() for g in grads)
    try:
        torch.autograd.grad(total, list(model.parameters()))
    except RuntimeError as err:
        assert "not implemented" in str(err)


@pytest.mark.parametrize(("method", "options"), SECOND_ORDER, ids=[m for m, _ in SECOND_ORDER])
def test_second_order_methods_train_a_vit(method, options):
    grads = _steps(method, options, _vit(), 3)
    assert all(torch.isfinite(g).all() for g in grads)
    # the first step (a curvature step) with the composite attention forced for the whole
    # step gives the same result bit for bit (idle steps keep the fused kernel: rounding)
    first = _steps(method, options, _vit(), 1)
    with sdpa_kernel([SDPBackend.MATH]):
        expected = _steps(method, options, _vit(), 1)
    for g, e in zip(first, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize(("method", "options"), SECOND_ORDER, ids=[m for m, _ in SECOND_ORDER])
def test_only_curvature_steps_use_the_composite_attention(method, options):
    gm = make_gradient_maker(method, _vit(), **options)
    assert not gm._second_derivatives(False)
    assert gm._second_derivatives(True)


@pytest.mark.parametrize("method", ["kfac", "shampoo", "sophia", "ng_diag"])
def test_first_order_methods_keep_the_fused_attention(method):
    gm = make_gradient_maker(method, _vit())
    assert not gm._second_derivatives(True)


def test_twice_differentiable_is_a_no_op_when_not_needed():
    model = _vit()
    x, t = _batch()
    with twice_differentiable(False):
        loss = F.cross_entropy(model(x), t)
    with twice_differentiable(True):
        loss2 = F.cross_entropy(model(x), t)
        grads = torch.autograd.grad(loss2, list(model.parameters()), create_graph=True)
    hv = torch.autograd.grad(sum((g * g).sum() for g in grads), list(model.parameters()))
    assert all(torch.isfinite(h).all() for h in hv)
    torch.testing.assert_close(loss, loss2)


@pytest.mark.parametrize("product", ["hvp", "ggn_vp", "fisher_vp"])
def test_curvature_products_through_fused_attention(product):
    import precond

    model = _vit()
    x, t = _batch()
    v = [torch.randn_like(p) for p in model.parameters()]
    fn = getattr(precond, product)
    out = fn(model, F.cross_entropy, x, t, v)
    with sdpa_kernel([SDPBackend.MATH]):
        expected = fn(model, F.cross_entropy, x, t, v)
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_bench_prices_hessian_products_through_attention():
    # the harness times a Hessian-vector product on the model for the floor of PSGD and
    # AdaHessian (`precond bench --models vit_small` failed there)
    from precond.bench.measure import _hvp_pass

    model = _vit()
    x, t = _batch()
    params = list(model.parameters())
    ms = _hvp_pass(model, F.cross_entropy, x, t, torch.device("cpu"), params, 0.01)
    assert ms > 0
