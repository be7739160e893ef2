# ruff: noqa: I001  (import order below is registration order)
"""Preconditioners: one module per algorithm family, each registered by name.

Import order is registration order (``precond.methods()``, ``precond list``, benchmarks).
"""

from __future__ import annotations

from .base import FisherConfig, PreconditionedGradientMaker, accumulate_grads
from .fallback import DiagonalFallback
from .kfac import KfacConfig, KfacGradientMaker, write_preconditioned
from .newton import IndefiniteRule, NewtonConfig, NewtonGradientMaker
from .hessian_free import HessianFreeConfig, HessianFreeGradientMaker
from .lissa import LissaConfig, LissaGradientMaker
from .curveball import CurveBallConfig, CurveBallGradientMaker, solve_rho_beta
from .shampoo import Grafting, ShampooConfig, ShampooGradientMaker, VectorFactor
from .soap import SoapConfig, SoapGradientMaker
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
    "CurveBallConfig",
    "CurveBallGradientMaker",
    "DiagonalFallback",
    "FisherConfig",
    "Grafting",
    "HessianFreeConfig",
    "HessianFreeGradientMaker",
    "IndefiniteRule",
    "KfacConfig",
    "KfacGradientMaker",
    "LissaConfig",
    "LissaGradientMaker",
    "MuonConfig",
    "MuonFallback",
    "MuonGradientMaker",
    "MuonScale",
    "newton_schulz",
    "NewtonConfig",
    "NewtonGradientMaker",
    "NewtonSchulz",
    "PreconditionedGradientMaker",
    "ShampooConfig",
    "ShampooGradientMaker",
    "SoapConfig",
    "SoapGradientMaker",
    "solve_rho_beta",
    "VectorFactor",
    "write_preconditioned",
]
