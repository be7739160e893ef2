"""Mixed precision: the caller's autocast around model calls, none around the method's own work.

A training loop under ``torch.autocast`` wraps the whole step, ``forward_and_backward``
included. The model and the loss must then run as the caller asked (lower-precision products
where autocast chooses them), but nothing else may: autocast would also cast the method's own
products (Gram matrices, Kronecker factors, their roots and inverses, the preconditioned
gradient) to bfloat16 or float16, which loses the statistics' precision silently and fails
outright where the operands' dtypes must agree or a factorisation has no low-precision kernel.
PyTorch also advises against running backward passes under autocast (their kernels follow the
dtypes the forward chose).

So a gradient maker records the caller's autocast regions when a step starts
(:func:`ambient_autocast`), turns them off for the step (:func:`autocast_off`) and turns them
back on around each call of the model and the loss (:func:`autocast_on`): every statistic and
every preconditioner runs in the dtype that :func:`precond.capture.stat_dtype` chooses (float32
or better), whatever the caller's autocast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["AutocastRegion", "ambient_autocast", "autocast_off", "autocast_on"]


@dataclass(frozen=True)
class AutocastRegion:
    """One device type's autocast as the caller set it.

    Attributes:
        device_type: ``"cuda"``, ``"cpu"``, ...
        dtype: The lower-precision dtype autocast casts to.
        cache_enabled: Whether autocast caches the casts of leaf tensors (weights).
    """

    device_type: str
    dtype: torch.dtype
    cache_enabled: bool


def _enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4 answers for CUDA only without a device type
        if device_type == "cuda":
            return bool(torch.is_autocast_enabled())
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return False


def _dtype(device_type: str) -> torch.dtype:
    getter = getattr(torch, "get_autocast_dtype", None)
    if getter is not None:
        return getter(device_type)
    if device_type == "cpu":  # torch < 2.4
        return torch.get_autocast_cpu_dtype()
    return torch.get_autocast_gpu_dtype()


def ambient_autocast(*device_types: str) -> tuple[AutocastRegion, ...]:
    """The autocast regions active now for these device types (each once, in order).

    Args:
        device_types: Device types to look at (the model's; ``"cpu"`` is always looked at).

    Returns:
        The active regions; empty when autocast is off (the common case: no further cost).
    """
    regions = []
    for device_type in dict.fromkeys((*device_types, "cpu")):
        if _enabled(device_type):
            cache = bool(torch.is_autocast_cache_enabled())
            regions.append(AutocastRegion(device_type, _dtype(device_type), cache))
    return tuple(regions)


def autocast_off(regions: tuple[AutocastRegion, ...]) -> AbstractContextManager[Any]:
    """Autocast disabled for these regions' device types inside the block."""
    if not regions:  # the common case, on every step: no context to build
        return contextlib.nullcontext()
    return _entered([torch.autocast(r.device_type, enabled=False) for r in regions])


def autocast_on(regions: tuple[AutocastRegion, ...]) -> AbstractContextManager[Any]:
    """These regions' autocast (device type, dtype, weight cache) enabled inside the block."""
    if not regions:
        return contextlib.nullcontext()
    return _entered(
        [
            torch.autocast(
                r.device_type, dtype=r.dtype, enabled=True, cache_enabled=r.cache_enabled
            )
            for r in regions
        ]
    )


@contextlib.contextmanager
def _entered(contexts: list[AbstractContextManager[Any]]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield
