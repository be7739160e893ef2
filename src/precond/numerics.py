"""Numerical safety: warn once per cause, check finiteness where a step may sync anyway.

Refresh and curvature-update steps are amortised (every ``T`` steps) and their factorisations
synchronise with the device regardless, so checks that need a host sync live there; the
per-step ``precondition`` path never syncs. Where a per-step flag lives in host memory (a CPU),
reading it costs nothing and :func:`host_flag` returns it, so that the step can skip the passes
that only make a device-side selection exact.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

__all__ = [
    "NumericalWarning",
    "READ_CPU_FLAGS",
    "all_sums_finite",
    "finite_flags",
    "finite_sums",
    "is_finite",
    "flags_on_host",
    "host_flag",
    "host_flags",
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


def finite_sums(tensors: list[Tensor]) -> Tensor:
    """Per tensor, whether its sum is finite (boolean ``[len(tensors)]``, on the device).

    A sum is NaN or infinite whenever an entry is, so no non-finite tensor passes. It is one
    reduction pass per tensor without temporaries (accumulated in float32, or float64 for
    float64 tensors), where ``torch.isfinite(t).all()`` makes four passes with three
    tensor-sized temporaries and costs some twenty times more on a CPU. The price is that a
    finite tensor whose sum overflows reads as non-finite: its entries are then within a
    factor ``numel`` of the dtype's range, which nothing downstream handles either, and
    callers only skip an update on ``False``.

    Args:
        tensors: Tensors of any shape and floating dtype (at least one).

    Returns:
        The flags, on the tensors' device (no host sync).
    """
    return is_finite(torch.stack(_sums(tensors)))


def is_finite(t: Tensor) -> Tensor:
    """``torch.isfinite(t)`` for floating ``t`` as ``|t| < ∞``: False for NaN and ±∞.

    Two operators where ``torch.isfinite`` dispatches four (``abs``, ``ne``, ``eq``, ``mul``);
    on the handful of numbers the per-step checks read, the dispatch is the cost.
    """
    return t.abs() < math.inf


def _sums(tensors: list[Tensor]) -> list[Tensor]:
    """The sums of :func:`finite_sums`, one per tensor (float64 for float64 tensors)."""
    return [
        t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32) for t in tensors
    ]


def finite_flags(tensors: list[Tensor]) -> list[bool]:
    """:func:`finite_sums` read on the host: one flag per tensor, one synchronisation for all.

    Args:
        tensors: Tensors to check.

    Returns:
        One flag per tensor (``[]`` for none).
    """
    if not tensors:
        return []
    # The sums read on the host and judged there: ``isfinite`` on the device is four more
    # operators (it decomposes into ``abs``, ``ne``, ``eq``, ``mul``), each a dispatch that
    # costs more than the judgement on a handful of numbers; the synchronisation is the same.
    sums = _sums(tensors)
    values = [sums[0].item()] if len(sums) == 1 else torch.stack(sums).tolist()
    return [math.isfinite(v) for v in values]


def all_sums_finite(tensors: list[Tensor]) -> bool:
    """Whether every tensor passes :func:`finite_sums` (one host sync; ``True`` for none).

    Args:
        tensors: Tensors to check.

    Returns:
        The verdict.
    """
    return all(finite_flags(tensors))


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


def host_flags(flags: Tensor) -> list[bool] | None:
    """:func:`host_flag` for a vector of flags: their values on a CPU, ``None`` elsewhere.

    Args:
        flags: Boolean (or 0/1) flags, one dimension.

    Returns:
        ``flags.tolist()`` as booleans where reading waits for no device, else ``None``.
    """
    return [bool(f) for f in flags.tolist()] if flags_on_host(flags.device) else None


def flags_on_host(device: torch.device) -> bool:
    """Whether :func:`host_flag` reads the flags of ``device`` (a CPU, unless turned off)."""
    return READ_CPU_FLAGS and device.type == "cpu"
