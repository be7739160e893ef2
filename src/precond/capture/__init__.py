"""Per-layer statistics: layer inputs, output gradients and per-example gradients.

One adapter per module kind reduces the layer to a grouped affine map (see
:mod:`precond.capture.base`); nothing downstream knows module types.
"""

from __future__ import annotations

from . import conv, embedding, linear, norm  # noqa: F401  (register the built-in adapters)
from .base import Adapter, find_adapter, register_adapter, registered_adapters
from .discovery import UnsupportedModuleError, find_layers
from .recorder import HookCounter, Recorder
from .stats import GRAD_TAG, Layer, LayerStats, per_example_workspace, stat_dtype

__all__ = [
    "GRAD_TAG",
    "Adapter",
    "HookCounter",
    "Layer",
    "LayerStats",
    "Recorder",
    "UnsupportedModuleError",
    "find_adapter",
    "find_layers",
    "per_example_workspace",
    "register_adapter",
    "registered_adapters",
    "stat_dtype",
]
