"""Hessian representations from Hessian-vector products (no ``(a, g)`` factorisation exists).

Given the gradient ``∇_θ L`` built with a graph
(:func:`~precond.curvature.products.gradient_with_graph`), every representation is assembled
from products ``H v`` (Pearlmutter 1994):

* full: ``P`` products with unit vectors (parameter order);
* layer-wise: ``P_l`` products per layer with vectors supported on that layer;
* unit-wise and diagonal: cut from the layer-wise blocks (exact), or the diagonal estimated
  without forming blocks by Hutchinson's estimator ``E[v ⊙ H v]`` with Rademacher ``v``
  (Bekas et al. 2007), as AdaHessian does.

Meant for small models or small layers: the cost is one double-backward per column.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..capture import Layer
from .products import dense_from_products, hvp
from .representation import LayerCurvature, canonical_permutation, unit_blocks_from_layer

__all__ = [
    "hessian_diagonal_hutchinson",
    "hessian_full",
    "hessian_layer_block",
    "hessian_layer_curvature",
]


def hessian_full(grads: Sequence[Tensor], params: Sequence[nn.Parameter]) -> Tensor:
    """The dense Hessian over ``params`` (parameter order).

    Args:
        grads: ``∇_θ L`` with a graph (kept).
        params: The parameters.

    Returns:
        ``[P, P]``.
    """
    return dense_from_products(lambda v: hvp(grads, params, v), params)


def hessian_layer_block(
    grads: Sequence[Tensor], params: Sequence[nn.Parameter], layer: Layer
) -> Tensor:
    """The Hessian block of one layer's parameters (parameter order).

    Args:
        grads: ``∇_θ L`` over ``params`` with a graph (kept).
        params: All parameters the gradients refer to.
        layer: The layer; its parameters must be among ``params``.

    Returns:
        ``[P_l, P_l]``.
    """
    pos = {id(p): i for i, p in enumerate(params)}
    idx = [pos[id(p)] for p in layer.params]

    def product(v: list[Tensor]) -> list[Tensor]:
        full = [torch.zeros_like(p) for p in params]
        for i, vi in zip(idx, v):
            full[i] = vi
        out = hvp(grads, params, full)
        return [out[i] for i in idx]

    return dense_from_products(product, layer.params)


def hessian_layer_curvature(
    block: Tensor, layer: Layer, *, layer_wise: bool, unit_wise: bool, diag: bool
) -> LayerCurvature:
    """Representations of one layer from its dense Hessian block in parameter order.

    Args:
        block: ``[P_l, P_l]`` in parameter order.
        layer: The layer.
        layer_wise: Keep the (canonical) layer block.
        unit_wise: Cut unit-wise blocks (layers with an adapter only).
        diag: Keep the diagonal.

    Returns:
        The layer's results, canonical where the layer has an adapter.
    """
    out = LayerCurvature(layer)
    if layer.adapter is not None:
        perm = canonical_permutation(layer)
        block = block[perm][:, perm]
    if layer_wise:
        out.layer_wise = block
    if unit_wise and layer.adapter is not None:
        out.unit_wise = unit_blocks_from_layer(block, layer.shape)
    if diag:
        d = block.diagonal()
        out.diag = d.reshape(layer.shape) if layer.adapter is not None else d.clone()
    return out


def hessian_diagonal_hutchinson(
    grads: Sequence[Tensor],
    params: Sequence[nn.Parameter],
    n_samples: int,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Hutchinson estimate ``(1/S) Σ_s v_s ⊙ H v_s`` of the Hessian diagonal.

    Args:
        grads: ``∇_θ L`` with a graph (kept).
        params: The parameters.
        n_samples: Probes ``S``.
        generator: Random generator for the Rademacher probes.

    Returns:
        One parameter-shaped tensor per parameter.
    """
    acc = [torch.zeros_like(p) for p in params]
    for _ in range(n_samples):
        v = [_rademacher(p, generator) for p in params]
        hv = hvp(grads, params, v)
        for a, vi, hi in zip(acc, v, hv):
            a.add_(vi * hi)
    return [a / n_samples for a in acc]


def _rademacher(like: Tensor, generator: torch.Generator | None) -> Tensor:
    bits = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
    return (2 * bits - 1).to(like.dtype)
