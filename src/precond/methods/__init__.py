# ruff: noqa: I001  (import order below is registration order)
"""Preconditioners: one module per algorithm family, each registered by name.

Import order is registration order (``precond.methods()``, ``precond list``, benchmarks).
"""

from __future__ import annotations

from .base import FisherConfig, PreconditionedGradientMaker, accumulate_grads
from .fallback import DiagonalFallback
from .kfac import KfacConfig, KfacGradientMaker, write_preconditioned
from .ekfac import EkfacConfig, EkfacGradientMaker, reproject_scale
from .natural_gradient import (
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
from .smw_ng import (
    SmwEmpNaturalGradientConfig,
    SmwEmpNaturalGradientMaker,
    check_gram_config,
    rows_cost,
)
from .seng import SengConfig, SengGradientMaker
from .newton import IndefiniteRule, NewtonConfig, NewtonGradientMaker
from .hessian_free import HessianFreeConfig, HessianFreeGradientMaker
from .lissa import LissaConfig, LissaGradientMaker
from .curveball import CurveBallConfig, CurveBallGradientMaker, solve_rho_beta
from .shampoo import Grafting, ShampooConfig, ShampooGradientMaker, VectorFactor
from .soap import SoapConfig, SoapGradientMaker
from .psgd import PsgdConfig, PsgdFit, PsgdForm, PsgdGradientMaker
from .kbfgs import KronBfgsConfig, KronBfgsGradientMaker, KbfgsVariant
from .adahessian import AdaHessianConfig, AdaHessianGradientMaker, block_average
from .sophia import SophiaConfig, SophiaEstimator, SophiaGradientMaker, sophia_direction
from .muon import (
    MuonConfig,
    MuonFallback,
    MuonGradientMaker,
    MuonScale,
    NewtonSchulz,
    newton_schulz,
)

__all__ = [
    "accumulate_grads",
    "AdaHessianConfig",
    "AdaHessianGradientMaker",
    "block_average",
    "check_gram_config",
    "CurveBallConfig",
    "CurveBallGradientMaker",
    "DiagNaturalGradientConfig",
    "DiagNaturalGradientMaker",
    "DiagonalFallback",
    "EkfacConfig",
    "EkfacGradientMaker",
    "EmpNaturalGradientConfig",
    "EmpNaturalGradientMaker",
    "FisherConfig",
    "FullNaturalGradientConfig",
    "FullNaturalGradientMaker",
    "Grafting",
    "HessianFreeConfig",
    "HessianFreeGradientMaker",
    "IndefiniteRule",
    "KronBfgsConfig",
    "KronBfgsGradientMaker",
    "KbfgsVariant",
    "KfacConfig",
    "KfacGradientMaker",
    "LayerWiseNaturalGradientConfig",
    "LayerWiseNaturalGradientMaker",
    "LissaConfig",
    "LissaGradientMaker",
    "MuonConfig",
    "MuonFallback",
    "MuonGradientMaker",
    "MuonScale",
    "NaturalGradientConfig",
    "NaturalGradientMaker",
    "newton_schulz",
    "NewtonConfig",
    "NewtonGradientMaker",
    "NewtonSchulz",
    "PreconditionedGradientMaker",
    "PsgdConfig",
    "PsgdFit",
    "PsgdForm",
    "PsgdGradientMaker",
    "reproject_scale",
    "rows_cost",
    "SengConfig",
    "SengGradientMaker",
    "ShampooConfig",
    "ShampooGradientMaker",
    "SmwEmpNaturalGradientConfig",
    "SmwEmpNaturalGradientMaker",
    "SoapConfig",
    "SoapGradientMaker",
    "solve_rho_beta",
    "sophia_direction",
    "SophiaConfig",
    "SophiaEstimator",
    "SophiaGradientMaker",
    "UnitWiseNaturalGradientConfig",
    "UnitWiseNaturalGradientMaker",
    "VectorFactor",
    "write_preconditioned",
]
