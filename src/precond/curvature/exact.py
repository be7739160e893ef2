"""Dense curvature matrices by ``torch.func``: the test oracle, also usable on small models.

Every function returns a ``[P, P]`` matrix over the model's trained parameters, flattened and
concatenated in ``model.parameters()`` order (the order of :func:`trained_params`), for the loss
``loss_fn(model(x), t, **loss_kwargs)`` *as written* (see :mod:`precond.curvature.loss` for the
reduction factor ``c``). They are computed by routes independent of the capture machinery:

* :func:`dense_hessian`: ``∇²_θ L`` (``jacrev`` of ``grad``).
* :func:`dense_ggn`: ``Jᵀ (∇²_z L) J`` with ``J = ∂z/∂θ`` (``jacrev``) and the loss Hessian in
  the logits (``hessian`` of the loss alone), so weights, label smoothing and ignored targets are
  whatever PyTorch's loss does.
* :func:`dense_fisher_exact`: the Fisher of the model's predictive distribution by enumeration:
  ``c Σ_r Σ_y p(y|z_r) ∇_θ log p(y|z_r) ∇_θ log p(y|z_r)ᵀ`` over rows ``r`` (classes for
  cross-entropy, ``{0, 1}`` for BCE); for MSE the Gaussian with variance ½ gives ``2 c JᵀJ``.
* :func:`dense_fisher_emp`: ``(1/c) Σ_n ∇L_n ∇L_nᵀ`` from per-example gradients of the summed
  per-example losses (``jacrev`` of the vector of per-example losses).

Costs grow like ``P²`` memory and ``P`` (or output-size) backward passes: meant for models with a
few thousand parameters at most. Pass ``dtype=torch.float64`` for oracle accuracy (the model and
floating inputs are copied in that precision).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev

from ..enums import CurvatureType, LossKind
from ..validation import coerce_enum, invalid
from .loss import LossSpec, parse_loss_call

__all__ = [
    "dense_curvature",
    "dense_fisher_emp",
    "dense_fisher_exact",
    "dense_ggn",
    "dense_hessian",
    "per_example_gradients",
    "trained_params",
]

LossFn = Callable[..., Tensor]


def trained_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter that requires a gradient, in model order.

    Args:
        model: The model.

    Returns:
        The trained parameters with their qualified names.
    """
    return [(k, p) for k, p in model.named_parameters() if p.requires_grad]


