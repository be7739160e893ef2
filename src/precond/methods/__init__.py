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

from .shampoo import ShampooConfig, ShampooGradientMaker  # noqa: E402

__all__ += ["ShampooConfig", "ShampooGradientMaker"]

from .soap import SoapConfig, SoapGradientMaker  # noqa: E402

__all__ += ["SoapConfig", "SoapGradientMaker"]

from .muon import MuonConfig, MuonGradientMaker  # noqa: E402

__all__ += ["MuonConfig", "MuonGradientMaker"]

from .psgd import PsgdConfig, PsgdGradientMaker  # noqa: E402

__all__ += ["PsgdConfig", "PsgdGradientMaker"]

from .adahessian import AdaHessianConfig, AdaHessianGradientMaker  # noqa: E402

__all__ += ["AdaHessianConfig", "AdaHessianGradientMaker"]

from .sophia import SophiaConfig, SophiaGradientMaker  # noqa: E402

__all__ += ["SophiaConfig", "SophiaGradientMaker"]

from .kbfgs import KbfgsConfig, KbfgsGradientMaker  # noqa: E402

__all__ += ["KbfgsConfig", "KbfgsGradientMaker"]
