"""Numerical safety: warn once per cause, check finiteness where a step may sync anyway.

Refresh and curvature-update steps are amortised (every ``T`` steps) and their factorisations
synchronise with the device regardless, so checks that need a host sync live there; the
per-step ``precondition`` path never syncs. Where a per-step flag lives in host memory (a CPU),
reading it costs nothing and :func:`host_flag` returns it, so that the step can skip the passes
that only make a device-side selection exact.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = [
    "NumericalWarning",
    "READ_CPU_FLAGS",
    "all_finite",
    "flags_on_host",
    "host_flag",
    "reset_warnings",
    "warn_once",
]


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


#: Whether :func:`host_flag` reads flags held in host memory (tests turn it off to run the
#: device-side selections on a CPU).
READ_CPU_FLAGS = True


def host_flag(flag: Tensor) -> bool | None:
    """The value of a one-element flag when reading it waits for no device, else ``None``.

    A CPU tensor's value exists once the operator that wrote it has returned, so reading it
    is not a synchronisation; on an accelerator it would stall the host until the queue
    drains. Callers with ``None`` keep their device-side selection (``lerp`` with the flag as
    weight and the like); with a value they can take the cheaper branch.

    Args:
        flag: One element (boolean or 0/1).

    Returns:
        ``bool(flag)`` on a CPU (when :data:`READ_CPU_FLAGS`), ``None`` elsewhere.
    """
    return bool(flag) if flags_on_host(flag.device) else None


def flags_on_host(device: torch.device) -> bool:
    """Whether :func:`host_flag` reads the flags of ``device`` (a CPU, unless turned off)."""
    return READ_CPU_FLAGS and device.type == "cpu"
