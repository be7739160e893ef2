"""Preconditioners: one module per algorithm family, each registered by name."""

from __future__ import annotations

from .base import FisherConfig, PreconditionedGradientMaker, accumulate_grads
from .fallback import DiagonalFallback

__all__ = [
    "DiagonalFallback",
    "FisherConfig",
    "PreconditionedGradientMaker",
    "accumulate_grads",
]

from .kfac import KfacConfig, KfacGradientMaker

__all__ += ["KfacConfig", "KfacGradientMaker"]

from .newton import NewtonConfig, NewtonGradientMaker  # noqa: E402

__all__ += ["NewtonConfig", "NewtonGradientMaker"]

from .hessian_free import HessianFreeConfig, HessianFreeGradientMaker  # noqa: E402

__all__ += ["HessianFreeConfig", "HessianFreeGradientMaker"]

from .lissa import LissaConfig, LissaGradientMaker  # noqa: E402

__all__ += ["LissaConfig", "LissaGradientMaker"]

from .curveball import CurveBallConfig, CurveBallGradientMaker  # noqa: E402

__all__ += ["CurveBallConfig", "CurveBallGradientMaker"]
