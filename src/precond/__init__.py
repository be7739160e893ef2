"""precond: gradient preconditioning with second-order information for PyTorch.

One training-loop interface for Fisher (exact, Monte-Carlo, empirical), GGN and Hessian
curvature in every representation, and the preconditioners built on them.
"""

from __future__ import annotations

from . import capture, curvature
from . import methods as _methods_pkg
from .config import PreconditioningConfig
from .curvature import (
    Curvature,
    CurvatureOperator,
    FisherMaker,
    FisherMakerConfig,
    HessianMaker,
    HessianMakerConfig,
    LayerCurvature,
    SpectralDensity,
    hutchinson_diagonal,
    hutchinson_trace,
    slq_density,
    top_eigenvalues,
)
from .curvature.api import curvature_operator, fisher, fisher_vp, ggn_vp, hessian, hvp
from .dummy import Dummy, DummyError
from .enums import CurvatureType, LossKind, Shape, UnsupportedPolicy, WeightSharing
from .grad_maker import GradientMaker, ProtocolError
from .methods import *  # noqa: F403  (every registered method's classes)
from .numerics import NumericalWarning
from .registry import make_gradient_maker, method_info, register_method
from .registry import methods as methods_list
from .schedule import IntervalType, Schedule


def methods() -> dict[str, str]:
    """Registered methods with a one-line description each.

    Returns:
        ``{name: description}``.
    """
    return methods_list()


__version__ = "0.1.0"

__all__ = [  # noqa: PLE0604
    *_methods_pkg.__all__,
    "Curvature",
    "CurvatureOperator",
    "CurvatureType",
    "Dummy",
    "DummyError",
    "FisherMaker",
    "FisherMakerConfig",
    "GradientMaker",
    "HessianMaker",
    "HessianMakerConfig",
    "IntervalType",
    "LayerCurvature",
    "LossKind",
    "NumericalWarning",
    "PreconditioningConfig",
    "ProtocolError",
    "Schedule",
    "Shape",
    "SpectralDensity",
    "UnsupportedPolicy",
    "WeightSharing",
    "__version__",
    "capture",
    "curvature",
    "curvature_operator",
    "fisher",
    "fisher_vp",
    "ggn_vp",
    "hessian",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hvp",
    "make_gradient_maker",
    "method_info",
    "methods",
    "register_method",
    "slq_density",
    "top_eigenvalues",
]
