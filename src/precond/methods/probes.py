r"""Random probes and diagonal curvature estimators shared by PSGD, AdaHessian and Sophia.

* :func:`hutchinson_diagonal`: ``z ⊙ (H z)`` for probes with ``E[z zᵀ] = I`` (Rademacher or
  Gaussian) is an unbiased estimate of ``diag(H)`` (Bekas, Kokiopoulou & Saad 2007).
* :func:`gnb_diagonal`: the Gauss-Newton-Bartlett estimate of Sophia (Liu et al. 2024):
  back-propagate ``√c ∇_z ℓ(z, ŷ)`` for labels ``ŷ`` sampled from the model
  (:meth:`~precond.curvature.loss.LossInputs.mc_vectors`) and square the result. For a loss
  ``L = c Σ_r ℓ_r`` this is ``B · (∇L̂)²`` with ``B = 1/c`` rows and ``L̂`` the loss on the sampled
  labels, and its expectation is the diagonal of the GGN/Fisher of ``L`` (cross terms between
  rows vanish because ``E[∇ℓ_r(ŷ)] = 0`` under the model's distribution).

Every random draw goes through the gradient maker's generator, so a resumed run draws the same
probes. Estimates are returned in float32 or better whatever the parameters' dtype.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from ..capture import stat_dtype
from ..curvature.loss import LossInputs
from ..curvature.products import gradient_with_graph
from ._twin_backward import UncutGraphs, twin_backward

__all__ = [
    "gaussian_like",
    "gnb_diagonal",
    "hutchinson_diagonal",
    "hvp_with_probes",
    "rademacher_like",
    "split_grads",
]


def rademacher_like(
    params: Sequence[Tensor], generator: torch.Generator, *, scratch: list[Tensor] | None = None
) -> list[Tensor]:
    """Independent ±1 entries shaped like ``params`` (their dtype and device).

    The signs are the bits of uniformly random 32-bit integers (32 signs per draw: a CPU
    generator draws one number at a time, so drawing one number per sign would cost more than
    the Hessian-vector product the probes are for). Tensors of one dtype and device share one
    buffer (views of it are returned).

    Args:
        params: Reference tensors.
        generator: Random generator on the tensors' device.
        scratch: A list holding the buffer of an earlier call (or empty): float32 probes are
            written into it and it is kept there for the next call. A fresh buffer of a few MB
            costs its page faults on every call (about as much as forming the signs); the
            returned probes are then only valid until the next call with the same list.

    Returns:
        One probe per tensor.
    """
    if not params:
        return []
    first = params[0]
    if any(p.dtype != first.dtype or p.device != first.device for p in params):
        return [rademacher_like([p], generator)[0] for p in params]
    sizes = [p.numel() for p in params]
    words = -(-sum(sizes) // 32)
    draws = torch.randint(
        -(2**31), 2**31, (words, 1), generator=generator, device=first.device, dtype=torch.int32
    )
    shifts = torch.arange(32, device=first.device, dtype=torch.int32)
    if first.dtype == torch.float32:
        buf = None
        if scratch:
            buf = scratch[0]
            if buf.shape != (words, 32) or buf.device != first.device:
                buf = None
        if buf is None:
            buf = torch.empty(words, 32, device=first.device, dtype=torch.int32)
            if scratch is not None:
                scratch[:] = [buf]
        # bit k moved to the sign bit of the float32 pattern of 1.0: ±1 without a conversion
        signs = torch.bitwise_left_shift(draws, 31 - shifts, out=buf).bitwise_and_(-(2**31))
        flat = signs.bitwise_or_(0x3F800000).view(-1)[: sum(sizes)].view(torch.float32)
    else:
        bits = torch.bitwise_right_shift(draws, shifts).bitwise_and_(1).view(-1)[: sum(sizes)]
        flat = bits.to(first.dtype).mul_(-2).add_(1)  # bit 1 is -1, as above
    return [v.view(p.shape) for v, p in zip(flat.split(sizes), params)]


def gaussian_like(
    params: Sequence[Tensor], generator: torch.Generator, dtype: torch.dtype | None = None
) -> list[Tensor]:
    """Independent standard normal entries shaped like ``params``.

    Args:
        params: Reference tensors.
        generator: Random generator on the tensors' device.
        dtype: Dtype of the result (default: each tensor's own).

    Returns:
        One probe per tensor.
    """
    return [
        torch.randn(p.shape, generator=generator, device=p.device, dtype=dtype or p.dtype)
        for p in params
    ]


def split_grads(loss: Tensor, params: Sequence[Tensor], *, create_graph: bool) -> list[Tensor]:
    """``∇_θ L`` for every tensor of ``params`` (zeros for unused ones).

    Args:
        loss: Scalar loss.
        params: Parameters.
        create_graph: Keep the graph for Hessian-vector products.

    Returns:
        Gradients aligned with ``params``.
    """
    if create_graph:
        return gradient_with_graph(loss, params)
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def hvp_with_probes(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    probes: Sequence[Tensor],
    *,
    retain_graph: bool = False,
) -> list[Tensor | None]:
    """``H z``: one double-backward pass with the probes as the gradients' output gradients.

    No inner product of gradients and probes is built in the graph. Gradients without a graph
    (constant in the parameters) contribute nothing.

    Args:
        grads: ``∇_θ L`` built with ``create_graph=True``.
        params: The parameters.
        probes: ``z`` (one tensor per parameter).
        retain_graph: Keep the graph for further products.

    Returns:
        ``H z`` per parameter (detached, in the parameters' dtype), ``None`` where it is zero.
        A result may be a probe itself (a Hessian block that is the identity).
    """
    live = [k for k, g in enumerate(grads) if g.requires_grad]
    hz: list[Tensor | None] = [None] * len(params)
    if live:
        out = torch.autograd.grad(
            [grads[k] for k in live],
            [params[k] for k in live],
            [probes[k].to(grads[k].dtype) for k in live],
            retain_graph=retain_graph,
            allow_unused=True,
        )
        for k, h_k in zip(live, out):
            hz[k] = None if h_k is None else h_k.detach()
    return hz


def hutchinson_diagonal(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    probes: Sequence[Tensor],
    *,
    retain_graph: bool = False,
    unsigned: Sequence[bool] | None = None,
) -> list[Tensor]:
    """``z ⊙ (H z)`` per parameter: one Hutchinson sample of ``diag(H)``.

    ``H z`` comes from :func:`hvp_with_probes`.

    Args:
        grads: ``∇_θ L`` built with ``create_graph=True``.
        params: The parameters the probes live on.
        probes: ``z`` (one tensor per parameter, ``E[z zᵀ] = I``), Rademacher where
            ``unsigned`` is set.
        retain_graph: Keep the graph for further products.
        unsigned: Per parameter, return ``H z`` itself, the sample up to the sign of each entry
            (``|zᵢ| = 1``): for a caller that only uses its square, ``(zᵢ (Hz)ᵢ)² = (Hz)ᵢ²``
            bit for bit, and one pass over the parameter is saved.

    Returns:
        Estimates in float32 or better (fresh tensors).
    """
    hz = hvp_with_probes(grads, params, probes, retain_graph=retain_graph)
    flags = [False] * len(params) if unsigned is None else list(unsigned)
    est = []
    for z, h, p, bare in zip(probes, hz, params, flags):
        dt = stat_dtype(p.dtype)
        if h is None:
            est.append(torch.zeros(p.shape, dtype=dt, device=p.device))
            continue
        alias = h.untyped_storage().data_ptr() == z.untyped_storage().data_ptr()
        if bare:
            # a fresh tensor: the probe itself (an identity block) is reused by later draws
            est.append(h.to(dt, copy=alias))
            continue
        if alias:
            h = h.clone()  # the probe itself (an identity block): probes may be reused
        # h is this call's own result: safe to overwrite
        est.append(h.to(dt).mul_(z))
    return est


def gnb_diagonal(
    inputs: LossInputs,
    params: Sequence[Tensor],
    generator: torch.Generator,
    retain_graph: bool = True,
    loss: Tensor | None = None,
    *,
    uncut: UncutGraphs | None = None,
    key: Hashable | None = None,
) -> list[Tensor]:
    """Sophia's Gauss-Newton-Bartlett estimate of ``diag(GGN)`` from one set of sampled labels.

    Args:
        inputs: The step's logits (in the graph), targets and loss options.
        params: Parameters to estimate the diagonal for.
        generator: Draws the labels.
        retain_graph: Keep the loss's graph (``False`` when no backward pass follows).
        loss: If given, the loss's own backward runs too (into the leaves' ``.grad``, like
            ``loss.backward()``) and the graph is freed: both passes walk the graph segment by
            segment where cuts pay (:func:`~._twin_backward.twin_backward`), else
            the loss's first, keeping the graph.
        uncut: Signatures found without a cut (:class:`~._twin_backward.UncutGraphs`).
        key: This graph's signature.

    Returns:
        ``(Jᵀ v)²`` per parameter, in float32 or better.
    """
    vec = inputs.mc_vectors(1, generator)[0]
    grads: Sequence[Tensor | None] | None = None
    if loss is not None:
        grads = twin_backward(loss, inputs.logits, vec, params, uncut=uncut, key=key)
        if grads is None:
            loss.backward(retain_graph=True)
    if grads is None:
        grads = torch.autograd.grad(
            inputs.logits,
            list(params),
            vec,
            retain_graph=retain_graph and loss is None,
            allow_unused=True,
        )
    out: list[Tensor] = []
    live: list[Tensor] = []
    for p, g in zip(params, grads):
        dt = stat_dtype(p.dtype)
        if g is None:
            out.append(torch.zeros_like(p, dtype=dt))
        else:
            out.append(g.to(dt))  # this call's own result: squared in place
            live.append(out[-1])
    if live:
        torch._foreach_mul_(live, live)
    return out
