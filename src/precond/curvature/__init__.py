"""What the curvature matrix is: loss-side vectors, exact oracles, Fisher and Hessian makers.

Public entry points (also re-exported from :mod:`precond`): :class:`FisherMaker`,
:class:`HessianMaker`, the plain functions ``precond.fisher`` / ``precond.hessian`` (in
:mod:`precond.curvature.api`), matrix-free products and operators, dense ``torch.func`` oracles
(:mod:`precond.curvature.exact`) and spectral tools (:mod:`precond.curvature.spectral`).
"""

from __future__ import annotations

from .exact import (
    dense_curvature,
    dense_fisher_emp,
    dense_fisher_exact,
    dense_ggn,
    dense_hessian,
    per_example_gradients,
)
from .loss import LossInputs, LossSpec, UnknownLossError, parse_loss_call
from .maker import FisherMaker, FisherMakerConfig, HessianMaker, HessianMakerConfig
from .operators import CurvatureOperator
from .representation import Curvature, LayerCurvature, canonical_permutation
from .spectral import (
    SpectralDensity,
    hutchinson_diagonal,
    hutchinson_trace,
    lanczos,
    slq_density,
    top_eigenvalues,
)

__all__ = [
    "Curvature",
    "CurvatureOperator",
    "FisherMaker",
    "FisherMakerConfig",
    "HessianMaker",
    "HessianMakerConfig",
    "LayerCurvature",
    "LossInputs",
    "LossSpec",
    "SpectralDensity",
    "UnknownLossError",
    "canonical_permutation",
    "dense_curvature",
    "dense_fisher_emp",
    "dense_fisher_exact",
    "dense_ggn",
    "dense_hessian",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "lanczos",
    "parse_loss_call",
    "per_example_gradients",
    "slq_density",
    "top_eigenvalues",
]
