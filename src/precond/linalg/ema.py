"""Exponential moving averages of curvature statistics."""

from __future__ import annotations

from torch import Tensor

__all__ = ["ema_update"]


def ema_update(old: Tensor | None, new: Tensor, decay: float) -> Tensor:
    """``decay · old + (1 − decay) · new`` in place on ``old`` (or ``new`` if there is no old).

    Args:
        old: The running average, or ``None`` before the first update.
        new: This step's statistic (same shape).
        decay: ``β ∈ [0, 1)``; 0 keeps only ``new``.

    Returns:
        The updated average (``old`` itself when it exists).
    """
    if old is None or decay == 0.0:
        return new if old is None else old.copy_(new)
    # one pass (a scale then an add would be two): old + (1 − decay)(new − old)
    return old.lerp_(new.to(old.dtype), 1.0 - decay)
