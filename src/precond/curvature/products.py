"""Matrix-free curvature-vector products by automatic differentiation.

All products work on lists of tensors aligned with a list of parameters and reuse a graph that
the caller keeps alive (``retain_graph``), so one forward pass serves many products:

* :func:`gradient_with_graph`: ``∇_θ L`` with ``create_graph=True`` (the start of every HVP).
* :func:`hvp`: ``H v = ∇_θ (∇_θ L · v)`` (Pearlmutter 1994), by double backward.
* :func:`jvp_from_vjp`: ``J v`` for ``J = ∂z/∂θ`` by the double-vjp trick (no forward-mode AD
  needed, so any model works).
* :func:`ggn_vp`: ``Jᵀ (∇²_z L) J v``: the GGN of the loss as written (equal to the exact
  Fisher for the supported likelihoods without weights).
* :func:`twice_differentiable`: a context for forward passes whose graph will be
  differentiated twice (attention through its composite path).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "dense_from_products",
    "ggn_vp",
    "gradient_with_graph",
    "hvp",
    "jvp_from_vjp",
    "twice_differentiable",
    "vjp",
]


def gradient_with_graph(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """``∇_θ L`` keeping the graph for second derivatives.

    Args:
        loss: Scalar loss.
        params: Parameters.

    Returns:
        Gradients (zeros for parameters the loss does not depend on).
    """
    grads = torch.autograd.grad(loss, list(params), create_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def hvp(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    v: Sequence[Tensor],
    *,
    retain_graph: bool = True,
) -> list[Tensor]:
    """Hessian-vector product ``H v`` from gradients built with :func:`gradient_with_graph`.

    Args:
        grads: ``∇_θ L`` with a graph.
        params: Parameters.
        v: Vector (one tensor per parameter).
        retain_graph: Keep the graph for further products.

    Returns:
        ``H v`` (one tensor per parameter).
    """
    # The vector goes in as the grads' cotangent: one backward through the gradient's graph,
    # without building (and differentiating) an extra inner product ``Σ gᵢ·vᵢ``.
    pairs = [(g, vi.to(g.dtype)) for g, vi in zip(grads, v) if g.requires_grad]
    if not pairs:
        return [torch.zeros_like(p) for p in params]
    out = torch.autograd.grad(
        [g for g, _ in pairs],
        list(params),
        [vi for _, vi in pairs],
        retain_graph=retain_graph,
        allow_unused=True,
    )
    return [torch.zeros_like(p) if h is None else h for p, h in zip(params, out)]


def vjp(
    z: Tensor, params: Sequence[Tensor], u: Tensor, *, retain_graph: bool = True
) -> list[Tensor]:
    """``Jᵀ u`` for ``J = ∂z/∂θ``.

    Args:
        z: Output tensor (in the graph).
        params: Parameters.
        u: Cotangent (shape of ``z``).
        retain_graph: Keep the graph.

    Returns:
        ``Jᵀ u`` per parameter.
    """
    out = torch.autograd.grad(z, list(params), u, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, out)]


def jvp_from_vjp(z: Tensor, params: Sequence[Tensor], v: Sequence[Tensor]) -> Tensor:
    """``J v`` via the double-vjp trick: ``J v = ∂/∂u [(Jᵀ u) · v]``.

    Args:
        z: Output tensor (in the graph, kept).
        params: Parameters.
        v: Tangent (one tensor per parameter).

    Returns:
        ``J v`` (shape of ``z``).
    """
    u = torch.zeros_like(z, requires_grad=True)
    ju = torch.autograd.grad(z, list(params), u, create_graph=True, allow_unused=True)
    pairs = [(g, vi.to(g.dtype)) for g, vi in zip(ju, v) if g is not None and g.requires_grad]
    if not pairs:
        return torch.zeros_like(z)
    (jv,) = torch.autograd.grad([g for g, _ in pairs], u, [vi for _, vi in pairs])
    return jv


def ggn_vp(loss: Tensor, z: Tensor, params: Sequence[Tensor], v: Sequence[Tensor]) -> list[Tensor]:
    """GGN-vector product ``Jᵀ (∇²_z L) J v`` of the loss as written.

    The loss Hessian in the outputs is applied by double backward through the loss alone, so
    any loss (with weights, label smoothing, ignored targets) is handled exactly.

    Args:
        loss: Scalar loss computed from ``z`` (graph kept).
        z: The tensor the GGN linearises at (usually the logits passed to the loss).
        params: Parameters.
        v: Vector (one tensor per parameter).

    Returns:
        ``G v`` per parameter.
    """
    jv = jvp_from_vjp(z, params, v)
    (gz,) = torch.autograd.grad(loss, z, create_graph=True)
    (hjv,) = torch.autograd.grad(gz, z, jv, retain_graph=True)
    return vjp(z, params, hjv)


def dense_from_products(
    product: Callable[[list[Tensor]], list[Tensor]], params: Sequence[Tensor]
) -> Tensor:
    """The dense ``[P, P]`` matrix of a linear operator on parameter lists, column by column.

    ``P`` products (e.g. :func:`hvp` or :func:`ggn_vp` with a retained graph); coordinates
    are the parameters flattened and concatenated in order. Meant for small models (Newton,
    tests).

    Args:
        product: ``v ↦ M v`` on lists of parameter-shaped tensors.
        params: The parameters (define shapes, dtype, device).

    Returns:
        ``M`` as a dense matrix.
    """
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    ref = params[0]
    cols = []
    for j in range(total):
        e = torch.zeros(total, dtype=ref.dtype, device=ref.device)
        e[j] = 1.0
        v = [c.view_as(p) for c, p in zip(torch.split(e, sizes), params)]
        cols.append(torch.cat([c.reshape(-1) for c in product(v)]))
    return torch.stack(cols, dim=1)


def twice_differentiable(enabled: bool) -> AbstractContextManager[Any]:
    """A context in which the model's forward builds a graph that can be differentiated twice.

    PyTorch's fused attention kernels (``scaled_dot_product_attention``'s flash and
    memory-efficient paths, e.g. the flash kernel on CPU) have no derivative of their backward:
    a Hessian-vector product through a transformer fails with "derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented". Inside this
    context the attention runs its composite path (matrix products and softmax), which autograd
    differentiates to any order; the values agree with the fused kernels to rounding. Entering
    it costs about 10 µs (CPU), paid only on steps that need it.

    Args:
        enabled: Whether the step needs second derivatives (otherwise a no-op context).

    Returns:
        The context manager.
    """
    if not enabled:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])
