"""Dense float64 oracles for the Fisher-based methods' theorem tests.

Everything here is computed with plain autograd / torch.func, independently of precond's
capture and curvature code, in the parameter order of ``model.named_parameters()`` (trained
parameters only), which is the order of ``tests.helpers.flat_grad``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from tests.helpers import flat_params, per_example_grads_oracle
from torch import Tensor, nn


def param_offsets(model: nn.Module) -> dict[int, int]:
    """``id(param) → offset`` of each trained parameter in the flat parameter vector."""
    out, start = {}, 0
    for _, p in flat_params(model):
        out[id(p)] = start
        start += p.numel()
    return out


def canonical_index(model: nn.Module, layer) -> Tensor:
    """Flat parameter positions of a precond layer's canonical ``[G, d_out, d_in']`` entries."""
    offsets = param_offsets(model)
    parts = [
        torch.arange(offsets[id(p)], offsets[id(p)] + p.numel(), dtype=torch.float64).reshape(
            p.shape
        )
        for p in layer.params
    ]
    return layer.to_matrix(parts).round().long()


def block_ids(model: nn.Module, layers, shape: str) -> Tensor:
    """Block label of every flat parameter for a Fisher shape (full/layer_wise/unit_wise/diag)."""
    total = sum(p.numel() for _, p in flat_params(model))
    ids = torch.arange(total)  # parameters outside every layer: their own block
    for li, layer in enumerate(layers):
        idx = canonical_index(model, layer)  # [G, d_out, d_in']
        if shape == "full":
            ids[idx.reshape(-1)] = -1
        elif shape == "layer_wise":
            ids[idx.reshape(-1)] = -(li + 2)
        elif shape == "unit_wise":
            g, o, _ = idx.shape
            unit = torch.arange(g * o).reshape(g, o, 1).expand_as(idx)
            ids[idx.reshape(-1)] = -(total * (li + 2) + unit.reshape(-1))
    return ids


def restrict(matrix: Tensor, ids: Tensor) -> Tensor:
    """Zero the entries of ``matrix`` that couple different blocks."""
    return matrix * (ids.unsqueeze(0) == ids.unsqueeze(1)).to(matrix.dtype)


def damped_solve(matrix: Tensor, damping: float, g: Tensor) -> Tensor:
    """``(matrix + λI)⁻¹ g`` (float64; single matrix, so LU is safe)."""
    return torch.linalg.solve(matrix + damping * torch.eye(matrix.shape[0], dtype=matrix.dtype), g)


def example_grads(
    model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor
) -> Tensor:
    """``[N, P]``: gradient of ``loss_fn`` on each single example (its own mean reduction)."""
    grads = per_example_grads_oracle(model, loss_fn, x, t)
    return torch.cat([grads[k].reshape(x.shape[0], -1) for k, _ in flat_params(model)], dim=1)


def dense_emp_fisher(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    t: Tensor,
    rows_per_example: int = 1,
) -> Tensor:
    """Empirical Fisher of a ``mean`` loss over ``N·R`` equal-weight rows.

    With ``h_n`` the gradient of example ``n``'s own mean loss, the loss is
    ``L = (1/N) Σ_n ℓ̄_n`` with reduction factor ``c = 1/(N R)``, and precond's empirical
    Fisher is ``(1/c) Σ_n ∇L_n ∇L_nᵀ = (R/N) Σ_n h_n h_nᵀ``.
    """
    h = example_grads(model, loss_fn, x, t)
    return rows_per_example / x.shape[0] * h.T @ h


def kfe_direction(
    a_in: Tensor, g_out: Tensor, grad: Tensor, damping: float, qa=None, qb=None, scale=None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EKFAC's direction for one layer from its inputs and output gradients, densely.

    Args:
        a_in: Canonical inputs ``[N, S, d_in']`` (bias column included).
        g_out: Output gradients ``[N, S, d_out]`` scaled as the curvature's vectors.
        grad: The layer's canonical gradient ``[d_out, d_in']``.
        damping: ``λ``.
        qa, qb: Eigenbases to use instead of those of ``A`` and ``B``.
        scale: Scaling to use instead of the one measured from ``a_in``, ``g_out``.

    Returns:
        ``(direction [d_out, d_in'], Q_A, Q_B, s)``.
    """
    n, s_pos, _ = a_in.shape
    a = torch.einsum("nsi,nsj->ij", a_in, a_in) / (n * s_pos)
    b = torch.einsum("nso,nsp->op", g_out, g_out)
    if qa is None:
        qa = torch.linalg.eigh(a)[1]
    if qb is None:
        qb = torch.linalg.eigh(b)[1]
    jac = torch.einsum("nso,nsi->noi", g_out, a_in)
    if scale is None:
        scale = (qb.T @ jac @ qa).square().sum(0)
    q = torch.kron(qb.contiguous(), qa.contiguous())
    kfe = q @ torch.diag(scale.reshape(-1)) @ q.T
    direction = damped_solve(kfe, damping, grad.reshape(-1)).reshape(grad.shape)
    return direction, qa, qb, scale


def capture_io(
    model: nn.Module,
    modules: list[nn.Module],
    forward: Callable[[], Tensor],
    factor: float,
) -> list[tuple[Tensor, Tensor]]:
    """Inputs and output gradients (times ``factor``) of ``modules`` in one plain backward.

    Args:
        model: The model (its gradients are zeroed).
        modules: Modules to observe.
        forward: Computes the scalar loss.
        factor: Multiplies the output gradients (``1/√c`` for the empirical Fisher).

    Returns:
        ``(input, output_grad)`` per module, as the module saw them.
    """
    seen: dict[nn.Module, list[Tensor]] = {}

    def hook(mod, args, out):
        out.retain_grad()
        seen[mod] = [args[0].detach(), out]

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        model.zero_grad()
        forward().backward()
    finally:
        for h in handles:
            h.remove()
    return [(seen[m][0], seen[m][1].grad * factor) for m in modules]


def linear_io(x: Tensor, gy: Tensor) -> tuple[Tensor, Tensor]:
    """Canonical ``[N, 1, d_in+1]`` inputs and ``[N, 1, d_out]`` gradients of a Linear layer."""
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype)
    return torch.cat([x, ones], dim=1).unsqueeze(1), gy.unsqueeze(1)


def conv_io(conv: nn.Conv2d, x: Tensor, gy: Tensor) -> tuple[Tensor, Tensor]:
    """Canonical ``[N, S, C_in k² + 1]`` patches and ``[N, S, C_out]`` gradients (groups=1)."""
    cols = F.unfold(x, conv.kernel_size, padding=conv.padding, stride=conv.stride)
    cols = cols.transpose(1, 2)
    ones = torch.ones(*cols.shape[:2], 1, dtype=x.dtype)
    return torch.cat([cols, ones], dim=2), gy.flatten(2).transpose(1, 2)
