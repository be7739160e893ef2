"""Matrix-free curvature operators: one forward pass, any number of products.

A :class:`CurvatureOperator` multiplies by the Hessian, the GGN or a Fisher-type matrix of the
loss as written (see :mod:`precond.curvature.loss` for the scaling convention), on vectors given
either as a flat tensor ``[P]`` (or a batch ``[P, k]``) in parameter order, or as a list of
parameter-shaped tensors. The graph of the forward pass is kept alive for the operator's
lifetime.

Products:

* Hessian: ``H v = ∇_θ(∇_θ L · v)`` by double backward.
* GGN: ``Jᵀ (∇²_z L) J v`` with ``J v`` by the double-vjp trick.
* Fisher-type: ``Σ_n J_nᵀ (Σ_k v_kn v_knᵀ) J_n v`` with the back-propagated vectors ``v_k`` of
  :class:`~precond.curvature.loss.LossInputs` (exact: all classes weighted by ``√p``; MC: labels
  sampled once when the operator is built, so it is a fixed symmetric matrix; empirical: the
  loss's own per-example logit gradients).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..enums import CurvatureType
from .loss import LossInputs
from .products import gradient_with_graph, hvp, jvp_from_vjp, vjp

__all__ = ["CurvatureOperator", "fisher_product", "ggn_product", "hessian_product"]

Product = Callable[[list[Tensor]], list[Tensor]]


class CurvatureOperator:
    """A symmetric linear operator on the parameters, defined by its products.

    Args:
        params: The parameters (define the coordinates, dtype and device).
        product: ``v ↦ M v`` on lists of parameter-shaped tensors.
    """

    def __init__(self, params: Sequence[nn.Parameter], product: Product) -> None:
        self.params = list(params)
        self._product = product
        self._sizes = [p.numel() for p in self.params]

    @property
    def dim(self) -> int:
        """``P``, the number of coordinates."""
        return sum(self._sizes)

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype."""
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        """The parameters' device."""
        return self.params[0].device

    def matvec(self, v: Sequence[Tensor]) -> list[Tensor]:
        """``M v`` on a list of parameter-shaped tensors.

        Args:
            v: One tensor per parameter.

        Returns:
            One tensor per parameter.
        """
        return [o.detach() for o in self._product(list(v))]

    def split(self, flat: Tensor) -> list[Tensor]:
        """A flat ``[P]`` vector as parameter-shaped tensors."""
        return [c.view_as(p) for c, p in zip(torch.split(flat, self._sizes), self.params)]

    def __matmul__(self, v: Tensor) -> Tensor:
        if v.dim() == 2:
            return torch.stack([self @ v[:, j] for j in range(v.shape[1])], dim=1)
        out = self.matvec(self.split(v.to(self.dtype)))
        return torch.cat([o.reshape(-1) for o in out])

    def to_dense(self) -> Tensor:
        """The matrix, column by column (``P`` products; small models only).

        Returns:
            ``[P, P]`` in parameter order.
        """
        return self @ torch.eye(self.dim, dtype=self.dtype, device=self.device)


def hessian_product(loss: Tensor, params: Sequence[nn.Parameter]) -> Product:
    """Products with the Hessian of ``loss`` (graph kept).

    Args:
        loss: Scalar loss with a graph to ``params``.
        params: The parameters.

    Returns:
        ``v ↦ H v``.
    """
    grads = gradient_with_graph(loss, params)
    return lambda v: hvp(grads, params, v)


def ggn_product(loss: Tensor, z: Tensor, params: Sequence[nn.Parameter]) -> Product:
    """Products with the GGN ``Jᵀ (∇²_z L) J`` of the loss as written.

    Args:
        loss: Scalar loss computed from ``z``.
        z: The logits (the loss's input).
        params: The parameters.

    Returns:
        ``v ↦ G v``.
    """
    (gz,) = torch.autograd.grad(loss, z, create_graph=True)

    def product(v: list[Tensor]) -> list[Tensor]:
        jv = jvp_from_vjp(z, params, v)
        (hjv,) = torch.autograd.grad(gz, z, jv, retain_graph=True)
        return vjp(z, params, hjv)

    return product


def fisher_product(
    inputs: LossInputs,
    params: Sequence[nn.Parameter],
    curvature: CurvatureType,
    *,
    n_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Product:
    """Products with a Fisher-type matrix built from the back-propagated vectors.

    Args:
        inputs: The loss call's logits (with a graph to ``params``), targets and options.
        params: The parameters.
        curvature: ``fisher_exact``, ``fisher_mc``, ``fisher_emp`` or ``ggn``.
        n_samples: Monte-Carlo samples (``fisher_mc``).
        generator: Random generator for ``fisher_mc`` (labels are drawn once, here).

    Returns:
        ``v ↦ F v``.
    """
    z = inputs.logits
    vecs = torch.stack(list(inputs.vectors(curvature, n_samples=n_samples, generator=generator)))
    k, n = vecs.shape[0], inputs.batch_size
    flat = vecs.reshape(k, n, -1)

    def product(v: list[Tensor]) -> list[Tensor]:
        u = jvp_from_vjp(z, params, v).reshape(1, n, -1).to(flat.dtype)
        alpha = (flat * u).sum(-1, keepdim=True)  # [K, N, 1]: v_knᵀ J_n v
        w = (alpha * flat).sum(0).reshape(z.shape).to(z.dtype)
        return vjp(z, params, w)

    return product
