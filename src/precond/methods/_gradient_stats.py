"""Validation and numerics shared by the gradient-statistics methods (Shampoo, SOAP, Muon).

State updated on every step (momentum, Adam moments, grafting accumulators) is guarded on the
device, without a host sync: :func:`finite_rows` (or :func:`~precond.numerics.finite_sums`)
gives a flag per tensor or per stacked block and :func:`keep_where_` writes the new state only
where the flag holds, so a non-finite gradient leaves that state exactly as it was.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..numerics import is_finite, warn_once
from ..validation import check_float, check_int, invalid

__all__ = [
    "check_betas",
    "check_bool",
    "check_blocking",
    "eigh_descending",
    "damped_eigh_",
    "finite_rows",
    "keep_where_",
    "reject_ema_decay",
]


def check_bool(name: str, value: Any) -> bool:
    """Validate a boolean argument.

    Args:
        name: The argument name.
        value: The value.

    Returns:
        The value.

    Raises:
        ValueError: If ``value`` is not a ``bool``.
    """
    if not isinstance(value, bool):
        raise invalid(name, value, "Must be True or False")
    return value


def check_betas(name: str, value: Any) -> tuple[float, float]:
    """Validate a pair of decay rates, each in ``[0, 1)``.

    Args:
        name: The argument name.
        value: The value.

    Returns:
        The pair as a tuple of floats.

    Raises:
        ValueError: If ``value`` is not a pair of numbers in ``[0, 1)``.
    """
    ok = isinstance(value, tuple | list) and len(value) == 2
    if ok:
        for b in value:
            if isinstance(b, bool) or not isinstance(b, int | float) or not 0.0 <= b < 1.0:
                ok = False
    if not ok:
        raise invalid(name, value, "Must be a pair (beta1, beta2) of numbers in [0, 1)")
    return (float(value[0]), float(value[1]))


def check_blocking(merge_dims: Any, block_size: Any) -> None:
    """Validate the ``merge_dims`` and ``block_size`` knobs (each a positive int or ``None``).

    Args:
        merge_dims: Largest merged dimension, or ``None``.
        block_size: Largest block dimension, or ``None``.
    """
    if merge_dims is not None:
        check_int("merge_dims", merge_dims, minimum=1)
    if block_size is not None:
        check_int("block_size", block_size, minimum=1)


def reject_ema_decay(ema_decay: float, method: str, instead: str) -> None:
    """Raise if the shared ``ema_decay`` is set on a method that has its own decay knobs.

    Args:
        ema_decay: The config's ``ema_decay``.
        method: The method's name for the message.
        instead: Which of its own fields to use instead.

    Raises:
        ValueError: If ``ema_decay`` is not 0.
    """
    check_float("ema_decay", ema_decay, minimum=0.0)
    if ema_decay != 0.0:
        raise invalid("ema_decay", ema_decay, f"{method} does not use it; set {instead} instead")


def finite_rows(x: Tensor) -> Tensor:
    """Whether each row of a stacked batch is finite, on the device (no host sync).

    A row counts as finite when its sum is (see :func:`~precond.numerics.finite_sums`).

    Args:
        x: ``[B, ...]``.

    Returns:
        Boolean ``[B]``: ``True`` where every entry of ``x[b]`` is finite.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return is_finite(x.reshape(x.shape[0], -1).sum(dim=1, dtype=dtype))


def keep_where_(state: Tensor, new: Tensor, ok: Tensor) -> Tensor:
    """``state ← new`` where ``ok`` holds, unchanged elsewhere (in place, no host sync).

    Args:
        state: The state to update.
        new: The candidate value, shaped like ``state`` (exactly what is stored where ``ok``).
        ok: A 0-dim flag for the whole tensor, or one flag per leading row (``[B]``).

    Returns:
        ``state``.
    """
    if ok.dim():
        ok = ok.reshape(ok.shape + (1,) * (state.dim() - 1))
    return torch.where(ok, new, state, out=state)


def damped_eigh_(m: Tensor, damping: float) -> tuple[Tensor, Tensor] | None:
    """Eigendecomposition of ``m + δI`` for a batch of symmetric PSD ``m``, which is overwritten.

    Pass a working copy: the damping is added to its diagonal in place. Only the lower
    triangle is read (no symmetrisation pass). Adding ``δ`` before the decomposition is the
    same as adding it to the eigenvalues afterwards, and it also gives exactly zero rows and
    columns (features that are always zero) a nonzero diagonal, on which float32 ``eigh``
    otherwise fails. Matrices whose float32 decomposition still fails are redone in float64,
    one by one rather than the whole batch.

    Args:
        m: ``[B, n, n]`` (any float dtype), overwritten.
        damping: ``δ ≥ 0``.

    Returns:
        ``(eigenvalues [B, n] ascending, clamped at δ; eigenvectors [B, n, n])`` in ``m``'s
        dtype, or ``None`` if a matrix could not be decomposed.
    """
    m.diagonal(dim1=-2, dim2=-1).add_(damping)
    try:
        evals, evecs = torch.linalg.eigh(m)
    except RuntimeError:
        evals = evecs = None
    if evals is not None and evecs is not None:
        bad = ~torch.isfinite(evals).all(dim=-1)
        if not bool(bad.any()):
            return evals.clamp_(min=damping), evecs
        redo = bad.nonzero().squeeze(1)
    else:
        redo = torch.arange(m.shape[0], device=m.device)
    try:
        e64, v64 = torch.linalg.eigh(m.index_select(0, redo).to(torch.float64))
    except RuntimeError:
        return None
    if not bool(torch.isfinite(e64).all()):
        return None
    if evals is None or evecs is None:
        return e64.to(m.dtype).clamp_(min=damping), v64.to(m.dtype)
    evals.index_copy_(0, redo, e64.to(m.dtype))
    evecs.index_copy_(0, redo, v64.to(m.dtype))
    return evals.clamp_(min=damping), evecs


def eigh_descending(m: Tensor, key: str, label: str) -> tuple[Tensor, Tensor] | None:
    """Eigendecomposition of a batch of symmetric PSD matrices, eigenvalues descending.

    Falls back to float64 when the decomposition fails in the input precision; warns once
    and returns ``None`` if both fail (the caller keeps its previous state).

    Args:
        m: ``[B, n, n]``.
        key: ``warn_once`` key.
        label: Method name for the warning.

    Returns:
        ``(eigenvalues [B, n], eigenvectors [B, n, n])`` (eigenvalues clamped at 0), or
        ``None``.
    """
    from ..linalg.solvers import eigh_psd

    dec = eigh_psd(m)
    if dec is None:
        warn_once(
            key,
            f"{label}: eigendecomposition of the statistics failed; keeping the previous "
            "preconditioner.",
        )
        return None
    evals, evecs = dec
    return evals.flip(-1), evecs.flip(-1)
