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

from .natural_gradient import (  # noqa: E402
    DiagNaturalGradientConfig,
    DiagNaturalGradientMaker,
    EmpNaturalGradientConfig,
    EmpNaturalGradientMaker,
    FullNaturalGradientConfig,
    FullNaturalGradientMaker,
    LayerWiseNaturalGradientConfig,
    LayerWiseNaturalGradientMaker,
    NaturalGradientConfig,
    NaturalGradientMaker,
    UnitWiseNaturalGradientConfig,
    UnitWiseNaturalGradientMaker,
)

__all__ += [
    "DiagNaturalGradientConfig",
    "DiagNaturalGradientMaker",
    "EmpNaturalGradientConfig",
    "EmpNaturalGradientMaker",
    "FullNaturalGradientConfig",
    "FullNaturalGradientMaker",
    "LayerWiseNaturalGradientConfig",
    "LayerWiseNaturalGradientMaker",
    "NaturalGradientConfig",
    "NaturalGradientMaker",
    "UnitWiseNaturalGradientConfig",
    "UnitWiseNaturalGradientMaker",
]

from .ekfac import EkfacConfig, EkfacGradientMaker  # noqa: E402

__all__ += ["EkfacConfig", "EkfacGradientMaker"]

from .smw_ng import SmwEmpNaturalGradientConfig, SmwEmpNaturalGradientMaker  # noqa: E402

__all__ += ["SmwEmpNaturalGradientConfig", "SmwEmpNaturalGradientMaker"]

from .seng import SengConfig, SengGradientMaker  # noqa: E402

__all__ += ["SengConfig", "SengGradientMaker"]
