"""Preconditioners: one module per algorithm family, each registered by name."""

from __future__ import annotations

from .base import FisherConfig, PreconditionedGradientMaker
from .fallback import DiagonalFallback

__all__ = ["DiagonalFallback", "FisherConfig", "PreconditionedGradientMaker"]

from .kfac import KfacConfig, KfacGradientMaker

__all__ += ["KfacConfig", "KfacGradientMaker"]
