"""Enumerations of the design space: curvature types, representations and policies.

Every enum is a ``str`` enum, so users may pass the plain strings (``"fisher_mc"``) anywhere
an enum member is accepted; :func:`precond.validation.coerce_enum` turns a string into the member
or raises the library's standard error.
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "CurvatureType",
    "LossKind",
    "Shape",
    "UnsupportedPolicy",
    "WeightSharing",
]


class CurvatureType(str, Enum):
    """What the curvature matrix ``C`` is.

    For the Fisher types the only difference is what is back-propagated from the loss
    (see :mod:`precond.curvature.loss`): all classes weighted by the model's probabilities
    (``fisher_exact``), labels sampled from the model (``fisher_mc``) or the true labels
    (``fisher_emp``). ``ggn`` is the generalised Gauss-Newton matrix ``J^T H_loss J``; it equals
    ``fisher_exact`` for the supported losses unless class or positive weights are used.
    """

    FISHER_EXACT = "fisher_exact"
    FISHER_MC = "fisher_mc"
    FISHER_EMP = "fisher_emp"
    GGN = "ggn"
    HESSIAN = "hessian"

    def __str__(self) -> str:
        return self.value


class Shape(str, Enum):
    """How a curvature matrix is represented."""

    FULL = "full"
    LAYER_WISE = "layer_wise"
    UNIT_WISE = "unit_wise"
    DIAG = "diag"
    KRON = "kron"
    KFE = "kfe"

    def __str__(self) -> str:
        return self.value


class UnsupportedPolicy(str, Enum):
    """What a gradient maker does with a module that its method cannot handle.

    ``error`` (default) raises at construction and names the module; ``skip`` leaves the plain
    gradient for its parameters; ``diag`` preconditions them with a diagonal fallback.
    """

    ERROR = "error"
    SKIP = "skip"
    DIAG = "diag"

    def __str__(self) -> str:
        return self.value


class WeightSharing(str, Enum):
    """How positions that share a weight (sequence tokens, conv patches) enter Kronecker factors.

    ``expand`` treats every position as an extra datum (Eschenhagen et al. 2023, K-FAC-expand);
    ``reduce`` sums the output gradients and averages the inputs over positions first
    (K-FAC-reduce).
    """

    EXPAND = "expand"
    REDUCE = "reduce"

    def __str__(self) -> str:
        return self.value


class LossKind(str, Enum):
    """Losses whose likelihood precond knows (needed for Fisher-type curvature)."""

    CROSS_ENTROPY = "cross_entropy"
    MSE = "mse"
    BCE_WITH_LOGITS = "bce_with_logits"

    def __str__(self) -> str:
        return self.value