class _Problem:
    """A model, a batch and a loss as functions of one flat parameter vector."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        x: Any,
        t: Tensor,
        loss_kwargs: dict[str, Any],
        dtype: torch.dtype | None,
    ) -> None:
        if dtype is not None:
            model = copy.deepcopy(model).to(dtype)
            if isinstance(x, Tensor) and x.is_floating_point():
                x = x.to(dtype)
            if t.is_floating_point():
                t = t.to(dtype)
        self.model, self.loss_fn, self.x, self.t = model, loss_fn, x, t
        self.loss_kwargs = loss_kwargs
        named = trained_params(model)
        self.names = [k for k, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in named])
        frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
        self.fixed = {**frozen, **{k: v.detach() for k, v in model.named_buffers()}}

    def output(self, theta: Tensor) -> Tensor:
        sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        parts = torch.split(theta, sizes)
        params = {k: v.view(s) for k, v, s in zip(self.names, parts, self.shapes)}
        out = functional_call(self.model, {**self.fixed, **params}, (self.x,))
        assert isinstance(out, Tensor)
        return out

    def loss_of_output(self, z: Tensor) -> Tensor:
        return self.loss_fn(z, self.t, **self.loss_kwargs)

    def loss(self, theta: Tensor) -> Tensor:
        return self.loss_of_output(self.output(theta))

    def jacobian(self) -> tuple[Tensor, Tensor]:
        """``(z, J)`` with ``J`` of shape ``[z.numel(), P]``."""
        z = self.output(self.theta).detach()
        jac = jacrev(self.output)(self.theta)
        return z, jac.reshape(z.numel(), -1)

    def spec(self, z: Tensor) -> LossSpec:
        return parse_loss_call(self.loss_fn, (z, self.t), dict(self.loss_kwargs), _batch(z)).spec


def _reverse_hessian(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    # Reverse-over-reverse on purpose: torch.func.hessian (forward-over-reverse) returns wrong
    # second derivatives through nn.LayerNorm on torch 2.13 CPU (checked against finite
    # differences and double backward).
    return jacrev(grad(fn))


def _batch(z: Tensor) -> int:
    return int(z.shape[0]) if z.dim() > 0 else 1


def _batch_size(x: Any) -> int:
    """Examples ``N``: dimension 0 of the (first) input tensor; rows are example-major."""
    if isinstance(x, tuple | list):
        x = x[0]
    return _batch(x) if isinstance(x, Tensor) else 1


def dense_hessian(
    model: nn.Module,
    loss_fn: LossFn,
    x: Any,
    t: Tensor,
    *,
    dtype: torch.dtype | None = None,
    **loss_kwargs: Any,
) -> Tensor:
    """The Hessian ``∇²_θ L`` of ``loss_fn(model(x), t, **loss_kwargs)``.

    Args:
        model: The model (BatchNorm layers should be in eval mode: batch statistics couple
            examples, which is fine here but not for per-example quantities).
        loss_fn: Any loss callable returning a scalar.
        x: The model input.
        t: The targets.
        dtype: Precision to compute in (``None``: the model's).
        **loss_kwargs: Passed to ``loss_fn``.

    Returns:
        ``[P, P]`` in :func:`trained_params` order.
    """
    prob = _Problem(model, loss_fn, x, t, loss_kwargs, dtype)
    return _reverse_hessian(prob.loss)(prob.theta)


def dense_ggn(
    model: nn.Module,
    loss_fn: LossFn,
    x: Any,
    t: Tensor,
    *,
    dtype: torch.dtype | None = None,
    **loss_kwargs: Any,
) -> Tensor:
    """The generalised Gauss-Newton matrix ``Jᵀ (∇²_z L) J`` of the loss as written.

    Args:
        model: The model.
        loss_fn: Any loss callable returning a scalar (twice differentiable in the output).
        x: The model input.
        t: The targets.
        dtype: Precision to compute in.
        **loss_kwargs: Passed to ``loss_fn``.

    Returns:
        ``[P, P]`` in :func:`trained_params` order.
    """
    prob = _Problem(model, loss_fn, x, t, loss_kwargs, dtype)
    z, j = prob.jacobian()
    h = _reverse_hessian(prob.loss_of_output)(z).reshape(z.numel(), z.numel())
    return j.T @ h @ j


def _rows(z: Tensor) -> Tensor:
    """Indices into ``z.reshape(-1)`` arranged as cross-entropy rows ``[R, C]``."""
    idx = torch.arange(z.numel(), device=z.device).reshape(z.shape)
    if z.dim() == 1:
        return idx.unsqueeze(0)
    if z.dim() > 2:
        idx = idx.movedim(1, -1)
    return idx.reshape(-1, idx.shape[-1])


def _reduction_factor(spec: LossSpec, z: Tensor, t: Tensor) -> float:
    """``c``: 1 for ``sum``; for ``mean`` one over the count PyTorch divides by."""
    if spec.reduction == "sum":
        return 1.0
    if spec.kind is not LossKind.CROSS_ENTROPY:
        return 1.0 / z.numel()
    if t.is_floating_point():
        return 1.0 / _rows(z).shape[0]
    flat = t.reshape(-1)
    keep = (flat != spec.ignore_index).to(z.dtype)
    if spec.weight is not None:
        keep = keep * spec.weight.to(z.dtype)[flat.clamp(min=0)]
    return 1.0 / float(keep.sum())


def dense_fisher_exact(
    model: nn.Module,
    loss_fn: LossFn,
    x: Any,
    t: Tensor,
    *,
    dtype: torch.dtype | None = None,
    **loss_kwargs: Any,
) -> Tensor:
    """The exact Fisher of the model's predictive distribution, by enumerating outcomes.

    ``loss_fn`` must be cross-entropy, MSE or BCE-with-logits (function or module). Rows whose
    target is ``ignore_index`` contribute nothing; label smoothing does not change the
    predictive distribution, so it does not enter.

    Args:
        model: The model.
        loss_fn: A supported loss.
        x: The model input.
        t: The targets (for ``ignore_index`` and the ``mean`` normaliser).
        dtype: Precision to compute in.
        **loss_kwargs: Loss options (``reduction``, ``ignore_index``, ...).

    Returns:
        ``[P, P]`` in :func:`trained_params` order.

    Raises:
        ValueError: With class or positive weights (the loss is then not a likelihood).
    """
    prob = _Problem(model, loss_fn, x, t, loss_kwargs, dtype)
    z, j = prob.jacobian()
    spec = prob.spec(z)
    if spec.weight is not None or spec.pos_weight is not None:
        raise invalid("weight", "given", "With weights the loss is not a likelihood; use dense_ggn")
    c = _reduction_factor(spec, z, prob.t)
    if spec.kind is LossKind.MSE:
        return 2.0 * c * (j.T @ j)
    if spec.kind is LossKind.BCE_WITH_LOGITS:
        s = torch.sigmoid(z.reshape(-1))
        # Σ_{y∈{0,1}} p(y) (σ − y)² = σ(1 − σ)
        outcome_var = s * (1 - s)
        return c * (j.T * outcome_var) @ j
    rows = _rows(z)
    keep = torch.ones(rows.shape[0], dtype=z.dtype, device=z.device)
    if not prob.t.is_floating_point():
        keep = (prob.t.reshape(-1) != spec.ignore_index).to(z.dtype)
    p = torch.softmax(z.reshape(-1)[rows], dim=-1)  # [R, C]
    eye = torch.eye(rows.shape[1], dtype=z.dtype, device=z.device)
    out = torch.zeros(j.shape[1], j.shape[1], dtype=z.dtype, device=z.device)
    for r in range(rows.shape[0]):
        if keep[r] == 0:
            continue
        # column y: ∇_θ(−log p_y) = J_rᵀ (p − e_y)
        grads = j[rows[r]].T @ (p[r].unsqueeze(-1) - eye)
        out += (grads * p[r]) @ grads.T
    return c * out


def _elementwise_losses(spec: LossSpec, z: Tensor, t: Tensor) -> Tensor:
    if spec.kind is LossKind.CROSS_ENTROPY:
        return F.cross_entropy(
            z,
            t,
            weight=spec.weight,
            ignore_index=spec.ignore_index,
            label_smoothing=spec.label_smoothing,
            reduction="none",
        )
    if spec.kind is LossKind.MSE:
        return F.mse_loss(z, t, reduction="none")
    return F.binary_cross_entropy_with_logits(
        z, t, weight=spec.weight, pos_weight=spec.pos_weight, reduction="none"
    )


def per_example_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    x: Any,
    t: Tensor,
    *,
    dtype: torch.dtype | None = None,
    **loss_kwargs: Any,
) -> Tensor:
    """Gradients ``∇_θ L_n`` of each example's part of the loss as written.

    ``L = Σ_n L_n``; for a ``mean`` loss ``L_n`` carries the factor ``c``. Examples are indexed
    by dimension 0 of ``x``; the loss input's rows must be example-major (``[N, ...]`` or a
    flattening ``[N·T, ...]``).

    Args:
        model: The model.
        loss_fn: A supported loss (cross-entropy, MSE, BCE-with-logits).
        x: The model input (dimension 0 indexes examples).
        t: The targets.
        dtype: Precision to compute in.
        **loss_kwargs: Loss options.

    Returns:
        ``[N, P]`` in :func:`trained_params` order.
    """
    prob = _Problem(model, loss_fn, x, t, loss_kwargs, dtype)
    z = prob.output(prob.theta).detach()
    spec = prob.spec(z)
    n = _batch_size(prob.x)
    c = _reduction_factor(spec, z, prob.t)

    def per_example(theta: Tensor) -> Tensor:
        return c * _elementwise_losses(spec, prob.output(theta), prob.t).reshape(n, -1).sum(1)

    return jacrev(per_example)(prob.theta)


def dense_fisher_emp(
    model: nn.Module,
    loss_fn: LossFn,
    x: Any,
    t: Tensor,
    *,
    dtype: torch.dtype | None = None,
    **loss_kwargs: Any,
) -> Tensor:
    """The empirical Fisher ``(1/c) Σ_n ∇L_n ∇L_nᵀ`` (``(1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ`` for a mean loss).

    Args:
        model: The model.
        loss_fn: A supported loss.
        x: The model input.
        t: The targets.
        dtype: Precision to compute in.
        **loss_kwargs: Loss options.

    Returns:
        ``[P, P]`` in :func:`trained_params` order.
    """
    grads = per_example_gradients(model, loss_fn, x, t, dtype=dtype, **loss_kwargs)
    prob = _Problem(model, loss_fn, x, t, loss_kwargs, dtype)
    z = prob.output(prob.theta).detach()
    c = _reduction_factor(prob.spec(z), z, prob.t)
    return grads.T @ grads / c


_DENSE = {
    CurvatureType.HESSIAN: dense_hessian,
    CurvatureType.GGN: dense_ggn,
    CurvatureType.FISHER_EXACT: dense_fisher_exact,
    CurvatureType.FISHER_EMP: dense_fisher_emp,
}


def dense_curvature(
    curvature: CurvatureType | str,
    model: nn.Module,
    loss_fn: LossFn,
    x: Any,
    t: Tensor,
    *,
    dtype: torch.dtype | None = None,
    **loss_kwargs: Any,
) -> Tensor:
    """Dispatch to the dense builder of ``curvature`` (``fisher_mc`` is its expectation).

    Args:
        curvature: ``hessian``, ``ggn``, ``fisher_exact``, ``fisher_mc`` (returns the exact
            Fisher, the Monte-Carlo estimator's expectation) or ``fisher_emp``.
        model: The model.
        loss_fn: The loss.
        x: The model input.
        t: The targets.
        dtype: Precision to compute in.
        **loss_kwargs: Loss options.

    Returns:
        ``[P, P]`` in :func:`trained_params` order.
    """
    kind = coerce_enum(CurvatureType, curvature, "curvature")
    if kind is CurvatureType.FISHER_MC:
        kind = CurvatureType.FISHER_EXACT
    return _DENSE[kind](model, loss_fn, x, t, dtype=dtype, **loss_kwargs)
