"""Numerical safety: warn once per cause, check finiteness where a step may sync anyway.

Refresh and curvature-update steps are amortised (every ``T`` steps) and their factorisations
synchronise with the device regardless, so checks that need a host sync live there; the
per-step ``precondition`` path never syncs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["NumericalWarning", "warn_once", "all_finite", "reset_warnings"]


class NumericalWarning(RuntimeWarning):
    """Numerical trouble that precond handled (skipped an update, fell back, added damping)."""


_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Emit a :class:`NumericalWarning` the first time ``key`` is seen in this process.

    Args:
        key: Identity of the cause (e.g. ``"kfac:cholesky:fc1"``).
        message: The warning text.
    """
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, NumericalWarning, stacklevel=3)


def reset_warnings() -> None:
    """Forget which warnings were emitted (tests)."""
    _WARNED.clear()


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every tensor is finite (one host sync for all of them).

    Args:
        tensors: Tensors to check.

    Returns:
        ``True`` if no entry is NaN or infinite.
    """
    flags = [torch.isfinite(t).all() for t in tensors]
    if not flags:
        return True
    return bool(torch.stack(flags).all())
